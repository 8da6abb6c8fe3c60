"""Tensor parallel: decode step time and KV capacity at TP=1 and TP=2, bf16 vs BITDECODE 4-bit.

Llama-3-8B shape with dummy weights, batch 8 x 32K decode (CUDA graphs on) and vLLM's own
"GPU KV cache size", one engine per (backend, TP size, executor) in its own process,
with the machinery of bench_e2e.py. Needs two GPUs for TP=2; the Ray executor needs Ray
(the device kit carries it when built with WITH_RAY=1).

    python benchmarks/bench_tp.py                       # bf16 and int4, TP 1 and 2, mp
    python benchmarks/bench_tp.py --executors mp,ray    # also TP=2 through Ray
    python benchmarks/bench_tp.py --quick               # small shapes, a smoke run

Writes benchmarks/results/tp_<gpu>.json (device, GPU count, date, commit, settings,
``records``: backend, kv, tp, executor, case, batch, context, ms_per_step, tokens_per_s,
kv_cache_tokens, plus speed-up over TP=1 of the same backend and over bf16 at the same
TP) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e as e2e  # noqa: E402

from vllm_bitdecode.provenance import gpu_slug, pyplot, results_doc, write_results  # noqa: E402

KEYS = ("FLASH_ATTN:bf16", "BITDECODE:int4")
CASES = ["decode_b8_32k", "capacity_32k"]


def runs_wanted(tp_sizes: list[int], executors: list[str]) -> list[tuple[str, int, str]]:
    """(backend key, TP size, executor) for every engine; TP=1 needs no executor choice."""
    # bf16 and 4-bit side by side for each (TP size, executor), so that a run cut short
    # still holds complete comparisons
    out = []
    for tp in tp_sizes:
        for ex in (["mp"] if tp == 1 else executors):
            for key in KEYS:
                out.append((key, tp, ex))
    return out


def tp_spec(key: str, tp: int, executor: str, model: str, s: dict[str, Any]) -> dict[str, Any]:
    spec = e2e.engine_spec(key, model, CASES, s)
    spec.pop("_decode_shapes")
    spec["tensor_parallel_size"] = tp
    if tp > 1:
        spec["distributed_executor_backend"] = executor
    return spec


def add_tp_ratios(records: list[dict[str, Any]]) -> None:
    """vs_tp1: tokens/s (decode) or KV tokens (capacity) over TP=1 of the same backend;
    vs_bf16: the same over FLASH_ATTN bf16 at the same TP size and executor."""
    def value(r: dict[str, Any]) -> float | None:
        return r.get("tokens_per_s") if r["case"].startswith("decode") else r.get(
            "kv_cache_tokens")

    ok = [r for r in records if not r.get("skipped") and value(r)]
    tp1 = {(r["key"], r["case"]): r for r in ok if r["tp"] == 1}
    bf16 = {(r["case"], r["tp"], r["executor"]): r for r in ok if r["kv"] == "bf16"}
    for r in ok:
        base = tp1.get((r["key"], r["case"]))
        r["vs_tp1"] = value(r) / value(base) if base else None
        ref = bf16.get((r["case"], r["tp"], r["executor"]))
        r["vs_bf16"] = value(r) / value(ref) if ref else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp-sizes", default="1,2")
    ap.add_argument("--executors", default="mp", help="for TP > 1: mp, ray or mp,ray")
    ap.add_argument("--quick", action="store_true", help="batch 8 x 4K, 16 steps")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--cudagraph-sizes", default=None,
                    help="CUDA-graph capture sizes (default bench_e2e's list; batch 8 needs "
                         "only 1,2,4,8, which starts each engine faster)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=None)
    ap.add_argument("--log-dir", default="/tmp/bench_tp_logs")
    args = ap.parse_args(argv)
    args.tp_list = [int(x) for x in args.tp_sizes.split(",") if x]
    args.executor_list = [x for x in args.executors.split(",") if x]
    bad = [x for x in args.executor_list if x not in ("mp", "ray")]
    if bad:
        ap.error(f"unknown executor(s) {bad}; choose mp and/or ray")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    e2e_args = e2e.parse_args(["--steps", str(args.steps), "--gpu-memory-utilization",
                               str(args.gpu_memory_utilization)]
                              + (["--quick"] if args.quick else [])
                              + (["--cudagraph-sizes", args.cudagraph_sizes]
                                 if args.cudagraph_sizes else []))
    s = e2e.settings_from_args(e2e_args)
    gpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name() if gpus else "unknown"
    has_ray = importlib.util.find_spec("ray") is not None
    out = Path(args.out or Path(__file__).parent / "results" / f"tp_{gpu_slug(device)}.json")
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with e2e.llama_model_dir() as model:
        for key, tp, ex in runs_wanted(args.tp_list, args.executor_list):
            backend, kv, _ = e2e.BACKENDS[key]
            tag = dict(tp=tp, executor=ex)
            print(f"[{time.perf_counter() - t0:6.0f} s] {key} TP={tp} {ex}", flush=True)
            reason = None
            if tp > gpus:
                reason = f"TP={tp} needs {tp} GPUs, {gpus} present"
            elif ex == "ray" and not has_ray:
                reason = "Ray is not installed (device kit: WITH_RAY=1)"
            if reason is None:
                res, reason = e2e.run_logged(
                    tp_spec(key, tp, ex, model, s),
                    log_dir / f"{key.replace(':', '_')}_tp{tp}_{ex}.log", args.timeout)
                if res is not None:
                    res["decode_shapes"] = {"decode_b8_32k": (8, s["b8_context"])}
                    recs = e2e.records_from_result(key, CASES, res)
            if reason is not None:
                print(f"  skipped: {reason}", flush=True)
                recs = e2e.skipped_records(key, CASES, reason)
            for r in recs:
                r.update(tag)
            records += recs
            # written after every engine, so a run stopped by a time limit keeps its figures
            add_tp_ratios(records)
            doc = results_doc(device, gpus=gpus, model="llama3-8b-shape dummy weights "
                              "(32 layers, 32/8 heads, d=128)", settings=s, records=records)
            write_results(doc, out)
    print(f"{'backend':<11}{'kv':<6}{'tp':>3} {'exec':<5}{'case':<15}{'ms/step':>9}"
          f"{'tok/s':>9}{'KV tokens':>12}{'x TP1':>7}{'x bf16':>7}")
    for r in records:
        if r.get("skipped"):
            print(f"{r['backend']:<11}{r['kv']:<6}{r['tp']:>3} {r['executor']:<5}"
                  f"{r['case']:<15}skipped: {r['skipped'][:60]}")
            continue
        def f(v: Any, spec: str) -> str:
            return "-" if v is None else format(v, spec)
        print(f"{r['backend']:<11}{r['kv']:<6}{r['tp']:>3} {r['executor']:<5}{r['case']:<15}"
              f"{f(r.get('ms_per_step'), '.2f'):>9}{f(r.get('tokens_per_s'), ',.0f'):>9}"
              f"{f(r.get('kv_cache_tokens'), ',d'):>12}{f(r.get('vs_tp1'), '.2f'):>7}"
              f"{f(r.get('vs_bf16'), '.2f'):>7}")
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    recs = [r for r in doc["records"] if not r.get("skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (case, field, title) in zip(axes, (
            ("decode_b8_32k", "ms_per_step", "decode ms/step, B=8 x 32K (lower is better)"),
            ("capacity_32k", "kv_cache_tokens", "KV cache tokens")), strict=True):
        rows = [r for r in recs if r["case"] == case and r.get(field) is not None]
        ax.bar(range(len(rows)), [r[field] for r in rows],
               color=["tab:orange" if r["backend"] == "BITDECODE" else "tab:gray" for r in rows])
        ax.set_xticks(range(len(rows)), [f"{r['kv']}\nTP={r['tp']} {r['executor']}"
                                         for r in rows], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"Tensor parallel, Llama-3-8B shape - {doc['gpus']}x {doc['device']} "
                 f"({doc['date']}, {doc['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
