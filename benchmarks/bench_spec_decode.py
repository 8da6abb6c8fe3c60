"""Speculative decoding end to end: ms per generated token with and without n-gram drafts,
FLASH_ATTN bf16 against BITDECODE 4-bit, one run.

Llama-3-8B shape with dummy weights, CUDA graphs on, prefix caching on, the machinery of
bench_e2e.py: one engine per (backend, drafts), each timing batch 1 x 130,560 and batch
8 x 32,768 as bench_e2e's decode cases do: the decode span of 1 + 2N tokens less that of
1 + N, over N, median of 3 interleaved pairs (vllm_bitdecode.testing.engine_timing.time_decode), so
the first N tokens (and the steps before the proposer finds the forced token repeating)
cancel out and the window is steady speculative decoding (until 2026-12-01 the baseline
was t(1 token): two runs on that day gave 3.39 and 1.86 ms per token for one case, with
no change to its code path).
Dummy weights would make every draft wrong, so every request is forced to take one token
at every step (``allowed_token_ids``): once it repeats, vLLM's n-gram proposer drafts it
and its drafts are accepted (H200, 2026-12-01: all of them with the CPU proposer; the GPU
proposer made 22 / 176 drafts more, all rejected, with the same count accepted; the plot
says which). This is the best case of speculative decoding, the one where
the verification's cost shows most plainly: BITDECODE reads a request's 1 + drafts query
tokens beside its query heads and unpacks every page once for all of them
(docs/decode-kernel-notes.md item 7), FlashAttention-3 runs them as a varlen batch.
vLLM turns async scheduling off for its (CPU) n-gram proposer, so with `--method ngram`
every engine runs without it, the plain ones too; `--method ngram_gpu` (vLLM's n-gram
search on the GPU) keeps vLLM's default, async scheduling on, as bench_e2e.py runs.

    python benchmarks/bench_spec_decode.py            # bf16 and int4, 0 and 3 drafts
    python benchmarks/bench_spec_decode.py --method ngram_gpu   # async scheduling on
    python benchmarks/bench_spec_decode.py --quick    # B=1 at 32K, 16 tokens: a smoke run

Writes benchmarks/results/spec_decode_<gpu>.json (spec_decode_ngram_gpu_<gpu>.json with
`--method ngram_gpu`; device, date, commit, method, async_scheduling, settings,
``records``: backend, kv, drafts, case, batch, context, ms_per_token (per request),
ms_per_token_each (the same from each pair of runs: the spread), tokens_per_s (all
requests), draft_tokens and accepted_tokens (in the timed window of N tokens per
request, all requests, one pair's worth), graph_replays_per_token (CUDA-graph replays
per generated token of a request: one per engine step with full graphs, about one per
layer and step with piecewise ones), vs_no_drafts (tokens/s over the same backend
without drafts) and vs_bf16 (over FLASH_ATTN bf16 with as many drafts)) and a PNG beside
it.
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

KEYS = ("FLASH_ATTN:bf16", "BITDECODE:int4")
CASES = ["decode_b1_128k", "decode_b8_32k"]
# a token id that the random prompts (ids 100..29999) never hold, forced at every step
FORCED_TOKEN = 42
# CUDA-graph sizes in tokens: batch 8 with 3 drafts is 32 (vLLM rounds the sizes up to
# multiples of 1 + drafts for full decode graphs)
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32]
RECORD_KEYS = ("backend", "kv", "drafts", "case", "batch", "context", "ms_per_token",
               "tokens_per_s", "draft_tokens", "accepted_tokens", "graph_replays_per_token")


METHODS = ("ngram", "ngram_gpu")


def ngram_config(drafts: int, method: str = "ngram") -> dict[str, Any]:
    return dict(method=method, num_speculative_tokens=drafts, prompt_lookup_min=2,
                prompt_lookup_max=5)


def async_scheduling(method: str) -> bool:
    """Whether the engines of ``method`` schedule asynchronously: vLLM's default, except
    that its CPU n-gram proposer turns it off (and the plain engines follow, for one
    schedule with and without drafts)."""
    return method != "ngram"


def runs_wanted(drafts: int) -> list[tuple[str, int]]:
    """(backend key, drafts) for every engine; a backend's two engines side by side, so
    that a run cut short still holds complete comparisons."""
    return [(key, n) for key in KEYS for n in (0, drafts)]


def results_path(device: str, method: str) -> Path:
    """benchmarks/results/spec_decode_<gpu>.json, with the method in the name where it is
    not the CPU n-gram proposer (whose results came first)."""
    variant = "" if method == "ngram" else f"{method}_"
    return Path(__file__).parent / "results" / f"spec_decode_{variant}{gpu_slug(device)}.json"


def engine_spec(key: str, drafts: int, model: str, s: dict[str, Any],
                method: str = "ngram") -> dict[str, Any]:
    spec = e2e.engine_spec(key, model, CASES, s)
    spec.pop("_decode_shapes")
    spec["async_scheduling"] = async_scheduling(method)
    spec["compilation_config"] = {"cudagraph_capture_sizes": CAPTURE_SIZES}
    # full graph (one replay per engine step) or piecewise (about one per layer): which
    # one vLLM replays for the verification batches shows in graph_replays_per_token
    # (the count wraps CUDAGraph.replay in Python, about a microsecond per replay)
    spec["count_graph_replays"] = True
    for timing in spec["decode_timings"]:
        timing["forced_token"] = FORCED_TOKEN
    if drafts:
        spec["speculative_config"] = ngram_config(drafts, method)
    return spec


def _record(key: str, drafts: int, case: str, shapes: dict[str, tuple[int, int]],
            **fields: Any) -> dict[str, Any]:
    backend, kv, _ = e2e.BACKENDS[key]
    batch, context = shapes[case]
    rec: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    rec.update(backend=backend, kv=kv, drafts=drafts, case=case, key=key, batch=batch,
               context=context, **fields)
    return rec


def records_from_result(key: str, drafts: int, res: dict[str, Any],
                        shapes: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One record per decode case of an engine's result (vllm_bitdecode.testing's
    ``decode_timings``, whose ms_per_step is ms per generated token of a request)."""
    timings = {(t["batch"], t["context"]): t for t in res.get("decode_timings", [])}
    out = []
    for case in CASES:
        t = timings.get(shapes[case])
        if t is None:
            out.append(_record(key, drafts, case, shapes,
                               skipped="no timing in the engine's result"))
            continue
        ms = t["ms_per_step"]
        out.append(_record(key, drafts, case, shapes, ms_per_token=ms,
                           tokens_per_s=1000.0 * t["batch"] / ms, steps=t["steps"],
                           draft_tokens=t.get("draft_tokens"),
                           accepted_tokens=t.get("accepted_tokens"),
                           graph_replays_per_token=t.get("graph_replays_per_step"),
                           ms_per_token_each=t.get("ms_per_step_each"),
                           ms_per_token_wall_each=t.get("ms_per_step_wall_each"),
                           clock=t.get("clock")))
    return out


