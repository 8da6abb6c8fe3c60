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
