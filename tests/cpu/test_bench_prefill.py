"""benchmarks/bench_prefill.py on the CPU: the prefill step it times is the impl's real
one (its output matches the reference, in one window and in several), and the two Q
rotations it times agree up to the softmax scale. The CUDA ops and FlashAttention are
replaced by the reference; the timings themselves need the GPU."""

from __future__ import annotations

import types

import pytest
import torch

from tests.cpu.attention_stand_ins import (
    dequantize_pages,
    flash_attn_varlen,
    merge_attn_states,
    quantize_to_pages,
)
from tests.scripts import load_script
from vllm_bitdecode import config as bd_config
from vllm_bitdecode import reference as ref


@pytest.fixture
def bench(monkeypatch):
    from vllm.v1.attention.backends import fa_utils

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", flash_attn_varlen, raising=False)
    mod = load_script("benchmarks/bench_prefill.py")
    from vllm_bitdecode.backend import impl as impl_mod

    monkeypatch.setattr(mod, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(impl_mod, "_merge_attn_states", merge_attn_states)

    monkeypatch.setattr(impl_mod.ops, "quantize_to_pages", quantize_to_pages)
    monkeypatch.setattr(impl_mod.ops, "dequantize_pages", dequantize_pages)
    yield mod
    bd_config.set_active(bd_config.BitDecodeConfig())


class _OnceTimer:
    """Runs the call once; the time is not measured here."""

    def __call__(self, fn) -> float:
        fn()
        return 1.0


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("chunk, context, windows", [(32, 80, 1), (40, 300, 2), (16, 16, 1)])
def test_the_timed_step_is_the_impls_prefill(bench, bits, chunk, context, windows):
    gen = torch.Generator().manual_seed(chunk + context + bits)
    impl, cache, q, out, md = bench.prefill_step(chunk, context, bits, gen, window=128)
    assert len(md.prefill.groups) == windows
    out.fill_(float("nan"))
    impl.forward(types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn"), q, q, q,
                 cache, md, output=out)
    want = ref.paged_attention(q, cache, md.prefill.block_table,
                               torch.tensor([context], dtype=torch.int32),
                               torch.tensor([0, chunk], dtype=torch.int32), bench.SCALE,
                               md.page_format, True)
    assert float((out.float() - want).norm() / want.norm()) < 1e-2

    r = bench.bench_bitdecode(chunk, context, bits, _OnceTimer(), gen, window=128)
    assert sorted(r["parts"]) == ["attention", "dequantize", "rotate_q_fp32",
                                  "rotate_q_hadamard"]
    assert r["windows"] == windows and r["dequantized_tokens"] >= context


def test_the_two_rotations_agree_up_to_the_scale(bench):
    q = torch.randn(64, bench.HQ, bench.D, generator=torch.Generator().manual_seed(0))
    q = q.to(torch.bfloat16)
    rot = ref.rotation_matrix(bench.D)
    exact = q.double() @ rot.double()
    hadamard = (q @ (rot.sign() / 16).to(torch.bfloat16)).double() * 16 / bench.D**0.5
    assert float((hadamard - exact).norm() / exact.norm()) < 4e-3  # one bf16 rounding
    assert float((hadamard - exact).norm() / exact.norm()) > 0  # (not the same numbers)