def skipped_records(key: str, drafts: int, shapes: dict[str, tuple[int, int]],
                    reason: str) -> list[dict[str, Any]]:
    return [_record(key, drafts, case, shapes, skipped=reason) for case in CASES]


def add_ratios(records: list[dict[str, Any]]) -> None:
    """vs_no_drafts: tokens/s over the same backend and case without drafts; vs_bf16:
    over FLASH_ATTN bf16 with as many drafts, same case."""
    ok = {(r["key"], r["drafts"], r["case"]): r for r in records
          if not r.get("skipped") and r.get("tokens_per_s")}
    for r in records:
        plain = ok.get((r["key"], 0, r["case"]))
        bf16 = ok.get(("FLASH_ATTN:bf16", r["drafts"], r["case"]))
        mine = ok.get((r["key"], r["drafts"], r["case"]))
        r["vs_no_drafts"] = mine["tokens_per_s"] / plain["tokens_per_s"] if mine and plain \
            else None
        r["vs_bf16"] = mine["tokens_per_s"] / bf16["tokens_per_s"] if mine and bf16 else None


def summary_table(records: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def spread(each: list[float] | None) -> str:  # the pairs' figures, lowest to highest
        return "-" if not each else f"{min(each):.2f}-{max(each):.2f}"

    lines = [f"{'backend':<11}{'kv':<6}{'drafts':>7} {'case':<16}{'ms/token':>9}"
             f"{'pairs':>12}{'tok/s':>9}{'accepted':>14}{'x no drafts':>12}{'x bf16':>8}"
             f"{'graphs/token':>13}"]
    for r in records:
        head = f"{r['backend']:<11}{r['kv']:<6}{r['drafts']:>7} {r['case']:<16}"
        if r.get("skipped"):
            lines.append(head + f"skipped: {r['skipped'][:70]}")
            continue
        accepted = "-" if r.get("draft_tokens") is None else \
            f"{r['accepted_tokens']:.0f}/{r['draft_tokens']:.0f}"
        lines.append(head + f"{f(r['ms_per_token'], '.2f'):>9}"
                     f"{spread(r.get('ms_per_token_each')):>12}{f(r['tokens_per_s'], ',.0f'):>9}"
                     f"{accepted:>14}{f(r.get('vs_no_drafts'), '.2f'):>12}"
                     f"{f(r.get('vs_bf16'), '.2f'):>8}"
                     f"{f(r.get('graph_replays_per_token'), '.2f'):>13}")
    return "\n".join(lines)


def acceptance(records: list[dict[str, Any]]) -> str:
    """The drafts' fate over the records, as measured: "every draft accepted" or
    "accepted A of D drafts" (the forced token makes every draft right that lands inside
    a request; vLLM's GPU proposer under async scheduling also makes some that do not)."""
    drafted = [r for r in records if r.get("draft_tokens")]
    if not drafted:
        return "no drafts measured"
    total = sum(r["draft_tokens"] for r in drafted)
    accepted = sum(r["accepted_tokens"] or 0 for r in drafted)
    return "every draft accepted" if accepted == total else \
        f"accepted {accepted:.0f} of {total:.0f} drafts"


def plot(doc: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    recs = [r for r in doc["records"] if not r.get("skipped")]
    fig, axes = plt.subplots(1, len(CASES), figsize=(10, 4))
    for ax, case in zip(axes, CASES, strict=True):
        rows = [r for r in recs if r["case"] == case]
        ax.bar(range(len(rows)), [r["ms_per_token"] for r in rows],
               color=["tab:orange" if r["backend"] == "BITDECODE" else "tab:gray"
                      for r in rows])
        ax.set_xticks(range(len(rows)), [f"{r['kv']}\n{r['drafts']} drafts" for r in rows],
                      fontsize=8)
        batch, context = (rows[0]["batch"], rows[0]["context"]) if rows else (0, 0)
        ax.set_title(f"ms per generated token, B={batch} x {context:,} (lower is better)",
                     fontsize=9)
    how = "n-gram drafts" if doc.get("method", "ngram") == "ngram" else \
        "GPU n-gram drafts, async scheduling"
    save_figure(fig, path, f"{how}, {acceptance(recs)} (forced token), Llama-3-8B shape",
                doc)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafts", type=int, default=3, help="n-gram drafts per step")
    ap.add_argument("--method", choices=METHODS, default="ngram",
                    help="vLLM's n-gram proposer on the CPU (async scheduling off) or on "
                         "the GPU (async scheduling on)")
    ap.add_argument("--quick", action="store_true", help="B=1 at 32K, 16 tokens")
    ap.add_argument("--steps", type=int, default=64, help="tokens timed per request")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine")
    ap.add_argument("--out", default=None)
    ap.add_argument("--log-dir", default="/tmp/bench_spec_decode_logs")
    ap.add_argument("--dry-run", action="store_true", help="print the engine specs and exit")
    args = ap.parse_args(argv)
    if args.drafts < 1:
        ap.error("--drafts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s, shapes = e2e.decode_settings(args.steps, args.gpu_memory_utilization, args.quick,
                                    CASES)
    if args.dry_run:
        for key, drafts in runs_wanted(args.drafts):
            print(key, drafts, engine_spec(key, drafts, "<model-dir>", s, args.method))
        return
    device = e2e.device_name()
    out = Path(args.out) if args.out else results_path(device, args.method)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with e2e.llama_model_dir() as model:
        for key, drafts in runs_wanted(args.drafts):
            print(f"[{time.perf_counter() - t0:6.0f} s] {key}, {drafts} drafts", flush=True)
            res, failure = e2e.run_logged(engine_spec(key, drafts, model, s, args.method),
                                          log_dir / f"{key.replace(':', '_')}_{drafts}.log",
                                          args.timeout)
            if res is None:
                print(f"  skipped: {failure}", flush=True)
                records += skipped_records(key, drafts, shapes, failure)
            else:
                records += records_from_result(key, drafts, res, shapes)
            # written after every engine, so a run stopped by a time limit keeps its figures
            add_ratios(records)
            doc = results_doc(device, model="llama3-8b-shape dummy weights (32 layers, "
                              "32/8 heads, d=128)", forced_token=FORCED_TOKEN,
                              method=args.method,
                              async_scheduling=async_scheduling(args.method),
                              speculative=ngram_config(args.drafts, args.method),
                              settings=s, records=records)
            write_results(doc, out)
    print(summary_table(records))
    if plot(doc, out.with_suffix(".png")):
        print(f"plot: {out.with_suffix('.png')}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
