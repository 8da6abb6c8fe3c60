"""Where a result came from: the commit and the GPU, as every results file records them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short hash of HEAD; ``BITDECODE_COMMIT`` wins, since the GPU machine's copy of the
    tree has no .git. "unknown" when neither is there."""
    env = os.environ.get("BITDECODE_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=REPO_ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def gpu_slug(device_name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100_80gb_hbm3", for results file names."""
    return device_name.replace("NVIDIA ", "").replace(" ", "_").lower()
