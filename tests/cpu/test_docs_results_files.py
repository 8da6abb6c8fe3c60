"""Every results file that the README, docs/, the results README and the GPU plans name is
in benchmarks/results: a number quoted in the text must lead to the file it came from.

Names are written plainly (`decode_h200.json`), with their folder, or as a family with
braces (`quality_sim_{2k,8k}_cpu.json`: each choice) or brackets
(`decode_v_take_back[_b192|_kc][_base]_h200.json`: each part optional, `|` between
choices). A name with `<`, `*` or `N` placeholders is a pattern, not a file, and is skipped.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = sorted([ROOT / "README.md", RESULTS / "README.md", *(ROOT / "docs").glob("*.md"),
               *(ROOT / "scripts" / "plans").glob("*.plan")])
# a results file's name: lower-case words, ending in the device (or _cpu) and .json / .png
NAME = re.compile(r"[\w.{},|\[\]\-]+_(?:h200|h100[\w]*|cpu)\.(?:json|png)")


def expand(name: str) -> list[str]:
    """The file names a family written with braces or brackets stands for."""
    parts = re.split(r"(\{[^}]*\}|\[[^\]]*\])", name)
    choices = []
    for part in parts:
        if part.startswith("{"):
            choices.append(part[1:-1].split(","))
        elif part.startswith("["):
            choices.append(["", *part[1:-1].split("|")])
        else:
            choices.append([part])
    return ["".join(c) for c in itertools.product(*choices)]


def named_results_files(text: str) -> set[str]:
    names = set()
    for match in NAME.finditer(text):
        start = match.start()
        if start and text[start - 1] in "<*/-" and not text[:start].endswith("results/"):
            continue  # a pattern (`<name>_h200.json`, `*_h200.json`) or another folder
        names.update(expand(match.group(0)))
    return names


def test_expand_families():
    assert expand("q_{2k,8k}_cpu.json") == ["q_2k_cpu.json", "q_8k_cpu.json"]
    assert expand("d[_b192|_kc][_base]_h200.json") == [
        "d_h200.json", "d_base_h200.json", "d_b192_h200.json", "d_b192_base_h200.json",
        "d_kc_h200.json", "d_kc_base_h200.json"]
    assert named_results_files("`benchmarks/results/e2e_h200.json` and `<gpu>_h200.json`, "
                               "`tools/x_cpu.json`") == {"e2e_h200.json"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_results_files_exist(doc):
    present = {p.name for p in RESULTS.iterdir()}
    missing = sorted(named_results_files(doc.read_text()) - present)
    assert not missing, f"{doc.relative_to(ROOT)} names results files that are not there: " \
                        f"{missing}"
