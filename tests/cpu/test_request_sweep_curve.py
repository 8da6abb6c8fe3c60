"""benchmarks/request_sweep_curve.py: bench_e2e throughput runs at several request counts."""

from __future__ import annotations

import json
import sys

import pytest

from tests.scripts import load_script

curve_tool = load_script("benchmarks/request_sweep_curve.py")


def _record(key: str, requests: int, tokens_per_s: float, *, input_len: int = 2048,
            output_len: int = 8192, kv_cache_tokens: int = 889856) -> dict:
    return {"key": key, "case": "throughput", "batch": requests, "tokens_per_s": tokens_per_s,
            "input_len": input_len, "output_len": output_len, "num_preemptions": 3,
            "kv_cache_tokens": kv_cache_tokens}


def _run(path, records, *, device="GPU", commit="abc1234"):
    """A bench_e2e JSON with ``records`` and a decode record the curve must leave out."""
    decode = {"key": "BITDECODE:int4", "case": "decode", "batch": 8, "tokens_per_s": 1.0}
    path.write_text(json.dumps({"device": device, "date": "2026-12-04", "commit": commit,
                                "records": [decode, *records]}))
    return str(path)


def test_ratios_come_from_the_same_file(tmp_path, monkeypatch):
    runs = [
        _run(tmp_path / "r128.json", [_record("FLASH_ATTN:bf16", 128, 4000.0),
                                      _record("BITDECODE:int4", 128, 9000.0)]),
        # No bf16 in this lease: tokens/s without a ratio, never one against another file.
        _run(tmp_path / "r192.json", [_record("BITDECODE:int4", 192, 9500.0)]),
        _run(tmp_path / "r256.json", [_record("BITDECODE:int4", 256, 10500.0),
                                      _record("FLASH_ATTN:bf16", 256, 4200.0),
                                      _record("FLASH_ATTN:fp8", 256, 6000.0)], commit="def"),
    ]
    out = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["x", "--runs", *runs, "--out", str(out)])
    curve_tool.main()
    doc = json.loads(out.read_text())
    assert doc["device"] == "GPU" and doc["case"] == {"input_len": 2048, "output_len": 8192}
    got = {(r["key"], r["requests"]): (r["tokens_per_s"], r["vs_bf16"], r["vs_fp8"],
                                       r["source"], r["commit"]) for r in doc["records"]}
    assert got == {
        ("BITDECODE:int4", 128): (9000.0, 2.25, None, "r128.json", "abc1234"),
        ("BITDECODE:int4", 192): (9500.0, None, None, "r192.json", "abc1234"),
        ("BITDECODE:int4", 256): (10500.0, 2.5, 1.75, "r256.json", "def"),
        ("FLASH_ATTN:bf16", 128): (4000.0, 1.0, None, "r128.json", "abc1234"),
        ("FLASH_ATTN:bf16", 256): (4200.0, 1.0, 0.7, "r256.json", "def"),
        ("FLASH_ATTN:fp8", 256): (6000.0, 6000.0 / 4200.0, 1.0, "r256.json", "def"),
    }
    # Sorted by engine, then request count, so each line of the plot reads left to right.
    assert [r["requests"] for r in doc["records"]] == [128, 192, 256, 128, 256, 256]
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.parametrize("second, message", [
    (dict(records=[_record("BITDECODE:int4", 256, 1.0)], device="Other GPU"),
     "more than one GPU"),
    (dict(records=[_record("BITDECODE:int4", 256, 1.0, output_len=512)]),
     "different prompt/output lengths"),
    (dict(records=[_record("BITDECODE:int4", 128, 1.0)]), "keep one"),
    (dict(records=[]), "no throughput records"),
])
def test_runs_that_do_not_make_one_curve(tmp_path, second, message):
    first = _run(tmp_path / "a.json", [_record("BITDECODE:int4", 128, 9000.0)])
    other = _run(tmp_path / "b.json", **second)
    with pytest.raises(ValueError, match=message):
        curve_tool.sweep([first, other])
