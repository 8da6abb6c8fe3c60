"""Plain-PyTorch reference of everything the kernels do. Runs on the CPU in float32.

This is the oracle of every kernel test: the quantize kernel must reproduce
:func:`write_tokens` bit for bit on finite inputs, and the decode kernel must match
:func:`paged_attention` on the dequantized cache within rounding. (A NaN or inf in K or V
takes other bytes here than in the kernel, whose min / max skip NaN and whose codes clamp
to 0: both leave the group non-finite or garbage, and the tests of those inputs compare
what attention does with them, not the bytes.)
"""

from __future__ import annotations

import math

import torch

from vllm_bitdecode.page_format import (
    TILE_TOKENS,
    PageFormat,
    rotation_signs,
    tile_field,
    tile_tokens,
)


# ---- rotation ---------------------------------------------------------------------------
def rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal randomized Hadamard transform over the last dim, in float32.

    ``H = WHT(diag(signs)) / sqrt(d)``; butterflies run in the same order as the
    kernels (stride 1, 2, 4, ...), so results agree bit for bit.
    """
    d = x.shape[-1]
    y = x.to(torch.float32) * rotation_signs(d).to(x.device)
    shape = y.shape
    h = 1
    while h < d:
        y = y.reshape(*shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(shape) * torch.tensor(1.0 / math.sqrt(d), dtype=torch.float32)


def rotation_matrix(d: int) -> torch.Tensor:
    """``R`` with ``rotate(x) == x @ R`` up to rounding (float32, orthonormal)."""
    return rotate(torch.eye(d, dtype=torch.float32))


# ---- quantize ---------------------------------------------------------------------------
def quantize(
    x: torch.Tensor, fmt: PageFormat, param_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization per token and group of channels.

    x: [..., head_size] (already rotated where wanted).
    Returns codes [..., head_size] (int32, natural channel order) and scale, zero
    [..., groups] in ``param_dtype``. Scale and zero are rounded to ``param_dtype``
    *before* the codes are computed, so dequantizing with the stored values is the
    quantizer's own inverse.

    A group spanning both signs near the float32 maximum (|values| ~ 1e38, bf16) makes
    ``hi - lo`` overflow; there (and only there: ``hi - lo`` not finite) the scale is
    ``hi / levels - lo / levels`` and a value's code ``round(x / s - z / s)``, which stay
    finite, as the CUDA quantizer computes them. Everywhere else the arithmetic is the
    plain ``(hi - lo) / levels`` and ``(x - z) / s``, bit for bit. Likewise, only where the
    rounded scale would dequantize the top code past the dtype's maximum (inf), the scale
    is one step smaller.
    """
    xf = x.to(torch.float32).unflatten(-1, (fmt.groups, fmt.group_size))
    lo = xf.amin(dim=-1)
    hi = xf.amax(dim=-1)
    span = hi - lo
    wide = ~torch.isfinite(span)  # also true for inf / NaN inputs, which stay non-finite
    scale_f = torch.where(wide, hi / fmt.levels - lo / fmt.levels, span / fmt.levels)
    scale_p = scale_f.to(param_dtype)
    zero_p = lo.to(param_dtype)
    # The top code must dequantize to a finite param_dtype value: where the scale, rounded
    # to nearest, puts levels * scale + zero past the dtype's maximum (fp16, a group
    # spanning +-65504: 15 * 8736 - 65504 = 65536), the scale goes one step down.
    sd, zd = scale_p.to(torch.float64), zero_p.to(torch.float64)
    top = (fmt.levels * sd + zd).to(torch.float32).to(param_dtype)
    past = (sd > 0) & torch.isfinite(sd) & torch.isfinite(zd) & torch.isinf(top)
    if past.any():
        scale_p = torch.where(past, (scale_p.view(torch.int16) - 1).view(param_dtype), scale_p)
    s = scale_p.to(torch.float32).unsqueeze(-1)
    z = zero_p.to(torch.float32).unsqueeze(-1)
    s_div = torch.where(s > 0, s, 1.0)
    t = torch.where(wide.unsqueeze(-1), xf / s_div - z / s_div, (xf - z) / s_div)
    codes = torch.where(
        s > 0,
        torch.clamp(torch.round(t), 0, fmt.levels),
        torch.zeros_like(xf),
    )
    return codes.to(torch.int32).flatten(-2), scale_p, zero_p


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: PageFormat
) -> torch.Tensor:
    """codes [..., head_size], scale/zero [..., groups] -> float32 [..., head_size].

    ``code * scale + zero`` rounded once to float32, as the CUDA dequantizer's fma: the
    product is exact (a code has at most 4 bits, a bf16 / fp16 scale at most 11), so this
    is the float32 ``c * s + z`` bit for bit, except where ``c * s`` alone would overflow
    float32 although the value does not (groups spanning both signs near the maximum).
    Evaluated in float64: an exact product, then a sum rounded to float64 and to float32,
    which is the correctly rounded float32 sum (53 >= 2 * 24 + 2 bits).
    """
    c = codes.to(torch.float64).unflatten(-1, (fmt.groups, fmt.group_size))
    s = scale.to(torch.float64).unsqueeze(-1)
    z = zero.to(torch.float64).unsqueeze(-1)
    return (c * s + z).to(torch.float32).flatten(-2)


