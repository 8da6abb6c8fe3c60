"""Where a decode step's time goes, FLASH_ATTN bf16 against BITDECODE 4-bit, one run.

bench_e2e.py gives whole steps (Llama-3-8B shape, dummy weights, CUDA graphs, prefix
caching): at 8 x 32K an H200 took 12.60 ms with bf16 KV and 7.64 ms with 4-bit KV
(2026-12-01), and issue #4 asks for 2.0x. This script splits each backend's step into its
GPU kernels (vllm_bitdecode.step_profile: CUPTI through torch.profiler, the steady-state
window of the decode timing) and sums them by what they do: attention, the combine of
split attention, the KV-cache write, GEMMs, torch.compile's fused elementwise kernels,
copies, other PyTorch ops. Beside the kernels: the step's wall time from the same
engine's decode timing (without the profiler), and GPU busy time, so that
``host_gap_ms`` = wall - busy is the time the GPU waits for the host.

One engine per backend, each timing and profiling batch 1 x 130,560 and 8 x 32,768
(``--shapes`` names others, e.g. the batch of issue #4's throughput load):

    python benchmarks/bench_step_breakdown.py                 # bf16 and int4: two engines
    python benchmarks/bench_step_breakdown.py --backends bf16,fp8,int4,int2
    python benchmarks/bench_step_breakdown.py --quick         # B=1 at 32K, a smoke run
    python benchmarks/bench_step_breakdown.py --backends int4 --shapes 192x6144

Writes benchmarks/results/step_breakdown_<gpu>.json (device, date, commit, settings,
``records``: backend, kv, case, batch, context, ms_per_step (wall, from the decode
timing), gpu_in_long_runs (the GPU's SM clock, power and reasons for a lowered clock
while the decode timing ran, as in bench_e2e.py), gpu_busy_ms, kernel_ms (the kernels'
own times summed; above busy where kernels overlap), host_gap_ms, categories_ms (busy
time per category, overlap given to the kernel that started first, so they sum to
gpu_busy_ms), launches (kernels per step), top_kernels (name, category, ms as
attributed, span_ms, launches per step)) and a PNG of
stacked bars beside it.

The first run (H200, 2026-12-01, 456a070,
``benchmarks/results/step_breakdown_456a070_h200.json``) summed each kernel's own time
per category: BITDECODE's combine then showed 1.6-2.8 ms
per step, nearly all of it spent waiting beside the decode kernel it depends on (its
kernel_ms exceeded the busy time by 1.5-2.7 ms).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e as e2e  # noqa: E402

from vllm_bitdecode.provenance import (  # noqa: E402
    gpu_slug,
    pyplot,
    results_doc,
    save_figure,
    write_results,
)
from vllm_bitdecode.step_profile import CATEGORY_NAMES  # noqa: E402

CASES = ["decode_b1_128k", "decode_b8_32k"]
RECORD_KEYS = ("backend", "kv", "case", "batch", "context", "ms_per_step", "gpu_busy_ms",
               "kernel_ms", "host_gap_ms", "categories_ms", "launches", "top_kernels")
COLORS = {"attention": "tab:orange", "attention combine": "tab:red",
          "KV-cache write": "tab:purple", "GEMM": "tab:blue",
          "compiled elementwise (torch.compile)": "tab:green", "copies and fills": "tab:olive",
          "other PyTorch ops": "tab:cyan", "other": "tab:gray"}


def parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    """``"192x6144,64x8192"`` -> {"decode_192x6144": (192, 6144), ...}."""
    shapes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            batch, context = (int(n) for n in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r} is not <batch>x<context>, e.g. 192x6144") from None
        if batch < 1 or context < 1:
            raise ValueError(f"shape {item!r}: batch and context must be positive")
        shapes[f"decode_{batch}x{context}"] = (batch, context)
    if not shapes:
        raise ValueError("no shape given")
    return shapes


def engine_spec(key: str, model: str, s: dict[str, Any], profile_steps: int,
                shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """bench_e2e's engine for ``key``, timing each (batch, context) of ``shapes`` and
    profiling it."""
    spec = e2e.engine_spec(key, model, [], s)
    spec.pop("_decode_shapes")
    spec["decode_timings"] = [dict(batch=b, context=c, steps=s["steps"])
                              for b, c in shapes.values()]
    spec["decode_profiles"] = [dict(batch=b, context=c, steps=profile_steps)
                               for b, c in shapes.values()]
    return spec


def _record(key: str, case: str, **fields: Any) -> dict[str, Any]:
    backend, kv, _ = e2e.BACKENDS[key]
    rec: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    rec.update(backend=backend, kv=kv, case=case, key=key, **fields)
    return rec


def records_from_result(key: str, res: dict[str, Any],
                        shapes: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One record per case: the engine's decode timing beside its profile."""
    timings = {(t["batch"], t["context"]): t for t in res.get("decode_timings", [])}
    profiles = {(p["batch"], p["context"]): p for p in res.get("decode_profiles", [])}
    out = []
    for case, shape in shapes.items():
        t, p = timings.get(shape), profiles.get(shape)
        if t is None or p is None:
            out.append(_record(key, case, batch=shape[0], context=shape[1],
                               skipped="no timing or profile in the engine's result"))
            continue
        out.append(_record(
            key, case, batch=shape[0], context=shape[1], ms_per_step=t["ms_per_step"],
            ms_per_step_each=t.get("ms_per_step_each"), clock=t.get("clock"),
            ms_per_step_wall_each=t.get("ms_per_step_wall_each"),
            gpu_in_long_runs=t.get("gpu_in_long_runs"), gpu_busy_ms=p["gpu_busy_ms"],
            kernel_ms=p["kernel_ms"], host_gap_ms=t["ms_per_step"] - p["gpu_busy_ms"],
            categories_ms=p["categories_ms"], launches=p["launches"],
            top_kernels=p["top_kernels"], profile_steps=p["steps"]))
    return out


