"""The decode kernel's step loop stays within its instruction budget, checked without a GPU.

The kernel is bound by instruction issue (docs/decode-kernel-notes.md: 61% of issue slots
busy against 53-58% of DRAM at 8 x 128K), so the static size of its steady-state step
loop per 16-token tile is a performance figure CI can watch: 401 -> 380 per tile took
the 4-bit decode from 0.347 to 0.330 ms at 8 x 128K (H200, 2026-11-30), and 380 -> 366
(fp16 K slots, 62c5aee) from 0.329 to 0.318 ms. A change that grows the loop past the
budget fails here; if the growth is worth it, raise the budget in the same commit and
say why.

Needs nvcc and nvdisasm (``pip install nvidia-cuda-nvdisasm``; .ci/run installs it).
"""

from __future__ import annotations

import pytest

from tests.scripts import load_script

sass_loops = load_script("tools/sass_loops.py")

# (dtype, bits, V group, head tiles) -> static instructions per tile, nvcc 13.0 (62c5aee;
# 2 bits: V read at mantissa slots)
BUDGET = {
    ("bf16", 4, 128, 1): 366,  # the default: Llama-style bf16 model, 4 bits, GQA <= 8
    ("bf16", 2, 128, 1): 343,
}
SLACK = 1.02  # room for a compiler's reordering, not for a new instruction per value


@pytest.mark.skipif(not sass_loops.have_tools(), reason="needs nvcc and nvdisasm")
@pytest.mark.parametrize("shape", list(BUDGET), ids=lambda s: "{}-{}bit-g{}-ht{}".format(*s))
def test_step_loop_stays_within_its_instruction_budget(shape, tmp_path):
    dtype, bits, group, head_tiles = shape
    cubin = tmp_path / "decode.cubin"
    sass_loops.compile_instantiation(dtype, bits, group, head_tiles, sparse=False,
                                     channel_k=False, out=cubin)
    sass = sass_loops.disassemble(cubin)
    (name, (opcodes, labels, branches)), = sass_loops.parse(sass).items()
    step = sass_loops.step_loop(sass_loops.mma_loops(opcodes, labels, branches))
    assert step is not None, f"{name}: no loop with MMAs"
    # per 16-token tile and head tile: 8 k-steps of S^T and 8 m-tiles of O^T
    tiles = step.count("HMMA") / (16 * head_tiles)
    assert tiles >= 1, f"{name}: {step.count('HMMA')} MMAs in the step loop"
    per_tile = step.size / tiles
    assert per_tile <= BUDGET[shape] * SLACK, (
        f"{name}: {per_tile:.0f} static instructions per tile in the step loop, budget "
        f"{BUDGET[shape]} (+{SLACK - 1:.0%}); see docs/decode-kernel-notes.md")
