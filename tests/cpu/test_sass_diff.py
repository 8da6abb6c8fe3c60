"""tools/sass_diff.py: kernels parsed from nvdisasm's text and classified, and, where nvcc
and nvdisasm are installed (CI has both), a comment-only change found identical and a
changed constant found changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts import load_script

sass_diff = load_script("tools/sass_diff.py")
sass_loops = load_script("tools/sass_loops.py")

# nvdisasm -c's shape: a section line per kernel, then /*address*/ instruction ; lines and
# labels numbered across the whole file
SASS = """
        .section        .text._Z1av,"ax",@progbits
.text._Z1av:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x4, PT ;
        /*0020*/              @P0  BRA `(.L_x_7) ;
        /*0030*/                   IADD3 R0, R0, 0x1, RZ ;
.L_x_7:
        /*0040*/                   EXIT ;
        .section        .text._Z1bv,"ax",@progbits
.text._Z1bv:
        /*0000*/                   BRA `(.L_x_9) ;
.L_x_9:
        /*0010*/                   EXIT ;
"""


def test_kernels_drop_addresses_and_number_labels_per_kernel():
    k = sass_diff.kernels(SASS)
    assert list(k) == ["_Z1av", "_Z1bv"]
    assert k["_Z1av"] == ["S2R R0, SR_TID.X", "ISETP.GE.AND P0, PT, R0, 0x4, PT",
                          "@P0 BRA `(L0)", "IADD3 R0, R0, 0x1, RZ", "L0:", "EXIT"]
    # a kernel's labels do not depend on how many the kernels before it have
    shifted = SASS.replace(".L_x_9", ".L_x_12").replace("/*0010*/", "/*0090*/")
    assert sass_diff.kernels(shifted) == k


def test_compare_tells_identical_reordered_and_changed_apart():
    base = {"same": ["A", "B"], "swap": ["A", "B", "C"], "grow": ["A", "B"], "gone": ["A"]}
    new = {"same": ["A", "B"], "swap": ["B", "A", "C"], "grow": ["A", "B", "B", "D"],
           "added": ["A"]}
    got = {d.name: d for d in sass_diff.compare(base, new)}
    assert {n: d.verdict for n, d in got.items()} == {
        "same": "identical", "swap": "reordered", "grow": "changed",
        "gone": "only in base", "added": "only in new"}
    assert (got["grow"].added, got["grow"].removed) == (2, 0)
    assert sorted(got["swap"].moved) == ["+B", "-B"]


def test_nvcc_flags_are_setup_pys():
    flags = sass_diff.nvcc_flags()
    assert {"-O3", "-std=c++17", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__"} <= set(flags)
    assert not any(f.startswith("-gencode") for f in flags)  # the tool passes sm_90a


KERNEL = """
__global__ void scale(float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= FACTOR;  // COMMENT
}
"""


def _sass(tmp_path: Path, name: str, factor: str, comment: str) -> dict[str, list[str]]:
    src = tmp_path / name / "k.cu"
    src.parent.mkdir()
    src.write_text(KERNEL.replace("FACTOR", factor).replace("COMMENT", comment))
    return sass_diff.kernels(sass_diff.compile_sass(src, tmp_path, src.parent,
                                                    sass_diff.nvcc_flags()))


@pytest.mark.skipif(not sass_loops.have_tools(), reason="needs nvcc and nvdisasm")
def test_a_comment_is_identical_and_a_constant_is_not(tmp_path):
    base = _sass(tmp_path, "base", "2.0f", "double it")
    comment = _sass(tmp_path, "comment", "2.0f", "twice the value")
    factor = _sass(tmp_path, "factor", "3.0f", "double it")
    assert base and all(v for v in base.values())
    assert {d.verdict for d in sass_diff.compare(base, comment)} == {"identical"}
    assert {d.verdict for d in sass_diff.compare(base, factor)} == {"changed"}


def test_a_file_that_one_side_lacks_has_no_kernels_there(tmp_path):
    assert sass_diff.compile_sass(tmp_path / "gone.cu", tmp_path, tmp_path, []) == ""
    only_new = sass_diff.compare(sass_diff.kernels(""), sass_diff.kernels(SASS))
    assert {d.verdict for d in only_new} == {"only in new"}
