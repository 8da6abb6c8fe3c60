"""Why fp16 decode lifts its softmax weights (decode_kernel.cuh, fp16_lift_exp), on the
CPU: an emulation of the kernel's operands for one head, against the float32 attention
over the same dequantized pages.

The kernel computes O = 2 * sum (code - C) * fp16(P * scale / 2) + sum P * (zero + C *
scale) over a page's tokens, the first sum on tensor cores with fp32 accumulation, and
divides by sum P. With P <= 1 (exp2 of the logit minus the running maximum) and V ~ N(0,
1e-3), scale / 2 is about 2e-4, so P * scale / 2 falls below fp16's smallest normal
(6.1e-5) for P below about 0.3 and keeps few bits. fp16 kernels subtract the running
maximum less k, so that P <= 2^k with the largest scale / 2 times 2^k in [2^14, 2^15):
the operand stays normal and under fp16's maximum, and numerator and denominator carry
the same 2^k, which the warp's maximum (m - k) hands on. The GPU test of the kernel is
tests/gpu/test_numerical_edges.py::test_fp16_decode_keeps_small_values_precise.
"""

from __future__ import annotations

import pytest
import torch

from vllm_bitdecode import reference
from vllm_bitdecode.page_format import PageFormat

MAX_LIFT_EXP = 40  # decode_kernel.cuh's kMaxLiftExp


def fp16_lift_exp(x: float) -> int:
    """The kernel's fp16_lift_exp, on the float32 bit pattern as the kernel reads it."""
    bits = torch.tensor([x], dtype=torch.float32).view(torch.int32).item()
    return max(min(141 - (bits >> 23), MAX_LIFT_EXP), 0)


@pytest.mark.parametrize("x", [2.0**-25, 6e-5, 2e-4, 0.5, 1.0, 3.0, 32752.0])
def test_the_lift_puts_the_largest_operand_just_below_two_to_the_fifteen(x):
    """Every half scale an fp16 page can hold, from the smallest subnormal's half to the
    largest: P <= 2^k keeps P * x under 2^15 < 65504, and the largest P * x above 2^14."""
    e = fp16_lift_exp(x)
    assert 0 <= e < MAX_LIFT_EXP
    assert 2.0**14 <= x * 2.0**e < 2.0**15


@pytest.mark.parametrize("x", [0.0, -0.0, 2.0**-30])
def test_no_scale_gets_the_largest_lift_whose_weights_sum_stays_finite(x):
    assert fp16_lift_exp(x) == MAX_LIFT_EXP
    # 2^40 per token over 2^31 tokens, and times the largest fp16 value, in fp32
    assert torch.isfinite(torch.tensor(2.0 ** (MAX_LIFT_EXP + 31) * 65504, dtype=torch.float32))


@pytest.mark.parametrize("x", [float("inf"), 65504.0 * 4, 3e38])
def test_an_infinite_or_huge_scale_lifts_nothing(x):
    """A V group holding inf stores an infinite scale: no lift (k = 0), as before it, not
    a negative k that would shrink every other token's weight (review of the lift)."""
    assert fp16_lift_exp(x) == 0


def _emulated_output(codes, scale, zero, s, bits, k):
    """One head's output as the kernel forms it: weights exp2(s - (max - k))."""
    c = float(1 << (bits - 1))
    p = torch.exp2(s - (s.max() - k))
    operand = (p[:, None] * scale.float() / 2).to(torch.float16).float()  # B operand
    assert torch.isfinite(operand).all()
    o = ((codes.float() - c) * operand).sum(0)  # fp32 accumulation (the order is immaterial)
    zero_sum = (p[:, None] * (zero.float() + c * scale.float())).sum(0)
    return (2.0 * o + zero_sum) / p.sum()


@pytest.mark.parametrize(("v_std", "without_lift_above"), [(1e-3, 1e-2), (1e-4, 1e-2),
                                                          (1.0, None)])
def test_the_lift_keeps_small_values_precise(v_std, without_lift_above):
    """Relative error of the emulated output against the float32 attention over the same
    pages: 4-bit pages, group 128, 8K tokens. The weights are taken against the one global
    maximum, which makes the unlifted error larger than the kernel's, whose warps weight
    their tokens against their own running maxima (an emulation of those, in the review:
    6.2e-3 at 1e-3, 3.4e-2 at 1e-4); the lifted error is what fp16's 11 bits leave."""
    gen = torch.Generator().manual_seed(5)
    fmt = PageFormat(128, 4, 128, 16)
    v = (torch.randn(8192, 128, generator=gen) * v_std).to(torch.float16)
    codes, scale, zero = reference.quantize(v.float(), fmt, torch.float16)
    v_deq = reference.dequantize(codes, scale, zero, fmt)
    s = torch.randn(8192, generator=gen) * 4.0  # log2 domain
    w = torch.exp2(s.double() - s.max())
    exact = (w[:, None] * v_deq.double()).sum(0) / w.sum()

    def err(k):
        got = _emulated_output(codes, scale, zero, s, 4, k).double()
        return float((got - exact).norm() / exact.norm())

    lifted = err(fp16_lift_exp(float((scale.float() / 2).max())))
    assert lifted < 2e-3, lifted
    if without_lift_above is not None:
        assert err(0) > without_lift_above  # the imprecision the lift removes
