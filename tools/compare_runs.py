"""Compare benchmark runs of two trees, row by row: does a change move a time beyond the
runs' own spread?

An A/B here (docs/patches/README.md) runs the tree without a change and the tree with it
in one lease, each side one or more times, and writes a `bench_decode.py` or
`bench_sparse.py` JSON per run. This tool lines the runs' rows up by what they measure
(batch, context, kernel, bits, budget, splits, ...), prints each side's times and the
change of their medians, and says of each row:

- ``faster`` / ``slower``: every run of one side beats every run of the other (two or
  more runs a side);
- ``within spread``: the two sides' ranges overlap;
- ``one run``: a side has a single run, so there is no spread to judge by; the change is
  printed, the verdict is left to the reader.

    python tools/compare_runs.py --base main.json main_run2.json --new with.json with_run2.json
    python tools/compare_runs.py --base a.json --new b.json --metric ms --rows "sparse-pages"

The metric is the time in a step of layers (``ms_in_step``, bench_sparse's ``--layers``)
where a row has one, else the time of one call or graph replay (``ms``); ``--metric``
picks one, and ``span`` is the kernels' GPU span (``--kernels``). Times print in us.
Rows that only one side has are listed after the table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# what a record measures (the row), as against what it measured
IDENTITY = ("batch", "context", "impl", "kind", "kv", "k_mode", "budget", "num_splits",
            "min_tiles_per_split", "granularity")
# file-level settings that must agree for rows to be comparable
SETTINGS = ("heads", "block_size", "group_size", "dtype", "bits", "layers_in_step")
METRICS = ("auto", "ms", "ms_in_step", "span")

RowKey = tuple[tuple[str, Any], ...]


def records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A results file's records: bench_decode's flat ``records``, or bench_sparse's
    ``cases[].records`` (each given its case's batch and context)."""
    if "cases" in doc:
        return [{"batch": case["batch"], "context": case["context"], **rec}
                for case in doc["cases"] for rec in case["records"]]
    if "records" in doc:
        return list(doc["records"])
    raise ValueError("not a bench_decode or bench_sparse results file (no cases or records)")


def row_key(rec: dict[str, Any]) -> RowKey:
    return tuple((k, rec[k]) for k in IDENTITY if rec.get(k) is not None)


def metric_us(rec: dict[str, Any], metric: str) -> float | None:
    """The record's time in us by ``metric`` (None where it has none)."""
    if metric == "auto":
        metric = "ms_in_step" if rec.get("ms_in_step") is not None else "ms"
    if metric == "span":
        span = (rec.get("kernels_us") or {}).get("span")
        return None if span is None else float(span)
    value = rec.get(metric)
    return None if value is None else float(value) * 1e3


def label(key: RowKey) -> str:
    f = dict(key)
    ctx = f.get("context")
    parts = [f"{f['batch']} x {ctx // 1024}K" if ctx and ctx % 1024 == 0 else
             f"{f.get('batch')} x {ctx}"]
    parts += [str(f[k]) for k in ("impl", "kind", "kv", "k_mode") if k in f]
    if "budget" in f:
        parts.append(f"k = {f['budget']}")
    if "granularity" in f:
        parts.append(str(f["granularity"]))
    if "num_splits" in f:
        parts.append(f"{f['num_splits']} splits")
    return " ".join(parts)


@dataclass
class Row:
    key: RowKey
    base: list[float]
    new: list[float]

    @property
    def change_us(self) -> float:
        return statistics.median(self.new) - statistics.median(self.base)

    @property
    def change_rel(self) -> float:
        return self.change_us / statistics.median(self.base)

    @property
    def verdict(self) -> str:
        if len(self.base) < 2 or len(self.new) < 2:
            return "one run"
        if max(self.new) < min(self.base):
            return "faster"
        if min(self.new) > max(self.base):
            return "slower"
        return "within spread"


def _side(paths: list[Path], metric: str) -> tuple[dict[RowKey, list[float]], dict[str, Any]]:
    """Each row's times over a side's runs (in the order given), and the side's settings."""
    times: dict[RowKey, list[float]] = {}
    settings: dict[str, Any] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        for name in SETTINGS:
            if name in doc:
                settings.setdefault(name, set()).add(json.dumps(doc[name], sort_keys=True))
        seen: set[RowKey] = set()
        for rec in records(doc):
            key, value = row_key(rec), metric_us(rec, metric)
            if value is None:
                continue
            if key in seen:
                raise ValueError(f"{path}: two records measure {label(key)}")
            seen.add(key)
            times.setdefault(key, []).append(value)
    return times, settings


def compare(base: list[Path], new: list[Path], metric: str = "auto",
            rows: str | None = None) -> tuple[list[Row], list[str], list[str]]:
    """The rows both sides measured (in the first base file's order), the labels of rows
    only one side has, and warnings (settings that differ between the files)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    base_times, base_settings = _side(base, metric)
    new_times, new_settings = _side(new, metric)
    warnings = []
    for name in SETTINGS:
        values = base_settings.get(name, set()) | new_settings.get(name, set())
        if len(values) > 1:
            warnings.append(f"the files differ in {name}: {sorted(values)}")
    pattern = re.compile(rows) if rows else None
    keep = (lambda k: pattern.search(label(k)) is not None) if pattern else (lambda k: True)
    both = [Row(k, base_times[k], new_times[k]) for k in base_times
            if k in new_times and keep(k)]
    only = [f"{label(k)} (base only)" for k in base_times if k not in new_times and keep(k)]
    only += [f"{label(k)} (new only)" for k in new_times if k not in base_times and keep(k)]
    return both, only, warnings


def markdown(rows: list[Row]) -> str:
    def times(values: list[float]) -> str:
        return " / ".join(f"{v:.2f}" for v in values)

    lines = ["| row | base, us | new, us | change of medians | verdict |",
             "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {label(r.key)} | {times(r.base)} | {times(r.new)} | "
                     f"{r.change_us:+.2f} us ({100 * r.change_rel:+.1f}%) | {r.verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="+", type=Path, required=True,
                    help="results files of the tree without the change, one per run")
    ap.add_argument("--new", nargs="+", type=Path, required=True,
                    help="results files of the tree with it, one per run")
    ap.add_argument("--metric", choices=METRICS, default="auto")
    ap.add_argument("--rows", help="only rows whose label matches this regular expression")
    args = ap.parse_args(argv)
    rows, only, warnings = compare(args.base, args.new, args.metric, args.rows)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(markdown(rows))
    counts = {v: sum(r.verdict == v for r in rows)
              for v in ("faster", "slower", "within spread", "one run")}
    print("\n" + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
    if only:
        print("measured on one side only: " + "; ".join(only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
