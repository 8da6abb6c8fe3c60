"""Throughput against the number of requests, from ``bench_e2e.py`` throughput runs.

Each input is one ``bench_e2e.py --cases throughput`` JSON whose engines ran in one lease,
one file per request count, all with the same prompt and output lengths. The committed
H200 curve (2K in / 8K out) is drawn from::

    python benchmarks/request_sweep_curve.py --runs \\
        benchmarks/results/e2e_decode_heavy_channel_h200.json \\
        benchmarks/results/e2e_cache_filling_same_lease_h200.json \\
        benchmarks/results/e2e_requests_256_same_lease_run2_h200.json \\
        --out benchmarks/results/e2e_request_sweep_h200.json

No GPU is needed. Ratios against bf16 and fp8 (issue #4's two throughput targets) are
only taken between engines of the same file (the same lease): a file without a bf16 (or
fp8) engine adds tokens/s but no ratio to it. The PNG next to the JSON shows tokens/s and
the ratios to bf16 and fp8 against the request count, with the number of full-length
requests each cache holds marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vllm_bitdecode.provenance import pyplot, results_doc, save_figure, write_results

BASELINES = {"vs_bf16": "FLASH_ATTN:bf16", "vs_fp8": "FLASH_ATTN:fp8"}


def sweep(paths: list[str]) -> dict[str, Any]:
    """One results document: a record per (request count, engine) with its tokens/s, its
    ratios to the same file's bf16 and fp8 (None where that file lacks the engine),
    preemptions, cache size and the file, date and commit it came from."""
    runs = [(p, json.loads(Path(p).read_text())) for p in paths]
    devices = {doc["device"] for _, doc in runs}
    if len(devices) != 1:
        raise ValueError(f"runs from more than one GPU: {sorted(devices)}")
    lengths: set[tuple[int, int]] = set()
    records: list[dict[str, Any]] = []
    seen: dict[tuple[int, str], str] = {}
    for path, doc in runs:
        rows = [r for r in doc["records"] if r["case"] == "throughput"]
        if not rows:
            raise ValueError(f"{path}: no throughput records")
        bases = {field: next((r["tokens_per_s"] for r in rows if r["key"] == key), None)
                 for field, key in BASELINES.items()}
        for r in rows:
            lengths.add((r["input_len"], r["output_len"]))
            point = (r["batch"], r["key"])
            if point in seen:
                raise ValueError(f"{r['key']} at {r['batch']} requests is in both "
                                 f"{seen[point]} and {path}; keep one")
            seen[point] = path
            records.append({
                "requests": r["batch"], "key": r["key"], "tokens_per_s": r["tokens_per_s"],
                **{field: r["tokens_per_s"] / base if base else None
                   for field, base in bases.items()},
                "num_preemptions": r.get("num_preemptions"),
                "kv_cache_tokens": r["kv_cache_tokens"],
                "source": Path(path).name, "date": doc["date"], "commit": doc["commit"],
            })
    if len(lengths) != 1:
        raise ValueError(f"runs with different prompt/output lengths: {sorted(lengths)}")
    (input_len, output_len), = lengths
    records.sort(key=lambda r: (r["key"], r["requests"]))
    return results_doc(devices.pop(), case={"input_len": input_len, "output_len": output_len},
                       ratios="within one file (one lease) only", records=records)


def plot(doc: dict[str, Any], png: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    full_length = doc["case"]["input_len"] + doc["case"]["output_len"]
    keys = sorted({r["key"] for r in doc["records"]})
    most_requests = max(r["requests"] for r in doc["records"])
    for i, key in enumerate(keys):
        rows = [r for r in doc["records"] if r["key"] == key]
        color = f"C{i}"
        left.plot([r["requests"] for r in rows], [r["tokens_per_s"] for r in rows], "o-",
                  color=color, label=key)
        rated = [r for r in rows if r["vs_bf16"] is not None]
        right.plot([r["requests"] for r in rated], [r["vs_bf16"] for r in rated], "o-",
                   color=color, label=key)
        for r in rated:
            right.annotate(f"{r['vs_bf16']:.2f}x", (r["requests"], r["vs_bf16"]),
                           textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        # against fp8, where the lease had it: the engines that are not a baseline
        against_fp8 = [r for r in rows if r["vs_fp8"] is not None]
        if key not in BASELINES.values() and against_fp8:
            right.plot([r["requests"] for r in against_fp8], [r["vs_fp8"] for r in against_fp8],
                       "s--", color=color, alpha=0.6, label=f"{key} / fp8")
            for r in against_fp8:
                right.annotate(f"{r['vs_fp8']:.2f}x", (r["requests"], r["vs_fp8"]),
                               textcoords="offset points", xytext=(0, -11), ha="center",
                               fontsize=7)
        # The cache's size in full-length requests: where that engine starts to preempt.
        held = rows[-1]["kv_cache_tokens"] / full_length
        if held < most_requests:
            left.axvline(held, color=color, ls=":", alpha=0.7)
            left.annotate(f"{key} cache: {held:.1f} full-length requests", (held, 0),
                          textcoords="offset points", xytext=(3, 4), rotation=90, fontsize=7,
                          color=color)
    right.axhline(2.5, color="k", ls="--", lw=0.8, label="issue #4 target, 2.5x bf16")
    right.axhline(1.5, color="k", ls=":", lw=0.8, label="issue #4 target, 1.5x fp8")
    left.set_ylabel("tokens/s (prompt + output)")
    right.set_ylabel("same-lease ratio: / bf16 (solid), / fp8 (dashed)")
    for ax in (left, right):
        ax.set_xlabel("requests")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    # room above the highest ratio for the legend, in two columns
    highest = max(r["vs_bf16"] or 0.0 for r in doc["records"])
    right.set_ylim(top=1.35 * highest)
    right.legend(fontsize=7, ncol=2, loc="upper left")
    left.set_ylim(bottom=0)
    case = doc["case"]
    save_figure(fig, png, f"vLLM throughput, {case['input_len']} in / {case['output_len']} "
                "out per request", doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True,
                    help="bench_e2e throughput JSONs, one per request count")
    ap.add_argument("--out", required=True, help="the curve's JSON; the PNG goes next to it")
    args = ap.parse_args()
    doc = sweep(args.runs)
    out = Path(args.out)
    write_results(doc, out)
    plot(doc, out.with_suffix(".png"))
    for r in doc["records"]:
        ratios = [f"{r[field]:.2f}x {field[3:]}" if r[field] is not None else "-"
                  for field in BASELINES]
        print(f"{r['key']:24s} {r['requests']:4d} requests  {r['tokens_per_s']:9,.0f} tokens/s"
              f"  {ratios[0]:11s} {ratios[1]:10s} {r['source']}")


if __name__ == "__main__":
    main()