# ---- pack -------------------------------------------------------------------------------
def pack_rows(codes: torch.Tensor, channel_of_slot: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., head_size] -> packed rows [..., row_bytes] (uint8, little-endian words)."""
    vpw = 32 // bits
    slots = codes[..., channel_of_slot.to(codes.device)].to(torch.int64)
    slots = slots.unflatten(-1, (-1, vpw))
    shifts = torch.arange(vpw, device=codes.device, dtype=torch.int64) * bits
    words = (slots << shifts).sum(dim=-1)  # [..., row_words], < 2**32
    byte_shifts = torch.arange(4, device=codes.device, dtype=torch.int64) * 8
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack_rows(rows: torch.Tensor, channel_of_slot: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: [..., row_bytes] uint8 -> codes [..., head_size] int32."""
    vpw = 32 // bits
    b = rows.to(torch.int64).unflatten(-1, (-1, 4))
    words = (b << (torch.arange(4, device=rows.device, dtype=torch.int64) * 8)).sum(-1)
    shifts = torch.arange(vpw, device=rows.device, dtype=torch.int64) * bits
    slots = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    codes = torch.empty_like(slots)
    codes[..., channel_of_slot.to(rows.device)] = slots
    return codes.to(torch.int32)


# ---- pages ------------------------------------------------------------------------------
def _k_rows(cache: torch.Tensor, fmt: PageFormat) -> torch.Tensor:
    """``[blocks, heads, tiles, 16, row_bytes]`` view of the K rows (page_format.tile_field)."""
    return tile_field(cache, fmt.tile_bytes, fmt.k_rows_offset, fmt.row_bytes)


def _v_rows(cache: torch.Tensor, fmt: PageFormat) -> torch.Tensor:
    return tile_field(cache, fmt.tile_bytes, fmt.v_rows_offset, fmt.row_bytes)


def _params(cache: torch.Tensor, fmt: PageFormat) -> torch.Tensor:
    return tile_field(cache, fmt.tile_bytes, fmt.params_offset, fmt.param_bytes_per_token)


def _params_view(cache: torch.Tensor, fmt: PageFormat, dtype: torch.dtype) -> torch.Tensor:
    """[num_blocks, heads, block_size, 2 (K,V), groups, 2 (scale, zero)] of the params (a copy)."""
    n, h = cache.shape[:2]
    raw = tile_tokens(_params(cache, fmt)).contiguous()
    return raw.view(dtype).view(n, h, fmt.block_size, 2, fmt.groups, 2)


def write_tokens(
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_region_bytes] uint8, updated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens], block * block_size + offset; < 0 = skip
    fmt: PageFormat,
    rotate_k: bool,
) -> None:
    """Quantize, pack and store tokens: what the quantize-on-write kernel does."""
    dtype = key.dtype
    keep = slot_mapping >= 0
    key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if key.shape[0] == 0:
        return
    kq, ks, kz = quantize(rotate(key) if rotate_k else key, fmt, dtype)
    vq, vs, vz = quantize(value, fmt, dtype)
    blocks = slot_mapping // fmt.block_size
    offs = slot_mapping % fmt.block_size
    k_rows = pack_rows(kq, fmt.k_channel_of_slot(), fmt.bits)  # [tokens, heads, row_bytes]
    v_rows = pack_rows(vq, fmt.v_channel_of_slot(), fmt.bits)
    params = torch.stack(
        (torch.stack((ks, kz), -1), torch.stack((vs, vz), -1)), dim=-3
    )  # [tokens, heads, 2, groups, 2]
    param_bytes = params.contiguous().view(torch.uint8).flatten(-3)
    # views [blocks, heads, tiles, 16, bytes]; writes land in cache
    tile, row = offs // TILE_TOKENS, offs % TILE_TOKENS
    _k_rows(cache, fmt)[blocks, :, tile, row] = k_rows
    _v_rows(cache, fmt)[blocks, :, tile, row] = v_rows
    _params(cache, fmt)[blocks, :, tile, row] = param_bytes