def summary_table(records: list[dict[str, Any]]) -> str:
    """Per record: wall, busy and host gap, then the categories (ms per step)."""
    short = {"compiled elementwise (torch.compile)": "compiled", "copies and fills": "copies",
             "other PyTorch ops": "torch ops", "attention combine": "combine",
             "KV-cache write": "KV write"}
    cats = [short.get(c, c) for c in CATEGORY_NAMES]
    lines = [f"{'backend':<11}{'kv':<6}{'case':<16}{'wall':>7}{'busy':>7}{'gap':>7}"
             + "".join(f"{c:>11}" for c in cats)]
    for r in records:
        head = f"{r['backend']:<11}{r['kv']:<6}{r['case']:<16}"
        if r.get("skipped"):
            lines.append(head + f"skipped: {r['skipped'][:80]}")
            continue
        lines.append(head + f"{r['ms_per_step']:>7.2f}{r['gpu_busy_ms']:>7.2f}"
                     f"{r['host_gap_ms']:>7.2f}"
                     + "".join(f"{r['categories_ms'][c]:>11.3f}" for c in CATEGORY_NAMES))
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    recs = [r for r in doc["records"] if not r.get("skipped")]
    cases = list(dict.fromkeys(r["case"] for r in doc["records"]))
    fig, axes = plt.subplots(1, len(cases), figsize=(7 * len(cases), 4), squeeze=False)
    axes = axes[0]
    for ax, case in zip(axes, cases, strict=True):
        rows = [r for r in recs if r["case"] == case]
        for i, r in enumerate(rows):
            left = 0.0
            for cat in CATEGORY_NAMES:
                ms = max(r["categories_ms"][cat], 0.0)
                ax.barh(i, ms, left=left, color=COLORS[cat],
                        label=cat if i == 0 else None)
                left += ms
            ax.plot([r["ms_per_step"]] * 2, [i - 0.45, i + 0.45], color="black", lw=2,
                    label="wall time per step" if i == 0 else None)
        ax.set_yticks(range(len(rows)), [f"{r['backend']}\n{r['kv']}" for r in rows],
                      fontsize=8)
        batch, context = (rows[0]["batch"], rows[0]["context"]) if rows else (0, 0)
        ax.set_xlabel("ms per decode step")
        ax.set_title(f"B={batch} x {context:,}: GPU time by kernel category", fontsize=9)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path, "Decode step breakdown, Llama-3-8B shape, CUDA graphs", doc)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="bf16,int4",
                    help="a comma list of " + ", ".join(e2e.BACKENDS) + " or their kv part")
    ap.add_argument("--quick", action="store_true", help="B=1 at 32K, 16 steps")
    ap.add_argument("--shapes", default=None,
                    help="decode shapes to time and profile instead of 1 x 130560 and "
                    "8 x 32768: a comma list of <batch>x<context>, e.g. 192x6144")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per case")
    ap.add_argument("--profile-steps", type=int, default=16,
                    help="decode steps profiled per case (the window of 1 + n to 1 + 2n)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine")
    ap.add_argument("--out", default=None)
    ap.add_argument("--log-dir", default="/tmp/bench_step_breakdown_logs")
    ap.add_argument("--dry-run", action="store_true", help="print the engine specs and exit")
    args = ap.parse_args(argv)
    try:
        args.backend_keys = e2e.resolve_backends(args.backends)
    except ValueError as err:
        ap.error(str(err))
    if not args.backend_keys:
        ap.error("no backend selected")
    if args.profile_steps < 1:
        ap.error("--profile-steps must be at least 1")
    try:
        args.shape_cases = parse_shapes(args.shapes) if args.shapes is not None else None
    except ValueError as err:
        ap.error(str(err))
    if args.shape_cases and args.quick:
        ap.error("--quick shortens the default shapes; give short --shapes instead")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.shape_cases:  # as many requests a step as the largest batch
        shapes = args.shape_cases
        s, _ = e2e.decode_settings(args.steps, args.gpu_memory_utilization, False, [],
                                   max_num_seqs=max(8, *(b for b, _ in shapes.values())))
    else:
        s, shapes = e2e.decode_settings(args.steps, args.gpu_memory_utilization, args.quick,
                                        CASES)
    s["profile_steps"] = args.profile_steps
    if args.dry_run:
        for key in args.backend_keys:
            print(key, engine_spec(key, "<model-dir>", s, args.profile_steps, shapes))
        return
    device = e2e.device_name()
    out = Path(args.out) if args.out else \
        Path(__file__).parent / "results" / f"step_breakdown_{gpu_slug(device)}.json"
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with e2e.llama_model_dir() as model:
        for key in args.backend_keys:
            print(f"[{time.perf_counter() - t0:6.0f} s] {key}", flush=True)
            res, failure = e2e.run_logged(engine_spec(key, model, s, args.profile_steps,
                                                      shapes),
                                          log_dir / f"{key.replace(':', '_')}.log",
                                          args.timeout)
            if res is None:
                print(f"  skipped: {failure}", flush=True)
                records += [_record(key, case, batch=b, context=c, skipped=failure)
                            for case, (b, c) in shapes.items()]
            else:
                records += records_from_result(key, res, shapes)
            # written after every engine, so a run stopped by a time limit keeps its figures
            doc = results_doc(device, model="llama3-8b-shape dummy weights (32 layers, "
                              "32/8 heads, d=128)", settings=s, records=records)
            write_results(doc, out)
    print(summary_table(records))
    if plot(doc, out.with_suffix(".png")):
        print(f"plot: {out.with_suffix('.png')}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
