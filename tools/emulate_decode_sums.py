"""Why the decode kernel's V sums use centred codes: an fp32 emulation of one output channel.

The kernel's MMAs sum P * v_scale * code over a warp's tokens in an fp32 accumulator that
tensor cores round toward zero. Two ways to hold the codes:

* folded (until 2026-11-29): the MMA operand is M + code (M = 128 in bf16, 1024 in fp16,
  what the lop3 unpacking gives), and M * sum(P * v_scale) is subtracted at the end;
* centred: the operand is code - 2^(bits-1) against half the scale, the rest of each
  value summed separately and the MMA sum doubled at the end.

Both sums of the folded form are about M * sqrt(n) times the output for values of either
sign, so their rounding shows in the difference. Run (CPU, a minute):

    python tools/emulate_decode_sums.py

prints the median relative error of both forms against float64 over random V, with IEEE
round-to-nearest and with round-toward-zero accumulation.
"""

from __future__ import annotations

import numpy as np


def to_bf16(x: np.ndarray) -> np.ndarray:
    b = np.asarray(x, np.float32).copy().view(np.uint32)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return b.view(np.float32)


def to_fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def toward_zero(x: float) -> np.float32:
    f = np.float32(x)
    return np.nextafter(f, np.float32(0)) if abs(float(f)) > abs(x) else f


def one_warp(rng, n, magic, levels, round_16bit, accumulate):
    """(exact, folded, centred) sums of P * V over n tokens, 16 tokens per MMA step."""
    v = rng.standard_normal(n)
    lo, hi = v - 2 * rng.random(n), v + 2 * rng.random(n)  # each token's group range
    scale, zero = ((hi - lo) / levels).astype(np.float32), lo.astype(np.float32)
    code = np.clip(np.round((v - zero) / scale), 0, levels)
    p = np.exp(rng.standard_normal(n) - 3).astype(np.float32)
    exact = float(np.sum(p.astype(np.float64) * (code * scale.astype(np.float64) + zero)))
    centre = (levels + 1) // 2
    pb, pb_half = round_16bit(p * scale), round_16bit(p * scale * 0.5)
    zero_c = (zero + centre * scale).astype(np.float32)
    o = magic_sum = zero_sum = o_c = zero_sum_c = np.float32(0)
    for i in range(0, n, 16):
        t = slice(i, i + 16)
        o = accumulate(float(o) + float(np.sum(pb[t].astype(np.float64) * (magic + code[t]))))
        magic_sum = accumulate(float(magic_sum) + float(np.sum(pb[t].astype(np.float64) * magic)))
        zero_sum = np.float32(zero_sum + np.float32(np.sum(p[t] * zero[t])))
        o_c = accumulate(float(o_c) + float(np.sum(pb_half[t].astype(np.float64)
                                                   * (code[t] - centre))))
        zero_sum_c = np.float32(zero_sum_c + np.float32(np.sum(p[t] * zero_c[t])))
    return exact, float(o) - float(magic_sum) + float(zero_sum), 2 * float(o_c) + float(zero_sum_c)


def main() -> None:
    rng = np.random.default_rng(0)
    cases = [("bf16 4-bit, 2K tokens / warp", 128, 15, to_bf16, 2048),
             ("bf16 4-bit, 8K tokens / warp", 128, 15, to_bf16, 8192),
             ("fp16 2-bit, 512 tokens / warp", 1024, 3, to_fp16, 512)]
    for rounding, acc in (("nearest", np.float32), ("toward zero", toward_zero)):
        for name, magic, levels, r16, n in cases:
            errs = np.array([[abs(x - ex) / abs(ex) for x in (f, c)] for ex, f, c in (
                [sum(t) for t in zip(*(one_warp(rng, n, magic, levels, r16, acc)
                                       for _ in range(4)), strict=True)] for _ in range(10))])
            med = np.median(errs, axis=0)
            print(f"{rounding:12s} {name:30s} folded {med[0]:.1e}   centred {med[1]:.1e}")


if __name__ == "__main__":
    main()