def read_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int, fmt: PageFormat,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize the first ``num_tokens`` tokens stored in ``block_ids``.

    Returns K, V as float32 [num_tokens, num_kv_heads, head_size] (K still rotated
    if it was stored rotated).
    """
    pages = cache[block_ids.long()]  # [nb, heads, region]
    k_rows = tile_tokens(_k_rows(pages, fmt))  # [nb, heads, bs, row_bytes]
    v_rows = tile_tokens(_v_rows(pages, fmt))
    params = _params_view(pages, fmt, dtype)  # [nb, heads, bs, 2, groups, 2]
    kc = unpack_rows(k_rows, fmt.k_channel_of_slot(), fmt.bits)
    vc = unpack_rows(v_rows, fmt.v_channel_of_slot(), fmt.bits)
    k = dequantize(kc, params[..., 0, :, 0], params[..., 0, :, 1], fmt)
    v = dequantize(vc, params[..., 1, :, 0], params[..., 1, :, 1], fmt)
    # [nb, heads, bs, D] -> [nb * bs, heads, D]
    k = k.transpose(1, 2).flatten(0, 1)[:num_tokens]
    v = v.transpose(1, 2).flatten(0, 1)[:num_tokens]
    return k, v


def attention(
    q: torch.Tensor,  # [q_len, num_heads, D]
    k: torch.Tensor,  # [kv_len, num_kv_heads, D]
    v: torch.Tensor,  # [kv_len, num_kv_heads, D]
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """Float32 softmax attention with GQA; causal aligns the last query with the last key."""
    return attention_lse(q, k, v, scale, causal)[0]


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool = True, num_keys: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` (same arguments) and each query row's log-sum-exp of its scaled
    scores (natural log, [num_heads, q_len]), FlashAttention's ``softmax_lse``.

    ``num_keys``: only the first ``num_keys`` keys count (causal then aligns the last query
    with the last of them); the others are masked in the scores only, so a NaN in their
    values still reaches the output through P @ V, as it does when FlashAttention-3 reads
    a page whole past ``seqused_k`` (the CPU tests' stand-ins)."""
    q_len, hq, _ = q.shape
    kv_len, hk, _ = k.shape
    n = kv_len if num_keys is None else num_keys
    rep = hq // hk
    k = k.float().repeat_interleave(rep, dim=1)
    v = v.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal or n < kv_len:
        last = (torch.arange(q_len).unsqueeze(1) + (n - q_len) if causal
                else torch.full((q_len, 1), n - 1))  # each query's last key
        mask = torch.arange(kv_len).unsqueeze(0) > last
        s = s.masked_fill(mask.to(s.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v), torch.logsumexp(s, dim=-1)


def merge_attention_states(
    prefix_out: torch.Tensor,  # [tokens, heads, D]
    prefix_lse: torch.Tensor,  # [heads, tokens]
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint key sets from each one's output and LSE, as vLLM's
    merge_attn_states computes it; float32 (out [tokens, heads, D], lse [heads, tokens])."""
    lse = torch.logaddexp(prefix_lse.float(), suffix_lse.float())
    wp = torch.exp(prefix_lse.float() - lse).T.unsqueeze(-1)
    ws = torch.exp(suffix_lse.float() - lse).T.unsqueeze(-1)
    return wp * prefix_out.float() + ws * suffix_out.float(), lse


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, D], all query tokens of the batch
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_region_bytes]
    block_table: torch.Tensor,  # [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_seqs], context length including the new tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    scale: float,
    fmt: PageFormat,
    rotate_k: bool,
) -> torch.Tensor:
    """Causal attention of every query token over its sequence's quantized pages.

    Returns float32 [num_tokens, num_heads, D]. Q is rotated like K when ``rotate_k``.
    Scales and zeros are stored in the model dtype, which ``q`` must be (bf16 / fp16).
    """
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"q must be in the model dtype (bfloat16 or float16), got {q.dtype}")
    out = torch.empty(q.shape, dtype=torch.float32)
    qf = rotate(q) if rotate_k else q.float()
    for i in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        if end == start:
            continue
        n = int(seq_lens[i])
        nblocks = (n + fmt.block_size - 1) // fmt.block_size
        k, v = read_blocks(cache, block_table[i, :nblocks], n, fmt, q.dtype)
        out[start:end] = attention(qf[start:end], k, v, scale)
    return out
