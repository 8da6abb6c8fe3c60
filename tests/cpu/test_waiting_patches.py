"""The kernel patches in docs/patches still apply to the tree (docs/patches/README.md).

A patch waits there for a GPU, sometimes for several sessions, while main moves on; one
that no longer applies fails at the lease's build step and costs device time. A waiting
patch must apply forward; a landed change kept for an A/B against the tree without it
(fp16-small-v-lift.patch, run by ab_on_main.plan in reverse) must apply in reverse.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCHES = sorted((ROOT / "docs" / "patches").glob("*.patch"))


def _applies(patch: Path, *flags: str) -> bool:
    proc = subprocess.run(["git", "apply", "--check", *flags, str(patch)], cwd=ROOT,
                          capture_output=True, text=True)
    return proc.returncode == 0


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and the repository's checkout")
@pytest.mark.parametrize("patch", PATCHES, ids=[p.stem for p in PATCHES])
def test_patch_applies_to_the_tree(patch):
    assert _applies(patch) or _applies(patch, "-R"), (
        f"{patch.name} applies neither forward nor in reverse: refresh it against main, "
        "or drop it (docs/patches/README.md)")


def test_every_patch_is_described_in_the_readme():
    readme = (ROOT / "docs" / "patches" / "README.md").read_text()
    missing = [p.name for p in PATCHES if f"`{p.name}`" not in readme]
    assert not missing, f"docs/patches/README.md does not describe {missing}"
