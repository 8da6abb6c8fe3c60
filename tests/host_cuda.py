"""Host-only CUDA programs in tests: tests/cpu/cuda/*.cu include the kernel headers, run
their host-callable parts (index maps, unpacking) without a GPU, and print results for
a CPU test to check."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_host_program(name: str, out_dir: Path) -> str:
    """Compile tests/cpu/cuda/<name>.cu with nvcc against csrc/include, run it and return
    its standard output; skip the calling test where nvcc is not installed."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = shutil.which("nvcc") or next(
        (str(p) for p in [Path(home) / "bin" / "nvcc"] if p.exists()), None)
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    exe = out_dir / name
    subprocess.run([nvcc, "-std=c++17", "-I", str(ROOT / "csrc" / "include"),
                    str(ROOT / "tests" / "cpu" / "cuda" / f"{name}.cu"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
