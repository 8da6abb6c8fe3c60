"""benchmarks/bench_tp.py: which engines it starts, their specs, and the ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    return load_script("benchmarks/bench_tp.py")


def test_runs_wanted(bench):
    runs = bench.runs_wanted([1, 2], ["mp", "ray"])
    assert ("FLASH_ATTN:bf16", 1, "mp") in runs and ("BITDECODE:int4", 2, "ray") in runs
    assert len(runs) == 2 * (1 + 2)  # TP=1 once, TP=2 per executor
    with pytest.raises(SystemExit):
        bench.parse_args(["--executors", "mpi"])


def test_tp_spec(bench):
    s = bench.e2e.settings_from_args(bench.e2e.parse_args([]))
    one = bench.tp_spec("BITDECODE:int4", 1, "mp", "m", s)
    two = bench.tp_spec("BITDECODE:int4", 2, "ray", "m", s)
    assert one["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in one
    assert two["tensor_parallel_size"] == 2 and two["distributed_executor_backend"] == "ray"
    assert [(t["batch"], t["context"]) for t in two["decode_timings"]] == [(8, 32768)]
    assert "throughput" not in two and two["bitdecode"] == {"bits": 4}
    json.dumps(two)  # travels as JSON to the engine process

    from vllm_bitdecode.testing.engine import engine_kwargs

    kw = engine_kwargs(two)
    assert kw["tensor_parallel_size"] == 2 and kw["distributed_executor_backend"] == "ray"
    assert kw["load_format"] == "dummy"


def test_ratios(bench):
    def rec(kv, tp, ex, case, **f):
        key = {"bf16": "FLASH_ATTN:bf16", "int4": "BITDECODE:int4"}[kv]
        return dict(key=key, kv=kv, tp=tp, executor=ex, case=case, **f)

    records = [
        rec("bf16", 1, "mp", "decode_b8_32k", tokens_per_s=600.0),
        rec("bf16", 2, "mp", "decode_b8_32k", tokens_per_s=900.0),
        rec("int4", 1, "mp", "decode_b8_32k", tokens_per_s=1000.0),
        rec("int4", 2, "mp", "decode_b8_32k", tokens_per_s=1800.0),
        rec("int4", 2, "ray", "decode_b8_32k", skipped="no ray"),
        rec("bf16", 1, "mp", "capacity_32k", kv_cache_tokens=1000),
        rec("int4", 1, "mp", "capacity_32k", kv_cache_tokens=3770),
    ]
    bench.add_tp_ratios(records)
    assert records[1]["vs_tp1"] == pytest.approx(1.5)
    assert records[3]["vs_tp1"] == pytest.approx(1.8)
    assert records[3]["vs_bf16"] == pytest.approx(2.0)
    assert records[6]["vs_bf16"] == pytest.approx(3.77)
    assert "vs_tp1" not in records[4]
