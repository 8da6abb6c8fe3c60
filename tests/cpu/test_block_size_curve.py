"""benchmarks/block_size_curve.py: runs of bench_decode at several block sizes, merged."""

from __future__ import annotations

import json
import sys

from tests.scripts import load_script

curve_tool = load_script("benchmarks/block_size_curve.py")


def _run(path, block_size, commit, ms):
    """A bench_decode JSON with one FA3 record and a per-token and a channel 4-bit one."""
    records = [
        {"impl": "fa3", "kv": "bf16", "ms": 1.0, "batch": 8, "context": 131072},
        {"impl": "bitdecode", "kv": "int4", "k_mode": "token", "ms": ms[0], "batch": 8,
         "context": 131072},
        {"impl": "bitdecode", "kv": "int4", "k_mode": "channel", "ms": ms[1], "batch": 8,
         "context": 131072},
    ]
    path.write_text(json.dumps({"device": "GPU", "date": "2026-11-30", "commit": commit,
                                "block_size": block_size, "records": records}))
    return str(path)


def test_points_per_format_and_block_size(tmp_path, monkeypatch):
    runs = [_run(tmp_path / f"a{b}.json", b, "new", (0.3516 if b == 16 else 0.3564, 0.44))
            for b in (16, 64)]
    before = [_run(tmp_path / "b64.json", 64, "old", (0.39, 0.50))]
    out = tmp_path / "curve.json"
    monkeypatch.setattr(sys, "argv", ["x", "--runs", *runs, "--before", *before,
                                      "--out", str(out)])
    curve_tool.main()
    merged = json.loads(out.read_text())
    assert merged["commit"] == "new" and merged["case"] == {"batch": 8, "context": 131072}
    assert merged["points"] == {"int4": {"16": 0.3516, "64": 0.3564},
                                "int4-kc": {"16": 0.44, "64": 0.44}}
    assert merged["before"] == {"commit": "old",
                                "points": {"int4": {"64": 0.39}, "int4-kc": {"64": 0.5}}}
    assert out.with_suffix(".png").stat().st_size > 1000
