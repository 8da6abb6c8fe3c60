"""Plain-PyTorch reference of the per-channel K page (issue #7). CPU, float32.

The design is ``docs/per-channel-k-design.md``; this module is its executable form and
the oracle that the per-channel kernels will be tested against, as
:mod:`vllm_bitdecode.reference` is for the per-token page.

* A page stores K per channel in *K groups* of ``KC_GROUP_TOKENS`` (16) tokens: for each
  KV head, each group and each of the 128 channels, one (scale, zero) pair over the
  group's 16 tokens (at block 16 a group is the page). They are stored in fp16 for both
  model dtypes, the zero as ``zc = zero + 2^(bits-1) * scale``, so that the decode
  kernel dequantizes K straight into fp16 MMA fragments, ``k = (code - 2^(bits-1)) *
  scale + zc``, with one HFMA2 per pair and no per-tile conversion (design, section 12).
  The price: channel mode needs |K| <= 65504. With ``k_params="fp8"`` the pair is
  stored in fp8 e4m3 instead (half the parameter bytes), chosen zc first: the range's
  centre rounded to e4m3, then the smallest e4m3 scale that reaches both ends from it,
  so every key stays within half a stored step (keys within +-448). The codes use
  the same packed row order as the per-token page (``PageFormat.k_channel_of_slot``). V
  stays per token and per group of channels, exactly as in the per-token page.
* A K group is quantized once, by the write that fills its last slot. A page's tokens'
  K and V also live in a *residual*: ``block_size`` rows of K and of V in the model dtype per
  request, in a buffer indexed by a residual slot that the worker assigns to each live
  request (``row_slot[row]`` maps a batch row to it). The residual holds the K and V rows
  of the request's last written page, whether that page is partial or was just filled.
* Attention semantics (the design's "own page in full precision" rule): a query at
  position ``p`` sees every key and value in pages before ``p // block_size`` through the
  quantized page (K per channel, V per token), and the keys and values of its own page
  (positions ``(p // block_size) * block_size .. p``) exactly, as KIVI keeps its newest
  tokens in full precision. The rule depends only on positions, so chunking, preemption and
  recomputation, prefix-cache hits and batch order cannot change what a query sees.

Per-channel quantization *is* the per-token quantizer applied to the transposed K group
with one group of 16 tokens, so :func:`quantize_channels` calls
``reference.quantize`` and inherits its exact rounding rules (scale and zero rounded to
the parameter dtype first, IEEE division, round half to even, clamp).

Layout of one head region of a per-channel page (numbers for head size 128): as in the
per-token page, ``block_size / 16`` tiles of 16 tokens, tile ``i`` holding tokens
``16 i ..`` and so exactly one K group::

    tile =
        k_rows    [16][row_bytes]          packed K codes (row order as per-token)
        v_rows    [16][row_bytes]          packed V codes
        v_params  [16][groups][2]          V (scale, zero) per token, model dtype
        k_params  [2 * head_size]          the tile's K group: scale and zc of every
                                           channel, fp16 (or e4m3), in k_param_index order
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_bitdecode import reference
from vllm_bitdecode.page_format import (
    TILE_TOKENS,
    PageFormat,
    tile_field,
    tile_tokens,
)

KC_GROUP_TOKENS = TILE_TOKENS  # tokens of one K group: K is quantized per channel over these
K_PARAM_DTYPE = torch.float16  # channel-mode K (scale, zc) in the page, any model dtype
K_PARAM_FP8 = torch.float8_e4m3fn  # ... or in 8 bits (k_params="fp8")
K_PARAM_BITS = (16, 8)
FP8_MAX = 448.0  # largest e4m3 value; zc saturates there
FP8_MIN_SCALE = 2.0**-9  # smallest positive e4m3 value


# ---- layout -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KCPageLayout:
    """Byte layout of one per-channel-K page; ``fmt.group_size`` applies to V only."""

    fmt: PageFormat
    k_param_bits: int = 16  # 16: fp16 K (scale, zc); 8: fp8 e4m3

    def __post_init__(self) -> None:
        if self.k_param_bits not in K_PARAM_BITS:
            raise ValueError(f"k_param_bits={self.k_param_bits} unsupported; choose one of "
                             f"{K_PARAM_BITS}")

    @property
    def k_param_dtype(self) -> torch.dtype:
        return K_PARAM_DTYPE if self.k_param_bits == 16 else K_PARAM_FP8

    @property
    def block_size(self) -> int:
        return self.fmt.block_size

    @property
    def head_size(self) -> int:
        return self.fmt.head_size

    @property
    def row_bytes(self) -> int:
        return self.fmt.row_bytes

    # offsets inside a tile. K and V rows sit where they sit in the per-token tile; V's
    # per-token parameters start where that tile's (K, V) parameters start
    @property
    def k_rows_offset(self) -> int:
        return self.fmt.k_rows_offset

    @property
    def v_rows_offset(self) -> int:
        return self.fmt.v_rows_offset

    @property
    def v_params_offset(self) -> int:
        return self.fmt.params_offset

    @property
    def v_param_bytes_per_token(self) -> int:
        """V (scale, zero) of every group of one token: half the per-token page's."""
        return self.fmt.param_bytes_per_token // 2

    @property
    def k_params_offset(self) -> int:
        return self.v_params_offset + TILE_TOKENS * self.v_param_bytes_per_token

    @property
    def k_groups(self) -> int:
        """K groups of 16 tokens per page: one per tile."""
        return self.block_size // KC_GROUP_TOKENS

    @property
    def k_group_param_bytes(self) -> int:
        """K (scale, zc) of every channel of one K group and head."""
        return 2 * self.head_size * self.k_param_bits // 8

    @property
    def k_param_bytes(self) -> int:
        """K (scale, zero) of every channel of every K group of one page and head."""
        return self.k_groups * self.k_group_param_bytes

    @property
    def tile_bytes(self) -> int:
        return self.k_params_offset + self.k_group_param_bytes

    @property
    def head_region_bytes(self) -> int:
        return self.k_groups * self.tile_bytes

    def page_bytes(self, num_kv_heads: int) -> int:
        """Bytes of one vLLM block of one layer (what the KV-cache spec reports)."""
        return num_kv_heads * self.head_region_bytes

    @property
    def bytes_per_token_head(self) -> float:
        return self.head_region_bytes / self.block_size

    def compression_vs(self, dtype_bytes: int = 2) -> float:
        """Tokens per byte relative to an unquantized cache of ``dtype_bytes``."""
        return 2 * self.head_size * dtype_bytes / self.bytes_per_token_head

    def residual_bytes_per_slot(self, num_kv_heads: int, dtype_bytes: int = 2) -> int:
        """One request's residual for one layer: ``block_size`` K and V rows per KV head."""
        return 2 * num_kv_heads * self.block_size * self.head_size * dtype_bytes


