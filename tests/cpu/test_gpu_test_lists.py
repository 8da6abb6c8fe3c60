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


def test_every_sanitizer_case_is_a_collected_test():
    """scripts/sanitize.sh names its cases by test id; a renamed parametrization made
    every sanitizer tool exit before its first kernel (H200, 2026-11-30)."""
    import subprocess
    import sys

    script = (ROOT / "scripts" / "sanitize.sh").read_text()
    names = dict(re.findall(r"^(\w+)=(tests/gpu/\S+\.py)$", script, re.M))
    body = re.search(r'^CASES="\$\{SANITIZE_CASES:-(.*?)\}"$', script, re.S | re.M)
    assert body, "no CASES list in scripts/sanitize.sh"
    cases = [re.sub(r"^\$(\w+)", lambda m: names[m.group(1)], line.strip())
             for line in body.group(1).splitlines() if line.strip()]
    assert len(cases) >= 10
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *cases],
                          cwd=ROOT, capture_output=True, text=True)
    collected = {line for line in done.stdout.splitlines() if "::" in line}
    assert collected == set(cases), f"not collected: {sorted(set(cases) - collected)}"
