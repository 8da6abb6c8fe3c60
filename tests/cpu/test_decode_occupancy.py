"""The decode kernels keep their CTAs per SM: registers and spills from ptxas, no GPU.

Decode is bound by latency hiding as much as by bytes, so the split plan fills every
resident CTA slot of a wave (metadata.plan_num_splits). On 2026-11-30 the per-token kernel
had crept from 128 to 137 registers, which took it from 4 to 3 CTAs per SM (8 x 128K on
an H200: 0.346 ms in a run before, 0.361 after), and nothing had noticed. The launch
bounds now ask for 4 (V groups of 64 or 128) or 3 (V groups of 32) CTAs per SM with one
head tile; this test compiles the four instantiation files (bf16 / fp16, 4 / 2 bits) for
sm_90a and checks that ptxas met the bound without spilling, so that a change that needs
more registers fails here instead of slowing down or spilling on the GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REGISTERS = 65536  # per SM on sm_90
THREADS = 128  # kDecodeWarps * 32


def _ptxas_report(source: Path, tmp_path: Path) -> dict[str, tuple[int, int, int]]:
    """Mangled kernel name -> (registers, spill store bytes, stack frame bytes)."""
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr",
         "-gencode=arch=compute_90a,code=sm_90a", f"-I{ROOT / 'csrc' / 'include'}",
         "-c", str(source), "-o", str(tmp_path / "k.o"), "-Xptxas", "-v"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, tuple[int, int, int]] = {}
    name, spill, stack = None, 0, 0
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name, spill, stack = m.group(1), 0, 0
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if m and name:
            stack, spill = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name] = (int(m.group(1)), spill, stack)
            name = None
    return out


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("source", ["kernels_bf16_4bit", "kernels_bf16_2bit",
                                    "kernels_fp16_4bit", "kernels_fp16_2bit"])
def test_one_head_tile_decode_kernels_keep_their_ctas_per_sm(tmp_path, source):
    report = _ptxas_report(ROOT / "csrc" / "instantiations" / f"{source}.cu", tmp_path)
    # decode_kernel<T, HEAD, BITS, GROUP, HEAD_TILES, SPARSE, KC, SELECT (0, 1 or 16), KP8>
    shape = re.compile(
        r"decode_kernelI\w+?Li128ELi(\d)ELi(\d+)ELi(\d)ELb(\d)ELb(\d)ELi(\d+)ELb(\d)E")
    checked = 0
    for name, (regs, spill, stack) in report.items():
        m = shape.search(name)
        if not m:
            continue
        # Every kernel, one or two head tiles: a stack frame beyond what spills need is
        # an array (o) in local memory, read and written around every V MMA, as every
        # kernel at V group 64 had until 2026-12-05 (160-336 bytes; 2-35x slower). The
        # one-head-tile sparse and selection kernels at group 64 spill a few bytes.
        assert stack <= 32 and (stack == 0 or spill > 0), f"{name}: {stack} bytes of stack"
        if m.group(3) != "1":
            continue
        group = int(m.group(2))
        ctas = 4 if group >= 64 else 3
        what = (f"group {group}, sparse {m.group(4)}, channel K {m.group(5)}, "
                f"selection {m.group(6)}, e4m3 K params {m.group(7)}")
        allocated = -(-regs // 8) * 8  # per thread, in the allocation's units of 8
        assert allocated * THREADS * ctas <= REGISTERS, f"{what}: {regs} registers"
        # No kernel spills but the sparse and selection ones at V group 64 (4 bits): with
        # the V loop unrolled there (its rolled form kept o in local memory) ptxas stores
        # 4-32 bytes for them. The others stay at zero.
        sparse_or_selection = m.group(4) == "1" or m.group(6) != "0"
        allowed = 32 if group == 64 and m.group(1) == "4" and sparse_or_selection else 0
        assert spill <= allowed, f"{what}: {spill} bytes of spill stores"
        checked += 1
    # V groups 32 / 64 / 128 x per-token, sparse, channel K (fp16 and e4m3 params),
    # selection by token and by page
    assert checked == 18, report
