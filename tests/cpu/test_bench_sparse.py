"""CPU checks of benchmarks/bench_sparse.py: the random selections it times, the ratios
it reports against issue #6's targets, and its plot."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import load_script

bench = load_script("benchmarks/bench_sparse.py")


@pytest.mark.parametrize(("context", "budget"), [(1, 1), (50, 1), (50, 50), (1000, 256)])
def test_selections_are_what_decode_select_writes(context, budget):
    sel = bench.random_selection(3, 2, context, budget, torch.Generator().manual_seed(0))
    assert sel.shape == (3, 2, budget) and sel.dtype == torch.int32
    for row in sel.flatten(0, 1):
        assert row[-1] == context - 1  # the newest position is always kept
        assert (row[1:] > row[:-1]).all()  # ascending, distinct
        assert row.min() >= 0
    if 1 < budget < context:  # heads differ: a random choice, not a fixed pattern
        assert not torch.equal(sel[0, 0], sel[0, 1])


def test_a_budget_past_the_context_is_refused():
    with pytest.raises(ValueError, match="budget 9 must be in"):
        bench.random_selection(1, 1, 8, 9, torch.Generator())


def _rows():
    return [dict(impl="fa3", kind="dense", kv="bf16", ms=2.0),
            dict(impl="bitdecode", kind="dense", kv="int4", ms=0.5),
            dict(impl="bitdecode", kind="select", kv="int4", budget=2048, ms=0.6),
            dict(impl="bitdecode", kind="sparse", kv="int4", budget=2048, ms=0.08),
            dict(impl="bitdecode", kind="select-pages", kv="int4", budget=2048, ms=0.55),
            dict(impl="bitdecode", kind="sparse-pages", kv="int4", budget=2048, ms=0.05)]


def test_summary_ratios():
    s = bench.summarize(_rows())
    assert s["sparse_k2048_vs_fa3_bf16"] == pytest.approx(25.0)
    assert s["sparse_k2048_vs_dense_int4"] == pytest.approx(6.25)
    assert s["selection_layer_k2048_vs_dense_int4"] == pytest.approx(1.2)
    assert s["sparse_pages_k2048_vs_fa3_bf16"] == pytest.approx(40.0)
    assert s["sparse_pages_k2048_vs_sparse_tokens"] == pytest.approx(1.6)
    assert s["page_selection_layer_k2048_vs_dense_int4"] == pytest.approx(1.1)
    assert not any(k.endswith("gpu_span") for k in s)  # no kernel times recorded


def test_summary_ratios_of_the_cache_place_ab_rows():
    """Each A/B row's ratio divides the side expected to be slower by the other: > 1
    where the cache places pay (reuse) or cost (selection)."""
    rows = _rows() + [
        dict(impl="bitdecode", kind="sparse-pages-table", kv="int4", budget=2048, ms=0.06),
        dict(impl="bitdecode", kind="select-pages-no-tiles", kv="int4", budget=2048, ms=0.44)]
    s = bench.summarize(rows)
    assert s["sparse_pages_k2048_table_vs_cache_tiles"] == pytest.approx(1.2)
    assert s["page_selection_layer_k2048_cache_tiles_vs_none"] == pytest.approx(1.25)
    assert s["page_selection_layer_k2048_vs_dense_int4"] == pytest.approx(1.1)  # its own


def test_summary_gpu_span_ratio_from_kernel_times():
    rows = _rows()
    rows[0]["kernels_us"] = {"fa3_kernel": 1900.0, "span": 1950.0}
    rows[-1]["kernels_us"] = {"decode": 30.0, "combine": 12.0, "span": 39.0}
    s = bench.summarize(rows)
    assert s["sparse_pages_k2048_vs_fa3_bf16_gpu_span"] == pytest.approx(50.0)


def test_plot_writes_a_png(tmp_path):
    doc = dict(device="test", date="2026-11-30",
               cases=[dict(batch=1, context=32768, records=_rows()),
                      dict(batch=8, context=131072, records=_rows())])
    bench.plot(doc, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_split_sweep_keeps_what_the_buffers_hold():
    assert bench.sweep_splits([1, 4, 16, 64], 16) == [1, 4, 16]
    assert bench.sweep_splits([], 64) == []
    with pytest.raises(ValueError, match="must be positive"):
        bench.sweep_splits([0, 4], 64)


def test_sweep_rows_are_labelled_by_split_count_and_left_out_of_summary_and_plot(tmp_path):
    sweep = [dict(impl="bitdecode", kind="sparse-pages-splits", kv="int4", budget=2048,
                  ms=0.01, num_splits=n, min_tiles_per_split=1) for n in (1, 16)]
    assert bench._label(sweep[1]) == "bitdecode sparse-pages-splits k=2048 s=16"
    assert bench.summarize(_rows() + sweep) == bench.summarize(_rows())
    doc = dict(device="test", date="2026-11-30",
               cases=[dict(batch=1, context=32768, records=_rows() + sweep)])
    bench.plot(doc, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


class _FakeGraphTimer:
    """Each graph's time: 1 ms per separator, ``cost[f]`` per layer call."""

    def __init__(self, cost):
        self.cost = cost
        self.graphs = 0

    def __call__(self, step):
        self.graphs += 1
        self.ms = 0.0
        step()
        return self.ms


