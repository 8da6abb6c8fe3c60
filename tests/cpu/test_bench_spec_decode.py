"""benchmarks/bench_spec_decode.py: its engines and their specs, records, ratios and the
main flow with a stand-in engine; and engine_timing.time_decode's forced token and draft
counts."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from tests.scripts import load_script
from vllm_bitdecode.testing import engine, engine_timing

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    return load_script("benchmarks/bench_spec_decode.py")


@pytest.fixture
def settings(bench):
    return bench.e2e.settings_from_args(bench.e2e.parse_args(["--max-num-seqs", "8"]))


def test_engines_and_their_specs(bench, settings):
    assert bench.runs_wanted(3) == [("FLASH_ATTN:bf16", 0), ("FLASH_ATTN:bf16", 3),
                                    ("BITDECODE:int4", 0), ("BITDECODE:int4", 3)]
    plain = bench.engine_spec("BITDECODE:int4", 0, "m", settings)
    spec = bench.engine_spec("BITDECODE:int4", 3, "m", settings)
    assert "speculative_config" not in plain
    assert spec["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3,
                                          "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    for s in (plain, spec):  # the same schedule and graphs with and without drafts
        assert s["async_scheduling"] is False and s["bitdecode"] == {"bits": 4}
        assert s["compilation_config"] == {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32]}
        assert s["count_graph_replays"] is True
        assert [(t["batch"], t["context"], t["forced_token"]) for t in s["decode_timings"]] \
            == [(1, 130560, 42), (8, 32768, 42)]
        json.dumps(s)  # travels as JSON to the engine process
    kw = engine.engine_kwargs(spec)
    assert kw["speculative_config"]["num_speculative_tokens"] == 3
    assert "count_graph_replays" not in kw  # read by run_engine, not vLLM
    assert kw["async_scheduling"] is False
    with pytest.raises(SystemExit):
        bench.parse_args(["--drafts", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--method", "eagle"])


def test_gpu_ngram_keeps_async_scheduling_on_with_and_without_drafts(bench, settings):
    plain = bench.engine_spec("FLASH_ATTN:bf16", 0, "m", settings, "ngram_gpu")
    spec = bench.engine_spec("FLASH_ATTN:bf16", 3, "m", settings, "ngram_gpu")
    assert spec["speculative_config"]["method"] == "ngram_gpu"
    assert plain["async_scheduling"] is True and spec["async_scheduling"] is True
    assert engine.engine_kwargs(spec)["async_scheduling"] is True
    # each method its own results file; the CPU proposer's name is the one committed first
    assert bench.results_path("NVIDIA H200", "ngram").name == "spec_decode_h200.json"
    assert bench.results_path("NVIDIA H200", "ngram_gpu").name == \
        "spec_decode_ngram_gpu_h200.json"


def _result(ms: dict[tuple[int, int], float], drafts: bool) -> dict:
    return {"decode_timings": [
        dict(batch=b, context=c, steps=64, ms_per_step=v, ms_per_step_each=[v, v + 0.25],
             ms_per_step_wall_each=[v + 1, v - 1], clock="engine",
             graph_replays_per_step=0.3 if drafts else 1.0,
             **({"draft_tokens": 384.0, "accepted_tokens": 380.0} if drafts else {}))
        for (b, c), v in ms.items()]}


SHAPES = {"decode_b1_128k": (1, 130560), "decode_b8_32k": (8, 32768)}


def test_records_and_ratios(bench):
    records = []
    for key, drafts, b1, b8 in (("FLASH_ATTN:bf16", 0, 13.0, 9.0),
                                ("FLASH_ATTN:bf16", 3, 4.0, 3.0),
                                ("BITDECODE:int4", 0, 8.0, 6.0),
                                ("BITDECODE:int4", 3, 2.0, 2.5)):
        res = _result({(1, 130560): b1, (8, 32768): b8}, drafts > 0)
        records += bench.records_from_result(key, drafts, res, SHAPES)
    records += bench.skipped_records("BITDECODE:int4", 5, SHAPES, "engine failed: x")
    bench.add_ratios(records)
    by = {(r["key"], r["drafts"], r["case"]): r for r in records}
    r = by[("BITDECODE:int4", 3, "decode_b8_32k")]
    assert r["ms_per_token"] == 2.5 and r["tokens_per_s"] == pytest.approx(3200.0)
    assert r["accepted_tokens"] == 380.0 and r["draft_tokens"] == 384.0
    assert r["vs_no_drafts"] == pytest.approx(6.0 / 2.5)
    assert r["graph_replays_per_token"] == 0.3
    assert r["vs_bf16"] == pytest.approx(3.0 / 2.5)
    assert by[("BITDECODE:int4", 0, "decode_b1_128k")]["vs_bf16"] == pytest.approx(13 / 8)
    assert by[("FLASH_ATTN:bf16", 0, "decode_b1_128k")]["draft_tokens"] is None
    skipped = by[("BITDECODE:int4", 5, "decode_b1_128k")]
    assert skipped["vs_no_drafts"] is None and skipped["context"] == 130560
    missing = bench.records_from_result("BITDECODE:int4", 3, {"decode_timings": []}, SHAPES)
    assert all(r["skipped"] for r in missing)
    table = bench.summary_table(records)
    assert "380/384" in table and "skipped: engine failed" in table
    assert "graphs/token" in table and " 0.30" in table
    assert r["ms_per_token_each"] == [2.5, 2.75] and "2.50-2.75" in table  # the pairs' spread
    assert r["ms_per_token_wall_each"] == [3.5, 1.5] and r["clock"] == "engine"


def test_acceptance_says_what_the_records_measured(bench):
    assert bench.acceptance([dict(draft_tokens=None), dict(draft_tokens=0)]) == \
        "no drafts measured"
    assert bench.acceptance([dict(draft_tokens=92, accepted_tokens=92),
                             dict(draft_tokens=None)]) == "every draft accepted"
    assert bench.acceptance([dict(draft_tokens=114.0, accepted_tokens=92.0),
                             dict(draft_tokens=912, accepted_tokens=736)]) == \
        "accepted 828 of 1026 drafts"


def test_main_flow_with_a_stand_in_engine(bench, monkeypatch, tmp_path, capsys):
    specs = []

    def engine(spec, timeout):
        specs.append(spec)
        if spec["backend"] == "FLASH_ATTN" and "speculative_config" in spec:
            raise RuntimeError("Traceback\nValueError: no drafts today")
        drafts = "speculative_config" in spec
        scale = 0.3 if drafts else 1.0
        return dict(_result({(1, 32768): 10.0 * scale, (8, 32768): 8.0 * scale}, drafts),
                    log="BITDECODE")

    monkeypatch.setattr(bench.e2e, "run_in_subprocess", engine)
    monkeypatch.setattr(bench.e2e, "device_name", lambda: "NVIDIA Test GPU")
    monkeypatch.setattr(bench.e2e, "write_model_dir", lambda path, tokenizer: path)
    out = tmp_path / "spec.json"
    bench.main(["--quick", "--out", str(out), "--log-dir", str(tmp_path / "logs")])
    assert len(specs) == 4
    doc = json.loads(out.read_text())
    assert doc["device"] == "NVIDIA Test GPU" and doc["forced_token"] == 42
    assert {"date", "commit", "records", "settings"} <= doc.keys()
    recs = {(r["key"], r["drafts"], r["case"]): r for r in doc["records"]}
    assert recs[("FLASH_ATTN:bf16", 3, "decode_b1_128k")]["skipped"].endswith(
        "no drafts today")
    assert recs[("BITDECODE:int4", 3, "decode_b8_32k")]["vs_no_drafts"] == pytest.approx(
        1 / 0.3)
    assert "x no drafts" in capsys.readouterr().out
    assert doc["method"] == "ngram" and doc["async_scheduling"] is False
    assert doc["speculative"]["method"] == "ngram"
    # the GPU proposer: every engine's spec and the document say so
    specs.clear()
    bench.main(["--quick", "--method", "ngram_gpu", "--out", str(out), "--log-dir",
                str(tmp_path / "logs")])
    doc = json.loads(out.read_text())
    assert doc["method"] == "ngram_gpu" and doc["async_scheduling"] is True
    assert [s["async_scheduling"] for s in specs] == [True] * 4
    assert [s["speculative_config"]["method"] for s in specs if "speculative_config" in s] \
        == ["ngram_gpu"] * 2


class Counter(types.SimpleNamespace):
    """What engine_probes.counters reads of vLLM's metrics: a Counter's name and value."""


class _FakeLLM:
    """generate() records its sampling params and, with drafts, bumps vLLM's counters; its
    outputs carry no request stats (as with ``disable_log_stats=True``)."""

    def __init__(self, drafts: int) -> None:
        self.params, self.drafts, self.count = [], drafts, 0

    def generate(self, prompts, sp, use_tqdm=False):
        self.params.append(sp)
        self.count += self.drafts * sp.max_tokens
        return [_request_output(0.0, None) for _ in prompts]

    def get_metrics(self):
        if not self.drafts:
            raise AssertionError("stat logging disabled")
        return [Counter(name=engine_timing.SPEC_DRAFTS, value=self.count),
                Counter(name=engine_timing.SPEC_ACCEPTED, value=self.count - 1)]


def test_time_decode_forces_the_token_and_counts_drafts():
    """A warm-up as long as a short run (the drafts start only once the forced token
    repeats, and their first use must not fall in a timed run), then (1 + n, 1 + 2n)
    token runs in interleaved pairs; the drafts are the timed window's: the long runs'
    less the short runs', per pair."""
    params = types.SimpleNamespace
    llm = _FakeLLM(drafts=3)
    t = engine_timing.time_decode(llm, params, dict(batch=2, context=5, steps=4, forced_token=42))
    assert all(p.allowed_token_ids == [42] and p.temperature == 0.0 for p in llm.params)
    assert [p.max_tokens for p in llm.params] == [5, 5, 9, 5, 9, 5, 9]
    assert t["forced_token"] == 42 and t["draft_tokens"] == 3 * 4 and t["repeats"] == 3
    assert t["accepted_tokens"] == t["draft_tokens"]  # the "- 1" cancels in the difference
    plain = _FakeLLM(drafts=0)
    t = engine_timing.time_decode(plain, params, dict(batch=1, context=3, steps=2, repeats=2))
    assert [p.max_tokens for p in plain.params] == [3, 3, 5, 3, 5]
    assert all(p.allowed_token_ids is None for p in plain.params)
    assert "draft_tokens" not in t and "forced_token" not in t
    assert "graph_replays_per_step" not in t


