"""Summarise Nsight Compute text reports of the decode kernels (scripts/profile_decode.sh).

``ncu --print-details all`` writes several hundred lines per kernel launch; what the kernel
notes and an issue's closing note need is a dozen numbers per launch: duration, DRAM
throughput, issue-slot use, executed instructions and the top stall reasons. This tool
pulls them out of one or more reports into a table and, with ``--out``, a JSON file:

    python tools/ncu_summary.py /tmp/bitdecode-out/ncu_decode_8x131072_b16.txt
    python tools/ncu_summary.py a.txt b.txt --out benchmarks/results/ncu_decode_h200.json \\
        --label a.txt=81e1f68 --label b.txt=7ea530b

Each launch becomes one record: the kernel's name (template arguments shortened), the
grid, and the metrics below where the report has them (``None`` where it has not).
Nsight Compute locks the SM clock (1.3-1.4 GHz on an H200) and flushes the caches, so its
durations run above plain timings; compare reports with each other.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import date
from pathlib import Path

# report line name -> record key
METRICS = {
    "SM Frequency": "sm_ghz",
    "Duration": "duration_us",
    "DRAM Throughput": "dram_pct",
    "Issue Slots Busy": "issue_slots_busy_pct",
    "Executed Ipc Active": "ipc_active",
    "Executed Instructions": "executed_instructions",
    "Registers Per Thread": "registers",
    "Achieved Occupancy": "achieved_occupancy_pct",
    "Stall Wait": "stall_wait",
    "Stall Not Selected": "stall_not_selected",
    "Stall Math Pipe Throttle": "stall_math_pipe_throttle",
    "Stall Long Scoreboard": "stall_long_scoreboard",
    "Stall Short Scoreboard": "stall_short_scoreboard",
    "Stall Barrier": "stall_barrier",
}

# "  void decode_kernel<...>(DecodeParams) (8, 8, 8)x(128, 1, 1), Context 1, ..."
_LAUNCH = re.compile(r"^  (?:void )?(\w+)(<[^\n]*?>)?\([^)]*\) \(([\d, ]+)\)x\(([\d, ]+)\)", re.M)


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_report(text: str) -> list[dict]:
    """One record per kernel launch in an ``ncu --print-details all`` text report."""
    heads = list(_LAUNCH.finditer(text))
    records = []
    for k, head in enumerate(heads):
        body = text[head.end():heads[k + 1].start() if k + 1 < len(heads) else len(text)]
        record: dict = {
            "kernel": head.group(1),
            "template": (head.group(2) or "").strip("<>"),
            "grid": [int(x) for x in head.group(3).split(",")],
            "block": [int(x) for x in head.group(4).split(",")],
        }
        for name, key in METRICS.items():
            # "    Duration                         us       446.53": the value ends the line
            m = re.search(rf"^\s+{re.escape(name)}\s+(?:\S+\s+)?([\d.,]+)\s*$", body, re.M)
            record[key] = _number(m.group(1)) if m else None
        records.append(record)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="write the records as JSON here")
    ap.add_argument("--label", action="append", default=[],
                    help="REPORT=LABEL (e.g. the commit profiled), repeatable")
    ap.add_argument("--device", default=None, help="the GPU, for the JSON")
    args = ap.parse_args()
    labels = dict(item.split("=", 1) for item in args.label)
    records = []
    for path in args.reports:
        for r in parse_report(path.read_text(errors="replace")):
            r["report"] = path.name
            r["label"] = labels.get(path.name, labels.get(str(path)))
            records.append(r)
    for r in records:
        print(f"{r['label'] or r['report']}: {r['kernel']}<{r['template']}> grid {r['grid']}: "
              f"{r['duration_us']} us, DRAM {r['dram_pct']}%, issue {r['issue_slots_busy_pct']}%, "
              f"{r['executed_instructions']} instructions, stalls wait {r['stall_wait']} "
              f"/ not selected {r['stall_not_selected']} / math {r['stall_math_pipe_throttle']}")
    if args.out:
        summary = {"device": args.device, "date": date.today().isoformat(),
                   "tool": "ncu --print-details all (scripts/profile_decode.sh)",
                   "records": records}
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
