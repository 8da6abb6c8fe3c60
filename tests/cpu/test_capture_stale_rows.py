"""tools/capture_stale_rows.py's comparison (the engine part needs a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "tools" / "capture_stale_rows.py"
_spec = importlib.util.spec_from_file_location("capture_stale_rows", _PATH)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_compare_finds_nan_rows_and_differences_from_the_second_run():
    gen = torch.Generator().manual_seed(0)
    prefill, decode = torch.randn(10, 8, generator=gen), torch.randn(2, 8, generator=gen)
    stale = prefill.clone()
    stale[[3, 7]] = float("nan")
    drift = decode * 1.5
    runs = [("first", [(0, 80, stale), (0, 2, drift)]),
            ("second", [(0, 80, prefill), (0, 2, decode)]),
            ("long_only", [(0, 72, prefill[:9])])]
    first, second, alone = tool.compare(runs)
    assert first["captures"][0]["nan_rows"] == 2
    assert first["captures"][0]["first_nan"] == [3, 7]
    assert first["captures"][0]["rel_diff"] == 0.0  # the finite rows agree
    assert abs(first["captures"][1]["rel_diff"] - 0.5) < 1e-6
    assert all(c["nan_rows"] == 0 and c["rel_diff"] == 0.0 for c in second["captures"])
    assert alone["captures"][0]["rel_diff"] is None  # another shape: not compared
