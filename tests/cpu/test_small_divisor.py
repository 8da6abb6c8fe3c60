"""fragments.cuh's SmallDivisor (the decode kernel's query row -> query token, without a
runtime division) equals integer division over its whole range, checked on the host:
nvcc compiles tests/cpu/cuda/small_divisor.cu (no GPU needed)."""

from __future__ import annotations

import pytest

from tests.host_cuda import run_host_program


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[int, int]]:
    out = run_host_program("small_divisor", tmp_path_factory.mktemp("small_divisor"))
    return {name: (int(checked), int(wrong))
            for name, checked, wrong in (line.split() for line in out.splitlines())}


def test_exact_over_the_documented_range(results):
    # every n < 256 for every divisor 1..256: query rows (< 16) over query heads per KV
    # head (<= 16) are well inside
    assert results["documented"] == (256 * 256, 0)


def test_the_range_is_a_real_bound(results):
    # far past it the reciprocal's rounding shows: the check above is not vacuous
    checked, wrong = results["beyond"]
    assert checked == 256 * 4096 and wrong > 0