def test_time_decode_counts_graph_replays_per_decode_step():
    """Only the timed window's replays count: the long runs' less the short runs', over
    the window's tokens."""
    replays = types.SimpleNamespace(count=0)

    class Graphed(_FakeLLM):  # a prefill replays 3 graphs, each later token 2
        def generate(self, prompts, sp, use_tqdm=False):
            replays.count += 3 + 2 * (sp.max_tokens - 1)
            return super().generate(prompts, sp, use_tqdm)

    t = engine_timing.time_decode(Graphed(drafts=0), types.SimpleNamespace,
                             dict(batch=1, context=3, steps=4), replays)
    assert t["graph_replays_per_step"] == 2.0


def _request_output(first: float, last: float | None):
    """What engine_timing.decode_span_s reads of a RequestOutput: its metrics' two timestamps
    (None: vLLM kept no stats for it)."""
    metrics = None if last is None else types.SimpleNamespace(first_token_ts=first,
                                                              last_token_ts=last)
    return types.SimpleNamespace(metrics=metrics)


def test_decode_span_is_the_median_request_span_or_none_without_stats():
    spans = [_request_output(10.0, 10.5), _request_output(3.0, 3.2), _request_output(1, 2)]
    assert engine_timing.decode_span_s(spans) == pytest.approx(0.5)
    assert engine_timing.decode_span_s(spans + [_request_output(0.0, None)]) is None
    assert engine_timing.decode_span_s([_request_output(0.0, 4.0)]) is None  # no first token
    assert engine_timing.decode_span_s([_request_output(5.0, 4.0)]) is None
    assert engine_timing.decode_span_s([]) is None


