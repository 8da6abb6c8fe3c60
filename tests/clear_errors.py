"""Bad-argument tests: a call of the extension must raise a clear RuntimeError (or, for
the valid call, succeed and print OK), checked in an interpreter of its own so that a
crash fails the test instead of ending the session (as once with a statically linked
libstdc++, docs/decode-kernel-notes.md).

One interpreter per case cost about 4 s each on the GPU machine (torch, CUDA and the
extension loaded 44 times: 165 s of a 30-minute session, H200 2026-11-30). So the cases
of one parametrized test run together in one interpreter first, each script in a fresh
namespace; a case whose result there is not the expected one (or missing, if that
interpreter crashed, or possibly caused by an earlier case's sticky CUDA error) runs
again alone, and only that result decides.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Runs the scripts given as a JSON list on stdin, each in its own namespace, and prints
# one JSON line per script: ["ok", its stdout] or ["error", "Type: message"].
_BATCH_DRIVER = r"""
import contextlib, io, json, sys, traceback
for i, script in enumerate(json.load(sys.stdin)):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(script, f"<case {i}>", "exec"), {"__name__": "__main__"})
        result = ["ok", out.getvalue()]
    except BaseException as e:  # noqa: BLE001 - every outcome is a result here
        result = ["error", f"{type(e).__name__}: {e}"]
    print("RESULT " + json.dumps([i] + result), flush=True)
"""

_batches: dict[tuple[str, ...], dict[int, tuple[str, str]]] = {}


def _passes(kind: str, text: str, message: str | None) -> bool:
    if message is None:
        return kind == "ok" and "OK" in text
    return kind == "error" and text.startswith("RuntimeError") and message in text


def run_batch(scripts: list[str], timeout: float = 600) -> dict[int, tuple[str, str]]:
    """(kind, text) per index of ``scripts``, from one interpreter; indices missing where
    it died first."""
    proc = subprocess.run([sys.executable, "-c", _BATCH_DRIVER], input=json.dumps(scripts),
                          capture_output=True, text=True, timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            i, kind, text = json.loads(line[len("RESULT "):])
            results[i] = (kind, text)
    return results


def run_alone(script: str, message: str | None, timeout: float = 300) -> None:
    """The case in an interpreter of its own; asserts the expected outcome."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout)
    if message is None:
        assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
        return
    assert proc.returncode > 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert "RuntimeError" in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]


def expect_table_case(template: str, kwargs: str, message: str | None,
                      cases: list[tuple[str, str | None]]) -> None:
    """:func:`expect_clear_error` for one row ``(kwargs, message)`` of a table of cases,
    each filled into the ``{kwargs}`` of ``template``; the table's scripts run as one
    batch."""
    expect_clear_error(template.replace("{kwargs}", kwargs), message,
                       [template.replace("{kwargs}", k) for k, _ in cases])


def expect_clear_error(script: str, message: str | None,
                       batch: list[str] | None = None) -> None:
    """``script`` must raise a RuntimeError containing ``message`` (None: succeed and
    print OK). ``batch``: every script of the test's parametrization (``script`` among
    them), run once together; without it, or where the batch result is not the expected
    one, the case runs alone."""
    if batch is not None:
        key = tuple(batch)
        if key not in _batches:
            _batches[key] = run_batch(batch)
        result = _batches[key].get(batch.index(script))
        if result is not None and _passes(*result, message):
            return
    run_alone(script, message)
