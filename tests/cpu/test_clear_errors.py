"""tests/clear_errors.py, the bad-argument runner of the GPU tests, with plain Python
scripts in place of extension calls: one interpreter for a test's cases, and a case whose
batch result is not the expected one decided alone."""

from __future__ import annotations

import pytest

from tests import clear_errors as ce

OK = 'print("OK")'
BAD = 'raise RuntimeError("bits must be 4 or 2")'
# sets process-wide state that makes every later case in the same interpreter fail, as a
# sticky CUDA error would, and raises the expected error itself
POISON = 'import sys\nsys.poisoned = True\nraise RuntimeError("block size")'
CHECK = 'import sys\nif getattr(sys, "poisoned", False): raise RuntimeError("sticky")\nprint("OK")'
CRASH = "import os\nos._exit(134)"


def test_batch_reports_each_case_and_stops_where_the_interpreter_dies():
    results = ce.run_batch([OK, BAD, POISON, CHECK, CRASH, OK])
    assert results[0] == ("ok", "OK\n")
    assert results[1] == ("error", "RuntimeError: bits must be 4 or 2")
    assert results[3] == ("error", "RuntimeError: sticky")
    assert 4 not in results and 5 not in results


def test_cases_pass_from_the_batch_or_alone(monkeypatch):
    batch = [OK, BAD, POISON, CHECK, CRASH, OK]
    alone = []
    real = ce.run_alone
    monkeypatch.setattr(ce, "run_alone", lambda s, m: (alone.append(s), real(s, m)))
    monkeypatch.setattr(ce, "_batches", {})
    ce.expect_clear_error(OK, None, batch)
    ce.expect_clear_error(BAD, "bits must be 4 or 2", batch)
    ce.expect_clear_error(POISON, "block size", batch)
    assert alone == [], "passing batch results decide without a second interpreter"
    ce.expect_clear_error(CHECK, None, batch)  # poisoned in the batch, fine alone
    assert alone == [CHECK]
    assert len(ce._batches) == 1, "the batch runs once per test"


def test_a_wrong_outcome_fails_alone(monkeypatch):
    monkeypatch.setattr(ce, "_batches", {})
    batch = [OK, BAD, CRASH]
    with pytest.raises(AssertionError):
        ce.expect_clear_error(BAD, "a different message", batch)
    with pytest.raises(AssertionError):
        ce.expect_clear_error(OK, "bits must be 4 or 2", batch)  # no error raised
    with pytest.raises(AssertionError):
        ce.expect_clear_error(CRASH, None, batch)  # a crash is never a pass
    with pytest.raises(AssertionError):
        ce.expect_clear_error(BAD, None)  # unbatched: alone only


def test_table_cases_fill_the_template_and_share_one_batch(monkeypatch):
    monkeypatch.setattr(ce, "_batches", {})
    template = ("bits = {kwargs}\n"
                "if bits != 4: raise RuntimeError(f'bits must be 4, got {bits}')\n"
                'print("OK")')
    cases = [("4", None), ("3", "bits must be 4, got 3")]
    for kwargs, message in cases:
        ce.expect_table_case(template, kwargs, message, cases)
    assert list(ce._batches) == [tuple(template.replace("{kwargs}", k) for k, _ in cases)]
    with pytest.raises(AssertionError):  # the wrong message for a row
        ce.expect_table_case(template, "3", "bits must be 2", cases)