def test_time_decode_takes_the_median_pair_on_the_wall_clock_without_stats(monkeypatch):
    """Without request stats: each pair's (wall t(1 + 2n) - wall t(1 + n)) / n, and the
    median of the pairs, on a clock that generate() advances: 10 ms per token plus a
    run's overhead, which varies (one slow short run or one slow long run moves its own
    pair only); the collector is off while generate() runs."""
    import gc

    clock = [0.0]
    monkeypatch.setattr(engine_timing.time, "perf_counter", lambda: clock[0])
    overheads = iter([0.0, 0.500, 0.100, 0.100, 0.100, 0.100, 0.300])  # warm-up first
    collector_on = []

    class Timed(_FakeLLM):
        def generate(self, prompts, sp, use_tqdm=False):
            collector_on.append(gc.isenabled())
            clock[0] += 0.010 * sp.max_tokens + next(overheads)
            return super().generate(prompts, sp, use_tqdm)

    t = engine_timing.time_decode(Timed(drafts=0), types.SimpleNamespace,
                             dict(batch=1, context=3, steps=8))
    assert t["clock"] == "wall" and "decode_spans_s" not in t
    assert t["ms_per_step"] == pytest.approx(10.0)
    assert t["ms_per_step_each"] == pytest.approx([-40.0, 10.0, 35.0])
    assert t["ms_per_step_wall_each"] == t["ms_per_step_each"]
    assert t["runs_s"]["short"] == pytest.approx([0.59, 0.19, 0.19])
    assert collector_on == [False] * 7 and gc.isenabled()


