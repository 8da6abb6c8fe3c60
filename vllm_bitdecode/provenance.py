"""Where a result came from: the commit and the GPU, as every results file records them."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any

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


def results_doc(device_name: str, **fields: Any) -> dict[str, Any]:
    """A results file's contents: the GPU, today's date and the commit, then ``fields``."""
    return dict(device=device_name, date=datetime.date.today().isoformat(),
                commit=git_commit(), **fields)


def write_results(doc: dict[str, Any], path: Path) -> None:
    """Write a results document as indented JSON, making its folder if need be. The text
    goes to a temporary file that then replaces ``path``, so a benchmark that rewrites its
    file after every engine and is killed by a time limit leaves the last whole document,
    never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None where matplotlib is not
    installed (the benchmarks then write their JSON without a plot)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str, doc: dict[str, Any]) -> None:
    """A results plot's last steps: ``title`` above a line naming the device, date and
    commit of ``doc``, then the PNG at ``path``, and the figure closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{title}\n{doc['device']} ({doc['date']}, {doc['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
