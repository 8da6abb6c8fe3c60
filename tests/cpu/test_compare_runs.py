"""tools/compare_runs.py: rows of two sides' benchmark runs lined up by what they measure,
and a verdict only where each side has a spread to judge by."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import compare_runs  # noqa: E402


def _sparse_file(path: Path, reuse_us: float, dense_us: float, *, extra: bool = False,
                 heads: str = "32/8") -> Path:
    """A bench_sparse-shaped file: one case, a dense row and a page reuse row."""
    recs = [
        {"impl": "bitdecode", "kind": "dense", "kv": "int4", "num_splits": 64,
         "ms": dense_us * 1.1e-3, "ms_in_step": dense_us * 1e-3,
         "kernels_us": {"span": dense_us * 1.05}},
        {"impl": "bitdecode", "kind": "sparse-pages", "kv": "int4", "budget": 2048,
         "num_splits": 16, "ms": reuse_us * 1.2e-3, "ms_in_step": reuse_us * 1e-3},
    ]
    if extra:
        recs.append({"impl": "fa3", "kind": "dense", "kv": "bf16", "ms": 0.2})
    doc = {"heads": heads, "cases": [{"batch": 1, "context": 131072, "records": recs}]}
    path.write_text(json.dumps(doc))
    return path


def _decode_file(path: Path, int4_us: float) -> Path:
    """A bench_decode-shaped file: flat records."""
    doc = {"records": [{"impl": "bitdecode", "kv": "int4", "k_mode": "token", "batch": 8,
                        "context": 32768, "num_splits": 8, "ms": int4_us * 1e-3}]}
    path.write_text(json.dumps(doc))
    return path


def test_verdicts_follow_the_spread_of_each_side(tmp_path):
    base = [_sparse_file(tmp_path / f"b{i}.json", r, d)
            for i, (r, d) in enumerate([(10.1, 62.0), (9.9, 63.0), (10.2, 62.5)])]
    new = [_sparse_file(tmp_path / f"n{i}.json", r, d)
           for i, (r, d) in enumerate([(9.4, 62.8), (9.3, 61.5), (9.5, 62.2)])]
    rows, only, warnings = compare_runs.compare(base, new)
    by_kind = {dict(r.key)["kind"]: r for r in rows}
    assert by_kind["sparse-pages"].verdict == "faster"  # 9.3-9.5 all below 9.9-10.2
    assert by_kind["dense"].verdict == "within spread"  # 61.5-62.8 overlaps 62.0-63.0
    # in a step by default, in us, each side's runs in order
    assert by_kind["sparse-pages"].base == pytest.approx([10.1, 9.9, 10.2])
    assert by_kind["sparse-pages"].change_us == pytest.approx(9.4 - 10.1)
    assert only == [] and warnings == []
    swapped, _, _ = compare_runs.compare(new, base)
    assert {dict(r.key)["kind"]: r.verdict for r in swapped}["sparse-pages"] == "slower"


def test_one_run_a_side_gets_no_verdict(tmp_path):
    rows, _, _ = compare_runs.compare([_decode_file(tmp_path / "a.json", 120.0)],
                                      [_decode_file(tmp_path / "b.json", 80.0)])
    (row,) = rows
    assert row.verdict == "one run"  # however large the change
    assert row.change_rel == pytest.approx(-1 / 3)
    assert compare_runs.label(row.key) == "8 x 32K bitdecode int4 token 8 splits"


def test_metric_choice_and_rows_only_one_side_has(tmp_path):
    a = _sparse_file(tmp_path / "a.json", 10.0, 60.0, extra=True)
    b = _sparse_file(tmp_path / "b.json", 9.0, 61.0)
    rows, only, _ = compare_runs.compare([a], [b], metric="ms")
    assert {dict(r.key)["kind"]: r.base[0] for r in rows} == pytest.approx(
        {"dense": 66.0, "sparse-pages": 12.0})  # the replay times
    assert only == ["1 x 128K fa3 dense bf16 (base only)"]
    # span: only rows with kernel times
    rows, _, _ = compare_runs.compare([a], [b], metric="span")
    assert [dict(r.key)["kind"] for r in rows] == ["dense"]
    rows, _, _ = compare_runs.compare([a], [b], rows="sparse-pages")
    assert [dict(r.key)["kind"] for r in rows] == ["sparse-pages"]


def test_differing_settings_warn_and_bad_input_raises(tmp_path):
    a = _sparse_file(tmp_path / "a.json", 10.0, 60.0, heads="32/8")
    b = _sparse_file(tmp_path / "b.json", 9.0, 61.0, heads="64/8")
    _, _, warnings = compare_runs.compare([a], [b])
    assert len(warnings) == 1 and "heads" in warnings[0]
    with pytest.raises(ValueError, match="metric"):
        compare_runs.compare([a], [b], metric="p90")
    (tmp_path / "x.json").write_text(json.dumps({"device": "H100"}))
    with pytest.raises(ValueError, match="not a bench_decode or bench_sparse"):
        compare_runs.compare([tmp_path / "x.json"], [b])
    twice = json.loads(a.read_text())
    twice["cases"][0]["records"].append(twice["cases"][0]["records"][0])
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(ValueError, match="two records measure"):
        compare_runs.compare([tmp_path / "twice.json"], [b])


def test_main_prints_a_table_and_the_counts(tmp_path, capsys):
    base = [_sparse_file(tmp_path / f"b{i}.json", 10.0 + i / 10, 62.0) for i in range(2)]
    new = [_sparse_file(tmp_path / f"n{i}.json", 9.0 + i / 10, 62.0) for i in range(2)]
    assert compare_runs.main(["--base", *map(str, base), "--new", *map(str, new)]) == 0
    out = capsys.readouterr().out
    assert "| 1 x 128K bitdecode sparse-pages int4 k = 2048 16 splits | 10.00 / 10.10 |" in out
    assert "1 faster, 1 within spread" in out
