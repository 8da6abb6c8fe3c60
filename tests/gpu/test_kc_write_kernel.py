"""Per-channel K mode's write (issue #7): ``ops.write_tokens_kc`` against
``reference_kc.write_tokens_kc``, byte for byte, step after step.

Several requests are driven through random schedules: prefill chunks that end mid-page
or fill several pages, single-token decode steps, requests left out of a step, shuffled
rows, CUDA-graph padding rows and tokens. After every step the GPU's pages and residual
must equal the reference's exactly (both start from the same garbage pages and a
NaN-filled residual, so a byte written where it should not be shows).
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.gpu.test_kernels import DEV, _ops
from vllm_bitdecode import reference_kc as kc
from vllm_bitdecode.page_format import PageFormat

pytestmark = pytest.mark.gpu

KV_HEADS, SLOTS = 2, 4


def _keys(n, dtype, gen):
    """Keys with a token-independent part and an outlier channel, as real models have."""
    base = torch.randn(KV_HEADS, 128, generator=gen) * 3
    k = torch.randn(n, KV_HEADS, 128, generator=gen) + base
    k[:, :, 7] *= 20
    return k.to(dtype)


@pytest.mark.parametrize("k_param_bits", [16, 8], ids=["fp16-params", "fp8-params"])
@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_write_matches_reference_step_by_step(dtype, bits, block_size, k_param_bits):
    gen = torch.Generator().manual_seed(bits * 100 + block_size + k_param_bits)
    rng = random.Random(bits * 100 + block_size)
    layout = kc.KCPageLayout(PageFormat(128, bits, 64, block_size), k_param_bits)
    lengths = [5 * block_size + 3, 3 * block_size, 2 * block_size + block_size // 2]
    blocks_needed = sum(-(-n // block_size) for n in lengths)
    perm = torch.randperm(blocks_needed + 3, generator=gen).tolist()
    reqs = []
    for i, n in enumerate(lengths):
        nb = -(-n // block_size)
        reqs.append(dict(k=_keys(n, dtype, gen), v=(torch.randn(n, KV_HEADS, 128,
                                                                 generator=gen) * 2).to(dtype),
                         blocks=perm[:nb], done=0, n=n, slot=SLOTS - 1 - i))
        perm = perm[nb:]
    cache = torch.randint(0, 256, (blocks_needed + 3, KV_HEADS, layout.head_region_bytes),
                          generator=gen, dtype=torch.uint8)
    residual = kc.new_residual(SLOTS, KV_HEADS, layout, dtype)
    cache_gpu, residual_gpu = cache.to(DEV), residual.to(DEV)
    steps = 0
    while any(r["done"] < r["n"] for r in reqs):
        live = [r for r in reqs if r["done"] < r["n"]]
        work = []
        for r in live:
            if rng.random() < 0.2:
                continue  # left out of this step
            left = r["n"] - r["done"]
            m = 1 if r["done"] > 0 and rng.random() < 0.5 else rng.randint(1, min(left, 3 *
                                                                                     block_size))
            work.append((r, min(m, left)))
        if not work:
            continue
        rng.shuffle(work)
        keys, values, slots, qsl, lens, row_slot = [], [], [], [0], [], []
        for r, m in work:
            s, e = r["done"], r["done"] + m
            keys.append(r["k"][s:e])
            values.append(r["v"][s:e])
            slots += [r["blocks"][p // block_size] * block_size + p % block_size
                      for p in range(s, e)]
            qsl.append(qsl[-1] + m)
            lens.append(e)
            row_slot.append(r["slot"])
        pad_rows, pad_tokens = rng.randint(0, 2), rng.randint(0, 3)
        qsl += [qsl[-1]] * pad_rows
        lens += [0] * pad_rows
        row_slot += [0] * pad_rows  # slot 0 belongs to no request
        key = torch.cat(keys + [torch.zeros(pad_tokens, KV_HEADS, 128, dtype=dtype)])
        value = torch.cat(values + [torch.zeros(pad_tokens, KV_HEADS, 128, dtype=dtype)])
        slots += [-1] * pad_tokens
        args = [torch.tensor(slots, dtype=torch.int64), torch.tensor(qsl, dtype=torch.int32),
                torch.tensor(lens, dtype=torch.int32), torch.tensor(row_slot, dtype=torch.int32)]
        kc.write_tokens_kc(cache, residual, key, value, *args, layout)
        _ops().write_tokens_kc(key.to(DEV), value.to(DEV), *(a.to(DEV) for a in args),
                               cache_gpu, residual_gpu, bits, 64, block_size, k_param_bits)
        torch.cuda.synchronize()
        for r, m in work:
            r["done"] += m
        steps += 1
        diff = (cache_gpu.cpu() != cache).nonzero()
        assert diff.numel() == 0, f"step {steps}: {diff.shape[0]} page bytes differ, first " \
                                  f"{diff[:4].tolist()}"
        assert torch.equal(residual_gpu.cpu().view(torch.int16), residual.view(torch.int16)), \
            f"step {steps}: residual differs"
    assert steps >= 3


@pytest.mark.parametrize("bits", [4, 2])
def test_keys_at_the_edge_of_fp16_stay_finite(bits):
    """fp16 model, fp16 K parameters, every channel of every K group holding -65504 or
    +65504 and another value anywhere in range: the pages equal the reference's byte for
    byte (its zero point moved one fp16 step where rounding it would carry an end code's
    read-back past the maximum, reference_kc.centred_zero), and read back finite."""
    gen = torch.Generator().manual_seed(60 + bits)
    block_size, n = 16, 64 * 16  # 64 K groups of 16 tokens, all full
    layout = kc.KCPageLayout(PageFormat(128, bits, 64, block_size), 16)
    # each channel: one end at +-65504 (its sign the channel's), the other anywhere
    other = (torch.rand(n // 2, KV_HEADS, 128, generator=gen) * 2 - 1) * 65504
    edge = torch.sign(torch.randn(1, KV_HEADS, 128, generator=gen)).expand_as(other) * 65504
    key = torch.stack([edge, other], 1).flatten(0, 1).to(torch.float16)  # alternate tokens
    value = torch.randn(n, KV_HEADS, 128, generator=gen).to(torch.float16)
    blocks = n // block_size
    cache = torch.randint(0, 256, (blocks + 1, KV_HEADS, layout.head_region_bytes),
                          generator=gen, dtype=torch.uint8)
    residual = kc.new_residual(SLOTS, KV_HEADS, layout, torch.float16)
    cache_gpu, residual_gpu = cache.to(DEV), residual.to(DEV)
    args = [torch.arange(n, dtype=torch.int64), torch.tensor([0, n], dtype=torch.int32),
            torch.tensor([n], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)]
    kc.write_tokens_kc(cache, residual, key, value, *args, layout)
    _ops().write_tokens_kc(key.to(DEV), value.to(DEV), *(a.to(DEV) for a in args),
                           cache_gpu, residual_gpu, bits, 64, block_size, 16)
    torch.cuda.synchronize()
    diff = (cache_gpu.cpu() != cache).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} page bytes differ, first {diff[:4].tolist()}"
    k, _ = kc.read_pages_kc(cache, torch.arange(blocks), layout, torch.float16)
    assert torch.isfinite(k.to(torch.float16)).all()
    k_out = torch.full((n, KV_HEADS, 128), float("nan"), dtype=torch.float16, device=DEV)
    v_out = torch.full_like(k_out, float("nan"))
    _ops().dequantize_pages_kc(cache_gpu, torch.arange(blocks, dtype=torch.int32,
                                                       device=DEV)[None],
                               torch.tensor([n], dtype=torch.int32, device=DEV),
                               torch.tensor([0, n], dtype=torch.int32, device=DEV), k_out,
                               v_out, bits, 64, block_size, n, 16)
    assert torch.isfinite(k_out).all()