def test_time_decode_uses_the_engine_clock_when_requests_carry_stats(monkeypatch):
    """With request stats the pairs difference the requests' first-to-last-token spans,
    which hold no prefill and no front-end time: the wall clock's overheads (here up to
    0.5 s a run) leave the figure alone, and the median skips the one odd pair."""
    clock = [0.0]
    monkeypatch.setattr(engine_timing.time, "perf_counter", lambda: clock[0])
    overheads = iter([0.0, 0.500, 0.100, 0.100, 0.100, 0.100, 0.300])
    step_s = iter([0.010, 0.010, 0.010, 0.010, 0.010, 0.012, 0.010])  # pair 3 short slow

    class Stamped(_FakeLLM):
        def generate(self, prompts, sp, use_tqdm=False):
            super().generate(prompts, sp, use_tqdm)
            step, first = next(step_s), clock[0] + 0.2  # prefill before the first token
            clock[0] += 0.010 * sp.max_tokens + next(overheads)
            return [_request_output(first, first + step * (sp.max_tokens - 1))
                    for _ in range(len(prompts))]

    t = engine_timing.time_decode(Stamped(drafts=0), types.SimpleNamespace,
                             dict(batch=2, context=3, steps=8))
    assert t["clock"] == "engine"
    assert t["ms_per_step_each"] == pytest.approx([10.0, 10.0, 8.0])
    assert t["ms_per_step"] == pytest.approx(10.0)
    assert t["ms_per_step_wall_each"] == pytest.approx([-40.0, 10.0, 35.0])
    assert t["decode_spans_s"]["long"] == pytest.approx([0.16, 0.16, 0.16])
