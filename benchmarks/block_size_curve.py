"""Decode time against block size, from several ``bench_decode.py`` runs (one per size).

The runs are taken one block size at a time on the GPU machine::

    for b in 16 32 64 128; do
      python3 benchmarks/bench_decode.py --channel-k --batches 8 --contexts 131072 \\
        --block-size $b --out /tmp/decode_b$b.json
    done

and merged here (no GPU needed) into one JSON and a PNG: milliseconds per KV format and
block size, with an optional second set (``--before``) from an older commit drawn dashed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_bitdecode.provenance import write_results


def curve(paths: list[str]) -> dict:
    """``{"commit", "device", "date", "points": {kv: {block_size: ms}}, "runs"}``; kv is
    the record's format, ``-kc`` appended for per-channel K."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    points: dict[str, dict[int, float]] = {}
    for run in runs:
        for r in run["records"]:
            if r["impl"] == "bitdecode":
                kv = r["kv"] + ("-kc" if r.get("k_mode") == "channel" else "")
                points.setdefault(kv, {})[run["block_size"]] = r["ms"]
    first = runs[0]
    return {"device": first["device"], "date": first["date"], "commit": first["commit"],
            "case": {k: first["records"][0][k] for k in ("batch", "context")},
            "points": points, "runs": runs}


def plot(after: dict, before: dict | None, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (kv, pts) in enumerate(sorted(after["points"].items())):
        sizes = sorted(pts)
        ax.plot(sizes, [pts[s] for s in sizes], "o-", color=f"C{i}",
                label=f"{kv} ({after['commit']})")
        if before and kv in before["points"]:
            old = before["points"][kv]
            ax.plot(sorted(old), [old[s] for s in sorted(old)], "x--", color=f"C{i}",
                    alpha=0.6, label=f"{kv} ({before['commit']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks([16, 32, 64, 128], ["16", "32", "64", "128"])
    ax.set_xlabel("block size (tokens per page)")
    ax.set_ylabel("decode, ms")
    case = after["case"]
    ax.set_title(f"B={case['batch']}, L={case['context']}, {after['device']}, {after['date']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="bench_decode JSONs, one per size")
    ap.add_argument("--before", nargs="*", default=None, help="the same from an older commit")
    ap.add_argument("--out", required=True, help="merged JSON; the PNG goes next to it")
    args = ap.parse_args()
    after = curve(args.runs)
    before = curve(args.before) if args.before else None
    merged = dict(after, before={k: before[k] for k in ("commit", "points")} if before else None)
    out = Path(args.out)
    write_results(merged, out)
    plot(after, before, out.with_suffix(".png"))
    for kv, pts in sorted(after["points"].items()):
        row = "  ".join(f"b{s} {ms:.3f}" for s, ms in sorted(pts.items()))
        print(f"{kv:8s} {row}")


if __name__ == "__main__":
    main()
