"""Checks of the CPU reference in ``vllm_bitdecode.reference``.

The reference is the oracle of the CUDA kernel tests, so it is checked here against
math written out independently: error bounds derived from the rounding of the
stored parameters, hand-packed words, dense float64 attention.
"""

import math

import pytest
import torch

from vllm_bitdecode import reference as ref
from vllm_bitdecode.page_format import PageFormat

HEAD = 128
DTYPES = (torch.bfloat16, torch.float16)
# Machine epsilon (2 * unit roundoff) of the parameter dtype, see test_round_trip_error_bound.
PARAM_EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _data(shape, dtype, seed, offset=0.0):
    """Gaussian data with a per-token scale and offset, rounded to ``dtype``."""
    g = _gen(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.rand(shape[:-1] + (1,), generator=g) * 3 + offset
    return x.to(dtype)


def _group_view(t, fmt):
    return t.float().unflatten(-1, (fmt.groups, fmt.group_size))


# ---- quantize / dequantize ---------------------------------------------------------------
@pytest.mark.parametrize("offset", [0.0, 5.0])
@pytest.mark.parametrize("tokens", [7, 33])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bound(dtype, bits, group_size, tokens, offset):
    """Every value dequantizes within half a step, plus what rounding scale/zero costs.

    With lo/hi the group's min/max, the stored s = fl(s*), s* = (hi-lo)/L, and z = fl(lo),
    where fl rounds to the param dtype, |s - s*| <= eps*s and |z - lo| <= eps*|z| (eps =
    machine epsilon = 2*unit roundoff, which absorbs rounding relative to the exact value).
    For x in [lo, hi] and t = (x - z)/s:
      0 <= t <= L: the nearest code is within s/2;
      t > L (clamped to L): x - (L*s + z) <= (hi - lo - L*s) + (lo - z) <= eps*(L*s + |z|);
      t < 0 (clamped to 0): z - x <= z - lo <= eps*|z|.
    So |x - deq| <= s/2 + eps*(|z| + L*s), plus float32 slack for the arithmetic itself.
    """
    fmt = PageFormat(HEAD, bits, group_size, 16)
    x = _data((tokens, 3, HEAD), dtype, seed=tokens * 10 + bits, offset=offset)
    codes, scale, zero = ref.quantize(x, fmt, dtype)
    assert codes.dtype == torch.int32 and codes.shape == x.shape
    assert scale.dtype == dtype and zero.dtype == dtype
    assert scale.shape == zero.shape == (tokens, 3, fmt.groups)
    deq = ref.dequantize(codes, scale, zero, fmt)
    assert deq.dtype == torch.float32 and deq.shape == x.shape

    assert int(codes.min()) >= 0 and int(codes.max()) <= fmt.levels
    # the min/max quantizer uses the full code range of every (non-constant) group
    cg = codes.unflatten(-1, (fmt.groups, group_size))
    assert torch.all(cg.amin(-1) == 0) and torch.all(cg.amax(-1) == fmt.levels)

    s = scale.float().unsqueeze(-1)
    z = zero.float().unsqueeze(-1)
    xg = _group_view(x, fmt)
    err = (xg - _group_view(deq, fmt)).abs()
    slack = 2.0**-20 * (z.abs() + fmt.levels * s + xg.abs())
    bound = 0.5 * s + PARAM_EPS[dtype] * (z.abs() + fmt.levels * s) + slack
    assert torch.all(err <= bound), float((err - bound).max())
    # and the bound is not vacuous: the worst error is close to half a step somewhere
    assert float((err / s).max()) > 0.4


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_are_exact(dtype, bits, group_size):
    """A group whose values are all equal stores scale 0, codes 0 and comes back exactly."""
    fmt = PageFormat(HEAD, bits, group_size, 16)
    x = _data((9, 2, HEAD), dtype, seed=bits + group_size)
    const = torch.randn(9, 2, 1, generator=_gen(1)).to(dtype) * 7
    x[..., :group_size] = const  # group 0 is constant
    x[:3, :, -group_size:] = 0  # the last group of some tokens is all zeros
    codes, scale, zero = ref.quantize(x, fmt, dtype)
    assert torch.all(scale[..., 0] == 0)
    assert torch.all(codes[..., :group_size] == 0)
    assert torch.equal(zero[..., 0], x[..., 0])  # const, or 0 where group 0 is also last
    deq = ref.dequantize(codes, scale, zero, fmt)
    assert torch.equal(deq[..., :group_size], x[..., :group_size].float())
    assert torch.equal(deq[:3, :, -group_size:], torch.zeros(3, 2, group_size))
    # the non-constant groups are still quantized normally
    if fmt.groups > 1:
        assert torch.all(scale[3:, :, -1] > 0)


def _wide_groups(group_size, seed):
    """bf16 tokens whose every group spans both signs near the maximum, so that hi - lo
    overflows float32: +-3e38 in each group, the bf16 maximum in one, the rest between."""
    big = torch.finfo(torch.bfloat16).max
    x = (torch.rand(9, 2, HEAD, generator=_gen(seed)) * 2 - 1) * 3e38
    x[..., ::group_size] = 3e38
    x[..., 1::group_size] = -3e38
    x[0, 0, :2] = torch.tensor([big, -big])
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("bits", [4, 2])
def test_groups_overflowing_float32_range_stay_finite(bits, group_size):
    """hi - lo = 6e38 overflows float32: there (only there) the scale is hi/L - lo/L and
    the codes x/s - z/s, and dequantization rounds c*s + z once (c*s alone may pass the
    maximum); before, the scale was inf and every value NaN (0 * inf). Every value now
    comes back finite, within the bound of test_round_trip_error_bound."""
    fmt = PageFormat(HEAD, bits, group_size, 16)
    x = _wide_groups(group_size, seed=bits + group_size)
    xg = _group_view(x, fmt)
    assert torch.isinf(xg.amax(-1) - xg.amin(-1)).all()  # the case at hand, in every group
    codes, scale, zero = ref.quantize(x, fmt, torch.bfloat16)
    assert torch.isfinite(scale.float()).all() and torch.all(scale.float() > 0)
    cg = codes.unflatten(-1, (fmt.groups, group_size))
    assert torch.all(cg.amin(-1) == 0) and torch.all(cg.amax(-1) == fmt.levels)
    deq = ref.dequantize(codes, scale, zero, fmt)
    assert torch.isfinite(deq).all()
    assert torch.isfinite(deq.to(torch.bfloat16)).all()  # also in the model dtype
    s = scale.float().unsqueeze(-1)
    z = zero.float().unsqueeze(-1)
    err = (xg - _group_view(deq, fmt)).abs()
    slack = 2.0**-20 * (z.abs() + fmt.levels * s + xg.abs())
    bound = 0.5 * s + PARAM_EPS[torch.bfloat16] * (z.abs() + fmt.levels * s) + slack
    assert torch.all(err <= bound), float((err - bound).max())
    # the scale is the quotient written out: hi / L - lo / L, then rounded to bf16
    hi, lo = xg.amax(-1), xg.amin(-1)
    assert torch.equal(scale, (hi / fmt.levels - lo / fmt.levels).to(torch.bfloat16))


@pytest.mark.parametrize("bits", [4, 2])
def test_overflow_branch_leaves_ordinary_groups_alone(bits):
    """Groups whose hi - lo is finite, even just below the float32 maximum, keep the plain
    arithmetic bit for bit next to overflowing groups in the same tensor; inf inputs still
    give a non-finite scale (the branch does not make them finite)."""
    fmt = PageFormat(HEAD, bits, 32, 16)
    x = _wide_groups(32, seed=bits).float()
    x[1:4] /= 2.2  # +-1.36e38: hi - lo = 2.7e38, finite
    x[4:7] /= 1e20
    x[6, 1, :32] = 0.75  # zero range
    x[7, 0, 40] = float("inf")
    x = x.to(torch.bfloat16)
    codes, scale, zero = ref.quantize(x, fmt, torch.bfloat16)
    xg = _group_view(x, fmt)
    hi, lo = xg.amax(-1), xg.amin(-1)
    plain = torch.isfinite(hi - lo)
    assert plain[1:7].all() and not plain[0].any() and not plain[7, 0, 1]
    s_plain = ((hi - lo) / fmt.levels).to(torch.bfloat16)
    assert torch.equal(scale[plain], s_plain[plain])
    sp = s_plain.float().unsqueeze(-1)
    zp = lo.to(torch.bfloat16).float().unsqueeze(-1)
    c_plain = torch.where(sp > 0, torch.clamp(torch.round((xg - zp) / torch.where(sp > 0, sp, 1.0)),
                                              0, fmt.levels), torch.zeros_like(xg))
    cg = codes.unflatten(-1, (fmt.groups, 32))
    assert torch.equal(cg[plain], c_plain.to(torch.int32)[plain])
    deq = _group_view(ref.dequantize(codes, scale, zero, fmt), fmt)
    assert torch.equal(deq[plain], (cg.float() * scale.float().unsqueeze(-1)
                                    + zero.float().unsqueeze(-1))[plain])
    assert torch.isinf(scale[7, 0, 1].float())  # a group holding +inf


@pytest.mark.parametrize("bits", [4, 2])
def test_top_code_dequantizes_within_the_dtype_range(bits):
    """fp16 groups spanning +-65504: (hi - lo) / L = 8733.9 rounds to 8736 (43669.3 to 43680
    at 2 bits), whose top code would dequantize to 65536, inf in fp16. There the scale is
    one fp16 step smaller and every value comes back finite in fp16; other groups keep the
    nearest scale."""
    fmt = PageFormat(HEAD, bits, 64, 16)
    big = torch.finfo(torch.float16).max
    x = (torch.rand(5, 2, HEAD, generator=_gen(bits)) * 2 - 1) * 6e4
    x[:3, :, ::64] = big
    x[:3, :, 1::64] = -big  # tokens 0-2: every group spans +-65504
    x = x.to(torch.float16)
    codes, scale, zero = ref.quantize(x, fmt, torch.float16)
    xg = _group_view(x, fmt)
    nearest = ((xg.amax(-1) - xg.amin(-1)) / fmt.levels).to(torch.float16)
    one_down = (nearest.view(torch.int16) - 1).view(torch.float16)
    assert torch.equal(scale[:3], one_down[:3]) and torch.equal(scale[3:], nearest[3:])
    assert float(nearest[0, 0, 0]) == (8736.0 if bits == 4 else 43680.0)
    deq = ref.dequantize(codes, scale, zero, fmt)
    assert torch.isfinite(deq.to(torch.float16)).all()
    cg = codes.unflatten(-1, (fmt.groups, 64))
    assert torch.all(cg.amin(-1) == 0) and torch.all(cg.amax(-1) == fmt.levels)
    s = scale.float().unsqueeze(-1)
    z = zero.float().unsqueeze(-1)
    err = (xg - _group_view(deq, fmt)).abs()
    # one step down: |s - (hi - lo) / L| <= 1.5 steps, bounded by 2 eps * s
    bound = 0.5 * s + 2 * PARAM_EPS[torch.float16] * (z.abs() + fmt.levels * s)
    assert torch.all(err <= bound), float((err - bound).max())


# measured (seed 0, 257x8x128 N(0,1)): 4-bit .079/.090/.100, 2-bit .394/.451/.503
REL_ERR_MAX = {
    (4, 32): 0.095,
    (4, 64): 0.105,
    (4, 128): 0.12,
    (2, 32): 0.47,
    (2, 64): 0.53,
    (2, 128): 0.6,
}


def _rel_err(x, bits, group_size, dtype):
    fmt = PageFormat(HEAD, bits, group_size, 16)
    deq = ref.dequantize(*ref.quantize(x, fmt, dtype), fmt)
    xf = x.double()
    return float((xf - deq.double()).norm() / xf.norm())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_relative_error_on_gaussian_data(dtype, bits, group_size):
    """Accuracy floor per bit width: a regression here means the quantizer lost precision."""
    x = torch.randn(257, 8, HEAD, generator=_gen(0)).to(dtype)
    err = _rel_err(x, bits, group_size, dtype)
    assert err < REL_ERR_MAX[(bits, group_size)], err
    # and no better than uniform rounding noise allows (a broken test would show ~0)
    assert err > 0.3 * REL_ERR_MAX[(bits, group_size)], err


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_finer_groups_are_more_accurate(dtype, bits):
    """Smaller groups have tighter min/max ranges, hence smaller steps and errors."""
    x = torch.randn(129, 8, HEAD, generator=_gen(2)).to(dtype)
    errs = [_rel_err(x, bits, g, dtype) for g in (32, 64, 128)]
    assert errs[0] < errs[1] < errs[2], errs


# ---- pack / unpack -----------------------------------------------------------------------
def _order(fmt, which):
    return fmt.k_channel_of_slot() if which == "k" else fmt.v_channel_of_slot()


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("bits", [4, 2])
def test_pack_unpack_round_trip(bits, which):
    """unpack_rows inverts pack_rows for random codes, and a row uses every bit."""
    fmt = PageFormat(HEAD, bits, 128, 16)
    order = _order(fmt, which)
    codes = torch.randint(0, fmt.levels + 1, (5, 3, HEAD), generator=_gen(bits), dtype=torch.int32)
    rows = ref.pack_rows(codes, order, bits)
    assert rows.dtype == torch.uint8 and rows.shape == (5, 3, fmt.row_bytes)
    assert torch.equal(ref.unpack_rows(rows, order, bits), codes)
    full = torch.full((HEAD,), fmt.levels, dtype=torch.int32)
    assert torch.all(ref.pack_rows(full, order, bits) == 0xFF)


# Words worked out by hand from the documented orders (slot i = bits [bits*i, +bits)):
#  K 4-bit word 0 (lane t=0, k-steps 0,1): slots 0..3 = ch 0,8,16,24; slots 4..7 = ch 1,9,17,25
#  K 4-bit word 1 (t=0, k-steps 2,3):      ch 32,40,48,56, 33,41,49,57
#  K 4-bit word 4 (t=1, k-steps 0,1):      ch 2,10,18,26, 3,11,19,27
#  K 2-bit word 0 (t=0, k-steps 0..3):     ch 0,8,..,56 then 1,9,..,57
#  V 4-bit word 0 / 1 (lane group 0):      ch 8p / ch 64 + 8p;  word 2 (group 1): ch 1 + 8p
#  V 2-bit word 0 / 1 (lane groups 0, 1):  ch 8p / ch 1 + 8p
MOD, DIV8 = "c % (levels+1)", "(c // 8) % (levels+1)"
CODE_OF = {MOD: lambda c, n: c % n, DIV8: lambda c, n: (c // 8) % n}


@pytest.mark.parametrize(
    ("which", "bits", "code_of", "word", "expected"),
    [
        ("k", 4, MOD, 0, 0x91918080),
        ("k", 4, DIV8, 0, 0x32103210),
        ("k", 4, DIV8, 1, 0x76547654),
        ("k", 4, MOD, 4, 0xB3B3A2A2),
        ("k", 2, MOD, 0, 0x55550000),
        ("k", 2, DIV8, 0, 0xE4E4E4E4),
        ("v", 4, MOD, 0, 0x80808080),
        ("v", 4, DIV8, 0, 0x76543210),
        ("v", 4, DIV8, 1, 0xFEDCBA98),
        ("v", 4, MOD, 2, 0x91919191),
        ("v", 2, DIV8, 0, 0xE4E4E4E4),
        ("v", 2, MOD, 1, 0x55555555),
    ],
)
def test_pack_rows_matches_hand_packed_word(which, bits, code_of, word, expected):
    """pack_rows puts channels where the documented order says, as little-endian words."""
    fmt = PageFormat(HEAD, bits, 128, 16)
    c = torch.arange(HEAD)
    codes = CODE_OF[code_of](c, fmt.levels + 1).to(torch.int32)
    rows = ref.pack_rows(codes, _order(fmt, which), bits)
    got = rows[4 * word : 4 * word + 4].tolist()
    assert got == list(expected.to_bytes(4, "little"))


def test_pack_rows_first_bytes():
    """The same thing spelled as bytes, so endianness cannot be mistaken twice."""
    fmt = PageFormat(HEAD, 4, 128, 16)
    codes = (torch.arange(HEAD) % 16).to(torch.int32)
    rows = ref.pack_rows(codes, fmt.k_channel_of_slot(), 4)
    assert rows[:4].tolist() == [0x80, 0x80, 0x91, 0x91]


# ---- rotation ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotate_is_matrix_product(dtype):
    """rotate(x) == x @ rotation_matrix: the kernels may use either form."""
    x = torch.randn(33, 4, HEAD, generator=_gen(3)).to(dtype)
    y = ref.rotate(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, x.float() @ ref.rotation_matrix(HEAD), atol=1e-5, rtol=0)


def test_rotation_matrix_is_orthonormal_signed_hadamard():
    """R R^T = I (so Q_r K_r^T = Q K^T), and every entry is +-1/sqrt(d)."""
    r = ref.rotation_matrix(HEAD)
    assert r.shape == (HEAD, HEAD)
    torch.testing.assert_close(r @ r.T, torch.eye(HEAD), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.abs(), torch.full_like(r, HEAD**-0.5), atol=1e-7, rtol=0)
    assert not torch.equal(r, r[0].abs().expand_as(r))  # not a degenerate matrix


def test_rotate_preserves_dot_products():
    """Scores are unchanged by rotating Q and K alike (relative to |q||k|)."""
    g = _gen(4)
    q = torch.randn(64, HEAD, generator=g)
    k = torch.randn(64, HEAD, generator=g) * 3 + 1
    dots = (q.double() * k.double()).sum(-1)
    dots_r = (ref.rotate(q).double() * ref.rotate(k).double()).sum(-1)
    norms = q.double().norm(dim=-1) * k.double().norm(dim=-1)
    assert float(((dots - dots_r).abs() / norms).max()) < 1e-4
    # and the rotation really changes the vectors
    assert float((ref.rotate(k) - k).abs().max()) > 1.0


@pytest.mark.parametrize("bits", [4, 2])
def test_rotation_helps_with_outlier_channels(bits):
    """Outlier channels blow up a group's range; rotating spreads them, so the score error
    ||Q K^T - Q_r K_deq^T|| with rotation beats the one without."""
    g = _gen(5)
    fmt = PageFormat(HEAD, bits, 128, 16)
    k = torch.randn(64, HEAD, generator=g)
    outliers = torch.randperm(HEAD, generator=g)[:4]
    k[:, outliers] *= 20
    k = k.to(torch.bfloat16)
    q = torch.randn(16, HEAD, generator=g).to(torch.bfloat16)
    exact = q.double() @ k.double().T

    k_plain = ref.dequantize(*ref.quantize(k, fmt, torch.bfloat16), fmt)
    err_plain = float((exact - q.double() @ k_plain.double().T).norm() / exact.norm())
    k_rot = ref.dequantize(*ref.quantize(ref.rotate(k), fmt, torch.bfloat16), fmt)
    err_rot = float((exact - ref.rotate(q).double() @ k_rot.double().T).norm() / exact.norm())
    print(f"\n{bits}-bit relative score error: no rotation {err_plain:.4f}, rotation {err_rot:.4f}")
    assert err_rot < err_plain
    assert err_rot < 0.6 * err_plain  # by a clear margin, not by noise


# ---- pages -------------------------------------------------------------------------------
NUM_BLOCKS = 13
KV_HEADS = 8


def _layout_of(cache, fmt, block, offset):
    """Bytes of one token slot of every head: K row, V row, params (independent slicing:
    token t lies in 16-token tile t // 16, laid out as K rows | V rows | params)."""
    rb, pb = fmt.row_bytes, fmt.param_bytes_per_token
    tile = offset // 16 * 16 * (2 * rb + pb)
    offset %= 16
    base_v = tile + 16 * rb
    base_p = tile + 32 * rb
    k = cache[block, :, tile + offset * rb : tile + (offset + 1) * rb]
    v = cache[block, :, base_v + offset * rb : base_v + (offset + 1) * rb]
    p = cache[block, :, base_p + offset * pb : base_p + (offset + 1) * pb]
    return k, v, p


@pytest.mark.parametrize("rotate_k", [False, True])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_tokens_read_blocks(dtype, block_size, bits, rotate_k):
    """Tokens written in shuffled order to permuted blocks read back as exactly
    dequantize(quantize(x)); slots of -1 and unwritten slots keep their old bytes."""
    g = _gen(block_size + bits + 7 * rotate_k)
    fmt = PageFormat(HEAD, bits, 64, block_size)
    n_blocks_used = 4
    n = (n_blocks_used - 1) * block_size + 5  # the last block is partly filled
    # block 12 is never used, so a -1 slot wrongly written (cache[-1]) would show
    blocks = torch.randperm(NUM_BLOCKS - 1, generator=g)[:n_blocks_used]
    pos = torch.arange(n)
    slots = blocks[pos // block_size] * block_size + pos % block_size

    key = _data((n, KV_HEADS, HEAD), dtype, seed=block_size + bits)
    value = _data((n, KV_HEADS, HEAD), dtype, seed=block_size + bits + 1, offset=-1.0)
    n_skip = 3
    junk = _data((n_skip, KV_HEADS, HEAD), dtype, seed=99) * 100
    perm = torch.randperm(n + n_skip, generator=g)
    w_key = torch.cat((key, junk))[perm]
    w_value = torch.cat((value, junk))[perm]
    w_slots = torch.cat((slots, torch.full((n_skip,), -1)))[perm]

    cache = torch.randint(
        0, 256, (NUM_BLOCKS, KV_HEADS, fmt.head_region_bytes), generator=g, dtype=torch.uint8
    )
    before = cache.clone()
    ref.write_tokens(cache, w_key, w_value, w_slots, fmt, rotate_k)

    # exactly the written slots changed (checked on the slot bytes, not via read_blocks)
    touched = torch.zeros_like(cache, dtype=torch.bool)
    for i in range(n):
        for region in _layout_of(touched, fmt, int(blocks[i // block_size]), i % block_size):
            region.fill_(True)
    assert int(touched.sum()) == n * KV_HEADS * fmt.bytes_per_token_head
    assert torch.equal(cache[~touched], before[~touched])
    assert not torch.equal(cache[touched], before[touched])

    # the slot bytes are the documented rows and params of each token
    kq, ks, kz = ref.quantize(ref.rotate(key) if rotate_k else key, fmt, dtype)
    vq, vs, vz = ref.quantize(value, fmt, dtype)
    for i in (0, n // 2, n - 1):
        k_row, v_row, p = _layout_of(cache, fmt, int(blocks[i // block_size]), i % block_size)
        assert torch.equal(k_row, ref.pack_rows(kq[i], fmt.k_channel_of_slot(), bits))
        assert torch.equal(v_row, ref.pack_rows(vq[i], fmt.v_channel_of_slot(), bits))
        params = p.contiguous().view(dtype).view(KV_HEADS, 2, fmt.groups, 2)
        assert torch.equal(params[:, 0, :, 0], ks[i]) and torch.equal(params[:, 0, :, 1], kz[i])
        assert torch.equal(params[:, 1, :, 0], vs[i]) and torch.equal(params[:, 1, :, 1], vz[i])

    k, v = ref.read_blocks(cache, blocks, n, fmt, dtype)
    assert k.shape == v.shape == (n, KV_HEADS, HEAD)
    assert torch.equal(k, ref.dequantize(kq, ks, kz, fmt))
    assert torch.equal(v, ref.dequantize(vq, vs, vz, fmt))


def _dense_attention_f64(q, k, v, scale):
    """Causal GQA attention in float64; the last query sits at the last key."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    q_len, hq, _ = q.shape
    kv_len, hk, _ = k.shape
    rep = hq // hk
    for h in range(hq):
        kh, vh = k[:, h // rep], v[:, h // rep]
        for j in range(q_len):
            pos = kv_len - q_len + j
            s = (kh[: pos + 1] @ q[j, h]) * scale
            p = torch.softmax(s, dim=0)
            out[j, h] = p @ vh[: pos + 1]
    return out


SEQ_LENS = (1, 37, 130)
Q_LENS = (1, 1, 5)  # the last sequence is a chunk of a prefill mixed into the batch
ATT_KV_HEADS = 2


def _paged_batch(dtype, fmt, rotate_k, ratio, seed):
    """Writes a batch of sequences to permuted blocks; returns what paged_attention needs."""
    g = _gen(seed)
    bs = fmt.block_size
    nblocks = [math.ceil(n / bs) for n in SEQ_LENS]
    ids = torch.randperm(sum(nblocks) + 3, generator=g)
    table = torch.full((len(SEQ_LENS), max(nblocks)), -1, dtype=torch.long)
    cache = torch.zeros(len(ids), ATT_KV_HEADS, fmt.head_region_bytes, dtype=torch.uint8)
    kvs = []
    start = 0
    for i, n in enumerate(SEQ_LENS):
        table[i, : nblocks[i]] = ids[start : start + nblocks[i]]
        start += nblocks[i]
        k = torch.randn(n, ATT_KV_HEADS, HEAD, generator=g).to(dtype)
        v = torch.randn(n, ATT_KV_HEADS, HEAD, generator=g).to(dtype)
        pos = torch.arange(n)
        slots = table[i, pos // bs] * bs + pos % bs
        ref.write_tokens(cache, k, v, slots, fmt, rotate_k)
        kvs.append((k, v))
    q = torch.randn(sum(Q_LENS), ATT_KV_HEADS * ratio, HEAD, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(Q_LENS).cumsum(0).tolist()])
    return q, cache, table, torch.tensor(SEQ_LENS), qsl, kvs


@pytest.mark.parametrize("rotate_k", [False, True])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("bits", [4, 2])
def test_paged_attention_matches_dense(bits, ratio, rotate_k):
    """paged_attention == dense float64 attention over dequantize(quantize(K/V))."""
    dtype = torch.bfloat16
    fmt = PageFormat(HEAD, bits, 64, 16)
    scale = HEAD**-0.5
    q, cache, table, seq_lens, qsl, kvs = _paged_batch(dtype, fmt, rotate_k, ratio, seed=bits)
    out = ref.paged_attention(q, cache, table, seq_lens, qsl, scale, fmt, rotate_k)
    assert out.shape == q.shape and out.dtype == torch.float32
    for i, (k, v) in enumerate(kvs):
        qi = q[qsl[i] : qsl[i + 1]]
        if rotate_k:
            qi, k = ref.rotate(qi), ref.rotate(k)
        k_deq = ref.dequantize(*ref.quantize(k, fmt, dtype), fmt)
        v_deq = ref.dequantize(*ref.quantize(v, fmt, dtype), fmt)
        expected = _dense_attention_f64(qi, k_deq, v_deq, scale)
        torch.testing.assert_close(out[qsl[i] : qsl[i + 1]].double(), expected, atol=1e-4, rtol=0)


# measured: group 32 -> 0.078 / 0.080, group 128 -> 0.100 / 0.102 (GQA 1 / 8). Gaussian V at
# 4 bits, group 128 alone has ~0.10 relative error (see REL_ERR_MAX), hence the looser bound.
@pytest.mark.parametrize(("group_size", "bound"), [(32, 0.1), (128, 0.12)])
@pytest.mark.parametrize("ratio", [1, 8])
def test_paged_attention_rotated_approximates_exact(ratio, group_size, bound):
    """With K rotated and 4-bit pages, the output stays close to unquantized attention."""
    dtype = torch.bfloat16
    fmt = PageFormat(HEAD, 4, group_size, 16)
    scale = HEAD**-0.5
    q, cache, table, seq_lens, qsl, kvs = _paged_batch(dtype, fmt, True, ratio, seed=11)
    out = ref.paged_attention(q, cache, table, seq_lens, qsl, scale, fmt, True).double()
    exact = torch.cat(
        [_dense_attention_f64(q[qsl[i] : qsl[i + 1]], k, v, scale) for i, (k, v) in enumerate(kvs)]
    )
    rel = float((out - exact).norm() / exact.norm())
    print(f"\nrotated 4-bit g{group_size} paged attention, GQA {ratio}: relative error {rel:.4f}")
    assert rel < bound


@pytest.mark.parametrize("causal", [True, False])
def test_attention_lse_over_the_first_num_keys_masks_the_rest_in_the_scores_only(causal):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 8, 32, generator=gen)
    k, v = torch.randn(16, 2, 32, generator=gen), torch.randn(16, 2, 32, generator=gen)
    want = ref.attention_lse(q, k[:11], v[:11], 0.2, causal)
    got = ref.attention_lse(q, k, v, 0.2, causal, num_keys=11)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    v[11:] = float("nan")  # as FlashAttention-3 would see them: 0 x NaN in P @ V
    assert ref.attention_lse(q, k, v, 0.2, causal, num_keys=11)[0].isnan().all()
