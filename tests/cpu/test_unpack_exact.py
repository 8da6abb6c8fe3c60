"""fragments.cuh's code unpacking is exact, checked on the host: nvcc compiles
tests/cpu/cuda/unpack_exact.cu (host code, no GPU needed), which runs
``unpack_pair_centred`` over every code of every slot and a run of random words, in bf16
and fp16 at 4 and 2 bits. Each slot is read under its own exponent (MantissaSlots), so a
wrong table or constant shows as wrong values here rather than as a GPU test's error."""

from __future__ import annotations

import pytest

from tests.host_cuda import run_host_program


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, int], tuple[int, int]]:
    out = run_host_program("unpack_exact", tmp_path_factory.mktemp("unpack"))
    table = {}
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        dtype, bits, checked, wrong = line.split()
        table[(dtype, int(bits))] = (int(checked), int(wrong))
    return table


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("bits", [4, 2])
def test_centred_pairs_are_exact(results, dtype, bits):
    checked, wrong = results[(dtype, bits)]
    # every code in every one of the 32 / bits slots, and 4,096 random words, per pair
    assert checked == (16 // bits) * ((1 << bits) * (32 // bits) + 4096)
    assert wrong == 0
