"""The CUDA headers' index maps equal their Python twins, checked on the host: nvcc
compiles tests/cpu/cuda/index_twins.cu (host code, no GPU needed) and the printed maps
are compared with page_format.py's channel-of-slot orders and reference_kc's K-parameter
order. A page written by a kernel and read by the reference (or the other way) with a
different order would fail only on the GPU otherwise."""

from __future__ import annotations

import pytest

from tests.host_cuda import run_host_program
from vllm_bitdecode import reference_kc
from vllm_bitdecode.page_format import PageFormat


@pytest.fixture(scope="module")
def cuda_maps(tmp_path_factory) -> dict[str, list[int]]:
    out = run_host_program("index_twins", tmp_path_factory.mktemp("twins"))
    return {line.split()[0]: [int(x) for x in line.split()[1:]] for line in out.splitlines()}


@pytest.mark.parametrize("bits", [4, 2])
def test_row_orders_match_page_format(cuda_maps, bits):
    fmt = PageFormat(128, bits, 128, 16)
    assert cuda_maps[f"k{bits}"] == fmt.k_channel_of_slot().tolist()
    assert cuda_maps[f"v{bits}"] == fmt.v_channel_of_slot().tolist()


def test_k_param_order_matches_reference_kc(cuda_maps):
    assert cuda_maps["kc_param_index"] == reference_kc.k_param_index(128).tolist()
