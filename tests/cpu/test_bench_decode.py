"""CPU checks of benchmarks/bench_decode.py's plot: each layout and K mode of a width is a
line of its own (a cross-layer row must not join the contiguous rows' line)."""

from __future__ import annotations

import pytest

from tests.scripts import load_script


def _row(batch: int, kv: str, gbps: float, impl: str = "bitdecode", **extra) -> dict:
    return dict(impl=impl, kv=kv, batch=batch, context=32768, gbps=gbps, **extra)


def test_plot_draws_the_cross_layer_rows_as_their_own_line(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    bench = load_script("benchmarks/bench_decode.py")
    records = [_row(b, "bf16", 4000.0, impl="fa3") for b in (1, 8)]
    records += [_row(b, "int4", 3000.0 + b, k_mode="token") for b in (1, 8)]
    records += [_row(b, "int4", 2900.0 + b, k_mode="token", layout="cross_layer", layers=32)
                for b in (1, 8)]
    doc = dict(device="test GPU", date="2026-12-04", commit="abc", copy_gbps=4270.0,
               records=records)
    lines = {}

    def save_figure(fig, path, title, doc):
        for line in fig.axes[0].get_lines():
            if line.get_label() != "copy bandwidth":
                lines[line.get_label()] = (list(line.get_xdata()), list(line.get_ydata()),
                                           line.get_linestyle())

    monkeypatch.setattr(bench, "save_figure", save_figure)
    bench.plot(doc, tmp_path / "decode.png")
    assert lines["bitdecode int4"] == ([1, 8], [3001.0, 3008.0], "-")
    assert lines["bitdecode int4 cross-layer pages"] == ([1, 8], [2901.0, 2908.0], "-.")
    assert lines["fa3 bf16"][:2] == ([1, 8], [4000.0, 4000.0])