def new_cache(num_blocks: int, num_kv_heads: int, layout: KCPageLayout,
              fill: int = 0) -> torch.Tensor:
    """``[num_blocks, num_kv_heads, head_region_bytes]`` uint8, every byte ``fill``."""
    return torch.full((num_blocks, num_kv_heads, layout.head_region_bytes), fill,
                      dtype=torch.uint8)


def new_residual(num_slots: int, num_kv_heads: int, layout: KCPageLayout,
                 dtype: torch.dtype) -> torch.Tensor:
    """``[num_slots, 2, num_kv_heads, block_size, head_size]`` in the model dtype, K rows
    then V rows (NaN-filled, so that reading a row nobody wrote shows up)."""
    return torch.full((num_slots, 2, num_kv_heads, layout.block_size, layout.head_size),
                      float("nan"), dtype=dtype)


# ---- quantize / dequantize per channel ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _OneGroup:
    """What ``reference.quantize`` reads from a PageFormat: one group of ``group_size``."""

    group_size: int
    levels: int
    groups: int = 1


def quantize_channels(
    k: torch.Tensor, bits: int, param_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of each channel over all the tokens given.

    k: ``[..., tokens, head_size]``. Returns codes ``[..., tokens, head_size]`` (int32)
    and scale, zero ``[..., head_size]`` in ``param_dtype``, rounded to it before the
    codes are computed (so dequantizing with the stored values is the quantizer's own
    inverse).
    """
    groups = _OneGroup(group_size=k.shape[-2], levels=(1 << bits) - 1)
    codes_t, scale, zero = reference.quantize(k.transpose(-1, -2), groups, param_dtype)
    return codes_t.transpose(-1, -2).contiguous(), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_channels(codes: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor) -> torch.Tensor:
    """codes ``[..., tokens, head_size]``, scale/zero ``[..., head_size]`` -> float32."""
    return codes.to(torch.float32) * scale.to(torch.float32).unsqueeze(-2) + zero.to(
        torch.float32).unsqueeze(-2)


def k_param_index(head_size: int) -> torch.Tensor:
    """Position of channel c's scale among a K group's ``2 * head_size`` fp16 params; its
    zc sits 4 further. Each 16-channel block holds, for t = 0..3, the scales of channels
    2t, 2t+1, 2t+8, 2t+9 and then their zc: what lane quad position t of the decode
    kernel needs for one MMA k-step, in one 16-byte load."""
    c = torch.arange(head_size)
    r = c % 16
    return (c // 16) * 32 + (r % 8) // 2 * 8 + (r // 8) * 2 + r % 2


def pack_k_params(scale: torch.Tensor, zc: torch.Tensor) -> torch.Tensor:
    """scale, zc ``[..., head_size]`` fp16 -> the group's params ``[..., 2 * head_size]``."""
    idx = k_param_index(scale.shape[-1])
    out = torch.empty(scale.shape[:-1] + (2 * scale.shape[-1],), dtype=scale.dtype)
    out[..., idx] = scale
    out[..., idx + 4] = zc
    return out


def unpack_k_params(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_k_params`: ``[..., 2 * head_size]`` -> scale, zc."""
    idx = k_param_index(params.shape[-1] // 2)
    return params[..., idx], params[..., idx + 4]


def centred_zero(scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored zero point ``zc = zero + 2^(bits-1) * scale`` in ``scale``'s dtype, as the
    write kernel computes it: one fma in float32 (the float64 sum of two 16-bit floats
    times a power of two is exact, so rounding it to float32 is the fma's rounding),
    then rounded to the 16-bit dtype.

    At the edge of fp16's range that rounding (up to 16 near 65504) can carry the read-back
    of code 0 or of the top code, ``(code - 2^(bits-1)) * scale + zc`` in one rounding,
    past fp16's maximum: a key of -65504 beside -57376 would read back as -inf. There zc
    moves one fp16 step the other way, which moves every read-back of the group by that
    step and keeps both ends finite."""
    centre = float(1 << (bits - 1))
    zc = centre * scale.to(torch.float64) + zero.to(torch.float64)
    zc = zc.to(torch.float32).to(scale.dtype)
    if scale.dtype != torch.float16:
        return zc
    top = float((1 << bits) - 1) - centre
    s, z = scale.to(torch.float64), zc.to(torch.float64)
    low_inf = torch.isinf((z - centre * s).to(torch.float16))  # exact in float64
    high_inf = torch.isinf((z + top * s).to(torch.float16))
    return torch.where(low_inf, _fp16_step(zc, up=True),
                       torch.where(high_inf, _fp16_step(zc, up=False), zc))


def _fp16_step(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The next fp16 value above (``up``) or below each finite ``x``: its bit pattern one
    further from or closer to zero (kc_write_kernel.cuh, ``fp16_step``)."""
    bits = x.view(torch.int16).to(torch.int32) & 0xFFFF
    neg = (bits & 0x8000) != 0
    zero = (bits & 0x7FFF) == 0
    grow = neg != up  # up on a positive or down on a negative: the magnitude grows
    stepped = torch.where(grow, bits + 1, bits - 1)
    stepped = torch.where(zero, torch.full_like(bits, 0x0001 if up else 0x8001), stepped)
    return (torch.where(stepped >= 0x8000, stepped - 0x10000, stepped)
            .to(torch.int16).view(torch.float16))


def dequantize_stored_k(codes: torch.Tensor, scale: torch.Tensor, zc: torch.Tensor,
                        bits: int) -> torch.Tensor:
    """Stored K groups -> float32: codes ``[..., groups, 16, head_size]``, scale / zc
    ``[..., groups, head_size]``. ``(code - 2^(bits-1)) * scale + zc`` rounded once, as
    the kernels' fma (the product is exact), evaluated in float64 like
    ``reference.dequantize``."""
    c = codes.to(torch.float64) - float(1 << (bits - 1))
    out = c * scale.to(torch.float64).unsqueeze(-2) + zc.to(torch.float64).unsqueeze(-2)
    return out.to(torch.float32)


def round_up_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The smallest e4m3 value >= x (float32, 0 < x <= 448), as float32: positive e4m3
    bit patterns order like their values, so one up is the next value."""
    near = x.to(K_PARAM_FP8)
    up = torch.where(near.float() < x, near.view(torch.uint8) + 1, near.view(torch.uint8))
    return up.view(K_PARAM_FP8).float()


def quantize_channels_fp8(
    k: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel quantization over all the tokens given with e4m3 parameters.

    k: ``[..., tokens, head_size]``. zc first: the centre of the channel's range,
    ``lo + 2^(bits-1) * ((hi - lo) / levels)`` in float32, clamped to +-448 and rounded to
    the nearest e4m3; then the scale: the smallest e4m3 at least
    ``max((zc - lo) / 2^(bits-1), (hi - zc) / (levels - 2^(bits-1)))`` (and at least
    2^-9), so that both ends of the range are within reach of the codes. Each code is the
    nearest under the stored pair, ``round((x - zc) / scale + 2^(bits-1))`` clamped to
    the levels, round half to even. Every step in float32, in this order (the write
    kernel does the same, op for op). Returns codes (int32, like ``k``) and scale, zc
    ``[..., head_size]`` as float32 holding e4m3 values.
    """
    levels, centre = (1 << bits) - 1, float(1 << (bits - 1))
    x = k.to(torch.float32)
    lo, hi = x.amin(dim=-2), x.amax(dim=-2)
    mid = lo + centre * ((hi - lo) / levels)
    zc = mid.clamp(-FP8_MAX, FP8_MAX).to(K_PARAM_FP8).float()
    need = torch.maximum((zc - lo) / centre, (hi - zc) / (levels - centre))
    scale = round_up_e4m3(need.clamp(FP8_MIN_SCALE, FP8_MAX))
    t = (x - zc.unsqueeze(-2)) / scale.unsqueeze(-2) + centre
    codes = torch.clamp(torch.round(t), 0, levels).to(torch.int32)
    return codes, scale, zc


def fake_quant_page_k(k: torch.Tensor, bits: int, group_tokens: int = KC_GROUP_TOKENS,
                      k_param_bits: int = 16) -> torch.Tensor:
    """Quantize the K of whole pages ``[..., tokens, head_size]`` in K groups of
    ``group_tokens`` tokens (the page's 16; the CPU simulation tries others) as the page
    stores them (fp16 or, with ``k_param_bits`` 8, e4m3 scale and zc), then dequantize
    (float32 out)."""
    groups = k.unflatten(-2, (k.shape[-2] // group_tokens, group_tokens))
    if k_param_bits == 8:
        codes, scale, zc = quantize_channels_fp8(groups, bits)
    else:
        codes, scale, zero = quantize_channels(groups, bits, K_PARAM_DTYPE)
        zc = centred_zero(scale, zero, bits)
    return dequantize_stored_k(codes, scale, zc, bits).flatten(-3, -2)


def fake_quant_v(v: torch.Tensor, fmt: PageFormat) -> torch.Tensor:
    """V per token and group, as stored in both page formats (float32 out)."""
    codes, scale, zero = reference.quantize(v, fmt, v.dtype)
    return reference.dequantize(codes, scale, zero, fmt)


# ---- region views ------------------------------------------------------------------------
def _k_rows(cache, layout):
    """``[blocks, heads, tiles, 16, row_bytes]`` view (page_format.tile_field)."""
    return tile_field(cache, layout.tile_bytes, layout.k_rows_offset, layout.row_bytes)


def _v_rows(cache, layout):
    return tile_field(cache, layout.tile_bytes, layout.v_rows_offset, layout.row_bytes)


def _v_params(cache, layout):
    return tile_field(cache, layout.tile_bytes, layout.v_params_offset,
                      layout.v_param_bytes_per_token)


def _k_params(cache, layout):
    """``[blocks, heads, k_groups, k_group_param_bytes]`` view: one K group per tile."""
    tiles = cache.unflatten(-1, (layout.k_groups, layout.tile_bytes))
    return tiles[..., layout.k_params_offset : layout.k_params_offset + layout.k_group_param_bytes]


def _as_params(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return raw.contiguous().view(dtype).view(shape)


def read_k_params(pages: torch.Tensor,
                  layout: KCPageLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored K scale and zc of pages ``[blocks, heads, head_region_bytes]``:
    ``[blocks, heads, k_groups, head_size]`` each, float32 (exact: fp16 and e4m3 values)."""
    nb, h = pages.shape[:2]
    raw = _k_params(pages, layout).contiguous()
    if layout.k_param_bits == 8:  # unpack the bytes, then reinterpret (float8 has no gather)
        s, zc = unpack_k_params(raw.view(nb, h, layout.k_groups, 2 * layout.head_size))
        return s.contiguous().view(K_PARAM_FP8).float(), zc.contiguous().view(K_PARAM_FP8).float()
    kp = _as_params(raw, K_PARAM_DTYPE, (nb, h, layout.k_groups, 2 * layout.head_size))
    s, zc = unpack_k_params(kp)
    return s.float(), zc.float()


# ---- batch bookkeeping -------------------------------------------------------------------
def token_requests(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                   num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its batch row and its position in the sequence (-1, -1 for tokens past
    the last request, i.e. CUDA-graph padding). What the kernels derive on the device
    from ``query_start_loc`` and ``seq_lens``, with no host synchronisation."""
    qsl = query_start_loc.to(torch.int64)
    t = torch.arange(num_tokens, dtype=torch.int64)
    row = torch.searchsorted(qsl, t, right=True) - 1
    inside = t < qsl[-1]
    row = torch.where(inside, row, torch.full_like(row, -1))
    safe = row.clamp(min=0)
    pos = seq_lens.to(torch.int64)[safe] - (qsl[safe + 1] - t)
    pos = torch.where(inside, pos, torch.full_like(pos, -1))
    return row, pos


# ---- the write ---------------------------------------------------------------------------
def write_tokens_kc(
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_region_bytes] uint8, in place
    residual: torch.Tensor,  # [num_slots, 2, num_kv_heads, block_size, head_size], in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size], model dtype
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] block * block_size + offset; < 0: skip
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs], context length including this step's tokens
    row_slot: torch.Tensor,  # [num_reqs] residual slot of each batch row
    layout: KCPageLayout,
) -> None:
    """Store one step's K/V the way the per-channel kernels will, in their order:

    1. V of every token, per token (independent of everything else).
    2. Phase A: every K group (16 tokens of a page) whose last slot is written in this
       step is quantized per channel. Its K rows come from this step's ``key`` for
       positions computed in this step, and from the request's residual for earlier
       positions (they lie in the page of the step's first position, the request's last
       written page). Nothing this step writes is read here, so one launch can do it in
       any CTA order.
    3. Phase B: the K and V rows of each request's last written page (positions
       ``(seq_len - 1) // bs * bs ..``, this step's tokens only) go to its residual.
       Phase B runs after phase A because it may overwrite residual rows that phase A
       reads (a chunk that fills one page and ends in the next).
    """
    dtype = key.dtype
    bs = layout.block_size
    fmt = layout.fmt
    num_tokens = key.shape[0]
    row, pos = token_requests(query_start_loc, seq_lens, num_tokens)
    slot = slot_mapping.to(torch.int64)
    valid = slot >= 0
    if bool((valid & (row < 0)).any()):
        raise ValueError("a token with a slot lies outside every request")
    if bool((valid & (slot % bs != pos % bs)).any()):
        raise ValueError("slot_mapping offsets disagree with the token positions")
    if not bool(valid.any()):
        return
    blocks, offs = slot // bs, slot % bs
    qsl = query_start_loc.to(torch.int64)
    lens = seq_lens.to(torch.int64)
    starts = lens - (qsl[1:] - qsl[:-1])  # first position computed in this step, per row

    # 1. V per token
    t_v = valid.nonzero().squeeze(-1)
    vq, vs, vz = reference.quantize(value[t_v], fmt, dtype)
    v_params = torch.stack((vs, vz), dim=-1)  # [tokens, heads, groups, 2]
    tile, row_in_tile = offs[t_v] // TILE_TOKENS, offs[t_v] % TILE_TOKENS
    _v_rows(cache, layout)[blocks[t_v], :, tile, row_in_tile] = reference.pack_rows(
        vq, fmt.v_channel_of_slot(), fmt.bits)
    _v_params(cache, layout)[blocks[t_v], :, tile, row_in_tile] = v_params.contiguous().view(
        torch.uint8).flatten(-2)

    # 2. phase A: quantize the K groups filled in this step. Within one kernel launch the
    # order of CTAs is undefined; phases A and B walk the tokens backwards so that a rule
    # that only works in token order fails the tests.
    gt = KC_GROUP_TOKENS
    k_params = _k_params(cache, layout)
    for t in reversed((valid & (offs % gt == gt - 1)).nonzero().squeeze(-1).tolist()):
        r = int(row[t])
        first = int(pos[t]) - (gt - 1)  # position of the group's first token
        rows = []
        for p in range(first, first + gt):
            if p >= int(starts[r]):
                rows.append(key[int(qsl[r]) + p - int(starts[r])])
            else:
                rows.append(residual[int(row_slot[r]), 0, :, p % bs])
        group_k = torch.stack(rows, dim=1)  # [heads, 16, D]
        if layout.k_param_bits == 8:
            codes, scale, zc = quantize_channels_fp8(group_k, fmt.bits)
            packed = pack_k_params(scale.to(K_PARAM_FP8).view(torch.uint8),
                                   zc.to(K_PARAM_FP8).view(torch.uint8))
        else:
            codes, scale, zero = quantize_channels(group_k, fmt.bits, K_PARAM_DTYPE)
            zc = centred_zero(scale, zero, fmt.bits)
            packed = pack_k_params(scale, zc).view(torch.uint8)
        # the group is one whole tile
        _k_rows(cache, layout)[int(blocks[t]), :, first % bs // gt] = reference.pack_rows(
            codes, fmt.k_channel_of_slot(), fmt.bits)
        k_params[int(blocks[t]), :, first % bs // gt] = packed

    # 3. phase B: the last written page of each request goes to its residual
    last_page_start = (lens - 1).clamp(min=0) // bs * bs
    r_safe = row.clamp(min=0)
    to_residual = valid & (pos >= last_page_start[r_safe])
    for t in reversed(to_residual.nonzero().squeeze(-1).tolist()):
        r, p = int(row[t]), int(pos[t]) % bs
        residual[int(row_slot[r]), 0, :, p] = key[t]
        residual[int(row_slot[r]), 1, :, p] = value[t]


# ---- reads -------------------------------------------------------------------------------
def read_pages_kc(
    cache: torch.Tensor, block_ids: torch.Tensor, layout: KCPageLayout, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize whole pages: K per channel, V per token.

    Returns float32 ``[len(block_ids) * block_size, num_kv_heads, head_size]`` each. K is
    meaningful only for full K groups, V only for written tokens.
    """
    pages = cache[block_ids.long()]
    nb, h = pages.shape[:2]
    fmt = layout.fmt
    bs = layout.block_size
    kc = reference.unpack_rows(tile_tokens(_k_rows(pages, layout)), fmt.k_channel_of_slot(),
                               fmt.bits)
    k_groups = kc.unflatten(-2, (layout.k_groups, KC_GROUP_TOKENS))
    k = dequantize_stored_k(k_groups, *read_k_params(pages, layout), fmt.bits).flatten(2, 3)
    vc = reference.unpack_rows(tile_tokens(_v_rows(pages, layout)), fmt.v_channel_of_slot(),
                               fmt.bits)
    vp = _as_params(tile_tokens(_v_params(pages, layout)), dtype, (nb, h, bs, fmt.groups, 2))
    v = reference.dequantize(vc, vp[..., 0], vp[..., 1], fmt)
    return k.transpose(1, 2).flatten(0, 1), v.transpose(1, 2).flatten(0, 1)


def paged_decode_kc(
    q: torch.Tensor,  # [num_seqs, num_heads, D] model dtype, one query per sequence
    cache: torch.Tensor,
    residual: torch.Tensor,
    block_table: torch.Tensor,  # [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_seqs] context length including the query token
    row_slot: torch.Tensor,  # [num_seqs]
    scale: float,
    layout: KCPageLayout,
) -> torch.Tensor:
    """What the decode kernel computes, in one softmax over all keys of a sequence.

    The query sits at position ``n - 1``; its own page (from ``(n - 1) // bs * bs``) is
    read from the residual (K and V exactly as written), every earlier page in its packed
    form. Rows with ``seq_len == 0`` (CUDA-graph padding) give 0.
    Returns float32 ``[num_seqs, num_heads, D]``.
    """
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"q must be in the model dtype (bfloat16 or float16), got {q.dtype}")
    bs = layout.block_size
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i in range(q.shape[0]):
        n = int(seq_lens[i])
        if n == 0:
            continue
        own = (n - 1) // bs * bs  # first position of the own page
        k_pages, v_pages = read_pages_kc(cache, block_table[i, : own // bs], layout, q.dtype)
        k_own, v_own = residual[int(row_slot[i]), :, :, : n - own].transpose(1, 2).float()
        k = torch.cat((k_pages, k_own), dim=0)
        v = torch.cat((v_pages, v_own), dim=0)
        out[i] = reference.attention(q[i : i + 1], k, v, scale)[0]
    return out


def forward_step_kc(
    q: torch.Tensor,  # [num_tokens, num_heads, D] model dtype
    key: torch.Tensor,  # [num_tokens, num_kv_heads, D]
    value: torch.Tensor,
    cache: torch.Tensor,
    residual: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    row_slot: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    layout: KCPageLayout,
) -> torch.Tensor:
    """One attention layer of one step (any mix of prefill chunks and decodes).

    Mirrors the prefill path of the design: the full-precision K and V of every page
    touched by this step are gathered (earlier positions from the residual, new ones from
    ``key`` / ``value``) *before* phase B can overwrite the residual, then K/V are written,
    then each query at position ``p`` attends to the quantized pages before its own page
    and to its own page in full precision. Returns float32 ``[num_tokens, num_heads, D]``.
    """
    bs = layout.block_size
    qsl = query_start_loc.to(torch.int64)
    lens = seq_lens.to(torch.int64)
    own_k, own_v = [], []  # per row: K, V of positions [first touched page start, seq_len)
    for r in range(lens.shape[0]):
        n, qlen = int(lens[r]), int(qsl[r + 1] - qsl[r])
        start = n - qlen
        page0 = start // bs * bs
        old_k, old_v = residual[int(row_slot[r]), :, :, : start - page0].transpose(1, 2)
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        own_k.append(torch.cat((old_k.float(), key[rows].float()), dim=0))
        own_v.append(torch.cat((old_v.float(), value[rows].float()), dim=0))
    write_tokens_kc(cache, residual, key, value, slot_mapping, query_start_loc, seq_lens,
                    row_slot, layout)
    out = torch.zeros(q.shape, dtype=torch.float32)
    for r in range(lens.shape[0]):
        n, qlen = int(lens[r]), int(qsl[r + 1] - qsl[r])
        if qlen == 0:
            continue
        start = n - qlen
        page0 = start // bs * bs
        nblocks = (n + bs - 1) // bs
        k_pages, v_pages = read_pages_kc(cache, block_table[r, :nblocks], layout, q.dtype)
        for j in range(qlen):
            p = start + j
            closed = p // bs * bs
            own = slice(closed - page0, p + 1 - page0)
            k = torch.cat((k_pages[:closed], own_k[r][own]))
            v = torch.cat((v_pages[:closed], own_v[r][own]))
            t = int(qsl[r]) + j
            out[t] = reference.attention(q[t : t + 1], k, v, scale)[0]
    return out


# ---- the specification -------------------------------------------------------------------
def canonical_attention_kc(
    q: torch.Tensor,  # [num_queries, num_heads, D] model dtype
    positions: torch.Tensor,  # [num_queries] position of each query
    k: torch.Tensor,  # [seq_len, num_kv_heads, D] model dtype: the sequence's true K
    v: torch.Tensor,
    scale: float,
    layout: KCPageLayout,
) -> torch.Tensor:
    """What a query at position ``p`` must see, computed from the true K/V alone, with no
    cache, residual or schedule: K and V of the pages before ``p // bs`` quantized (K per
    channel over each 16-token K group, V per token), K and V of positions
    ``p // bs * bs .. p`` exact."""
    bs = layout.block_size
    n_full = k.shape[0] // bs
    k_pages = k[: n_full * bs].unflatten(0, (n_full, bs)).transpose(1, 2)  # [pages, h, bs, d]
    k_quant = fake_quant_page_k(k_pages, layout.fmt.bits, k_param_bits=layout.k_param_bits)
    k_quant = k_quant.transpose(1, 2).flatten(0, 1)
    v_quant = fake_quant_v(v, layout.fmt)
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(q.shape[0]):
        p = int(positions[i])
        closed = p // bs * bs
        keys = torch.cat((k_quant[:closed], k[closed : p + 1].float()))
        values = torch.cat((v_quant[:closed], v[closed : p + 1].float()))
        out[i] = reference.attention(q[i : i + 1], keys, values, scale)[0]
    return out
