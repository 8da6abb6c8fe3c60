"""scripts/gpu_tests_parallel.sh runs only the GPU test files it lists, and refuses to run
at all on the GPU machine when one is missing: check the lists here, before a GPU session
finds out (test_channel_k_lifetime.py was missing from them)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _listed(script: str, name: str) -> list[str]:
    body = re.search(rf"^{name}=\((.*?)\)", script, re.S | re.M)
    assert body, f"no {name}=(...) list in the script"
    return body.group(1).split()


def test_every_gpu_test_file_is_in_exactly_one_list():
    script = (ROOT / "scripts" / "gpu_tests_parallel.sh").read_text()
    single, multi = _listed(script, "SINGLE"), _listed(script, "MULTI")
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "gpu").glob("test_*.py"))
    assert sorted(single + multi) == files
