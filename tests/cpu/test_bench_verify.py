"""CPU checks of benchmarks/bench_verify.py: the ratios it reports and its plot."""

from __future__ import annotations

import pytest

from tests.scripts import load_script

bench = load_script("benchmarks/bench_verify.py")


def _records() -> list[dict]:
    rows = []
    for batch in (1, 8):
        for tokens, fa3, packed, per_row in ((1, 0.2, 0.06, None), (4, 0.3, 0.08, 0.22)):
            rows.append(dict(impl="fa3", kv="bf16", batch=batch, context=32768,
                             tokens=tokens, ms=fa3 * batch))
            rows.append(dict(impl="tokens", kv="int4", batch=batch, context=32768,
                             tokens=tokens, ms=packed * batch))
            if per_row is not None:
                rows.append(dict(impl="rows", kv="int4", batch=batch, context=32768,
                                 tokens=tokens, ms=per_row * batch))
    return rows


def test_each_implementation_is_compared_with_its_own_one_token_step():
    records = _records()
    bench.relative_to_one_token(records)
    got = {(r["impl"], r["batch"], r["tokens"]): r["vs_one_token"] for r in records}
    for batch in (1, 8):
        assert got[("fa3", batch, 1)] == got[("tokens", batch, 1)] == 1.0
        assert got[("fa3", batch, 4)] == pytest.approx(1.5)
        assert got[("tokens", batch, 4)] == pytest.approx(0.08 / 0.06)
        # rows have no one-token record of their own: the shared one-token call
        assert got[("rows", batch, 4)] == pytest.approx(0.22 / 0.06)


def test_a_missing_one_token_step_is_an_error():
    records = [r for r in _records() if not (r["tokens"] == 1 and r["impl"] == "tokens")]
    with pytest.raises(KeyError):
        bench.relative_to_one_token(records)


def test_plot_writes_one_panel_per_case(tmp_path):
    doc = dict(device="CPU", date="2026-12-01", commit="abc1234", records=_records())
    path = tmp_path / "verify.png"
    bench.plot(doc, path)
    assert path.stat().st_size > 10_000
