"""The built extension uses the shared libstdc++ that torch uses, not a private copy.

A compiler with libstdc++.a but no libstdc++.so link (the GPU machine's /opt/gcc g++ 13.3)
links `-lstdc++` statically: the extension then defines its own iostream code, and the
first TORCH_CHECK message it formats crashes the process instead of raising
(docs/decode-kernel-notes.md, item 5). setup.py's `_libstdcxx_flags` prevents that; this
checks the result on whatever machine built the extension (CI builds it before the tests).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import vllm_bitdecode

# std::ostream::_M_insert<long> (formats the integers of every TORCH_CHECK message) and
# std::locale::classic(): defined only where libstdc++ was linked in statically.
LIBSTDCXX_INTERNALS = ("_ZNSo9_M_insertIlEERSoT_", "_ZNSt6locale7classicEv")


def _extension() -> Path:
    found = sorted(Path(vllm_bitdecode.__file__).parent.glob("_C*.so"))
    if not found:
        pytest.skip("the CUDA extension is not built here")
    return found[0]


def _run(*cmd: str) -> str:
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} (binutils) is not installed")
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_extension_needs_the_shared_libstdcxx():
    dynamic = _run("readelf", "-d", str(_extension()))
    assert "[libstdc++.so.6]" in dynamic, f"libstdc++.so.6 is not NEEDED:\n{dynamic}"


def test_extension_defines_no_libstdcxx_internals():
    defined = set(_run("nm", "-D", "--defined-only", str(_extension())).split())
    private = [s for s in LIBSTDCXX_INTERNALS if s in defined]
    assert not private, f"libstdc++ was linked statically into the extension: {private}"