def test_a_layer_in_a_step_costs_its_graph_less_the_separators():
    calls = []
    graph = _FakeGraphTimer({})

    def sep():
        calls.append("sep")
        graph.ms += 1.0

    def layer(ms):
        def f():
            calls.append(ms)
            graph.ms += ms
        return f

    timer = bench.InStepTimer(lambda fn: 7.0, 3, graph, sep)
    fns = [layer(0.5), layer(0.25), layer(0.75)]
    assert timer(fns[0]) == 7.0 and timer.last_fn is fns[0]
    assert timer.in_step(fns) == pytest.approx(0.5)  # (3 + 1.5 - 3) / 3
    # a separator before every layer, each layer's own call in order
    assert calls[3:] == ["sep", 0.5, "sep", 0.25, "sep", 0.75]
    assert graph.graphs == 2
    timer.in_step(fns)
    assert graph.graphs == 3  # the separators' graph is timed once


def test_a_step_needs_one_call_per_layer():
    timer = bench.InStepTimer(lambda fn: 1.0, 2, _FakeGraphTimer({}), lambda: None)
    with pytest.raises(ValueError, match="1 layer calls for 2 layers"):
        timer.in_step([lambda: None])
    with pytest.raises(ValueError, match="--layers must be >= 0"):
        bench.InStepTimer(lambda fn: 1.0, -1)


def test_the_wrapped_timers_readings_show_through():
    class Inner:
        last_spread = [1.0, 2.0]
        last_kernels = None

        def __call__(self, fn):
            return 3.0

    timer = bench.InStepTimer(Inner(), 0)
    assert timer(lambda: None) == 3.0
    assert timer.last_spread == [1.0, 2.0] and timer.last_kernels is None


def test_in_step_ratios_only_where_every_row_has_its_time():
    rows = _rows()
    assert not any(k.endswith("_in_step") for k in bench.summarize(rows))
    for r, ms in zip(rows, (1.9, 0.45, 0.55, 0.05, 0.5, 0.038), strict=True):
        r["ms_in_step"] = ms
    s = bench.summarize(rows)
    assert s["sparse_pages_k2048_vs_fa3_bf16_in_step"] == pytest.approx(50.0)
    assert s["sparse_k2048_vs_fa3_bf16_in_step"] == pytest.approx(38.0)
    assert s["selection_layer_k2048_vs_dense_int4_in_step"] == pytest.approx(0.55 / 0.45)
    assert s["sparse_pages_k2048_vs_fa3_bf16"] == pytest.approx(40.0)  # the replay's stays
    # a split sweep's row has no step time and does not hold the ratios back
    sweep = dict(impl="bitdecode", kind="sparse-pages-splits", kv="int4", budget=2048,
                 ms=0.01, num_splits=4, min_tiles_per_split=1)
    assert bench.summarize(rows + [sweep]) == s
    del rows[1]["ms_in_step"]  # a row timed without --layers
    assert not any(k.endswith("_in_step") for k in bench.summarize(rows))
