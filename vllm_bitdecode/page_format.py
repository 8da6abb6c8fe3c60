"""The one description of a BITDECODE page.

Python (the reference, the backend's KV-cache spec) and the CUDA kernels
(``csrc/include/bitdecode/page_format.cuh``) take every number from here; the
GPU tests check that both agree. ``docs/page-format.md`` draws the same thing.

A vLLM block of one layer holds ``block_size`` tokens for all KV heads::

    page  = [num_kv_heads] x head_region
    head_region = [block_size / 16] x tile      tokens 16 i .. 16 i + 15 in tile i
    tile =
        k_rows   [16][row_bytes]        packed K codes, one row per token
        v_rows   [16][row_bytes]        packed V codes, one row per token
        params   [16][2 (K,V)][groups][2 (scale, zero)]  in the model dtype

A tile is what the decode kernel stages per step: one contiguous bulk copy at every
block size (a page of 64 tokens laid out as K rows | V rows | params needed three per
tile, and decoded 11% slower on an H200). At block size 16 the head region is one tile.

Each token's row is written whole when the token is stored, so a page is never
half-written in another precision. Inside a row, channels are permuted so that a
lane of an ``mma.m16n8k16`` warp finds *its* fragment values in one contiguous
vector, already in the order the lop3 int->half trick unpacks them:

* K (the B operand of S = Q K^T, k = channel, n = token): lane ``4*n + t`` needs
  channels ``16s + 2t + {0, 1, 8, 9}`` of every k-step ``s``. Its words are stored
  together (``16`` bytes at 4 bits), so one 16-byte load per token fills the
  fragments of all eight k-steps.
* V (the B operand of O = P V, k = token, n = channel): lane ``4*c + t`` needs
  channel ``c + 8j`` of every n-tile ``j`` for tokens ``2t, 2t+1, 2t+8, 2t+9``.
  Its words per token are stored together (``8`` bytes at 4 bits); two tokens'
  words are merged with one ``prmt`` into pairs (tok 2t, tok 2t+1) per channel.

Codes are unsigned; value = code * scale + zero, scale and zero per token and per
group of ``group_size`` channels, stored in the model dtype (bf16 or fp16) so their
range is the data's range.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

SUPPORTED_BITS = (4, 2)
SUPPORTED_HEAD_SIZES = (128,)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
# a prefill window starts on a page whatever the block size: on a multiple of the largest
LARGEST_BLOCK_SIZE = max(SUPPORTED_BLOCK_SIZES)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
PARAM_BYTES = 2  # one scale or zero point, in the model dtype (bf16 / fp16)
WORD_BITS = 32
TILE_TOKENS = 16  # tokens per tile of a head region (one k-step of P V in the kernel)


def tile_field(cache: torch.Tensor, tile_bytes: int, offset: int,
               bytes_per_token: int) -> torch.Tensor:
    """``[num_blocks, heads, tiles, 16, bytes_per_token]`` view of a per-token field.

    ``cache`` is ``[num_blocks, heads, head_region_bytes]`` uint8 and the field starts
    ``offset`` bytes into every tile of ``tile_bytes``. Writes through the view land in
    ``cache``; index token ``t`` of a page as ``[..., t // 16, t % 16]``.
    """
    tiles = cache.unflatten(-1, (cache.shape[-1] // tile_bytes, tile_bytes))
    return tiles[..., offset : offset + TILE_TOKENS * bytes_per_token].unflatten(
        -1, (TILE_TOKENS, bytes_per_token))


def tile_tokens(field: torch.Tensor) -> torch.Tensor:
    """``[..., tiles, 16, b]`` -> ``[..., tiles * 16, b]``: a field in token order (a copy)."""
    return field.flatten(-3, -2)


@dataclasses.dataclass(frozen=True)
class PageFormat:
    """Byte layout of one page for a given head size, bit width and group size."""

    head_size: int
    bits: int
    group_size: int
    block_size: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} unsupported; choose one of {SUPPORTED_BITS}")
        if self.head_size not in SUPPORTED_HEAD_SIZES:
            raise ValueError(
                f"head_size={self.head_size} unsupported; BITDECODE supports {SUPPORTED_HEAD_SIZES}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES or self.group_size > self.head_size:
            raise ValueError(
                f"group_size={self.group_size} unsupported; choose one of "
                f"{tuple(g for g in SUPPORTED_GROUP_SIZES if g <= self.head_size)}"
            )
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size={self.block_size} unsupported; choose one of {SUPPORTED_BLOCK_SIZES}"
            )

    # ---- sizes -------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def values_per_word(self) -> int:
        return WORD_BITS // self.bits

    @property
    def row_words(self) -> int:
        """32-bit words of one token's packed K (or V) row."""
        return self.head_size * self.bits // WORD_BITS

    @property
    def row_bytes(self) -> int:
        return self.row_words * 4

    @property
    def groups(self) -> int:
        return self.head_size // self.group_size

    @property
    def param_bytes_per_token(self) -> int:
        """K and V scale + zero for every group of one token."""
        return 2 * self.groups * 2 * PARAM_BYTES

    @property
    def bytes_per_token_head(self) -> int:
        return 2 * self.row_bytes + self.param_bytes_per_token

    @property
    def tiles(self) -> int:
        """16-token tiles per head region."""
        return self.block_size // TILE_TOKENS

    @property
    def tile_bytes(self) -> int:
        return TILE_TOKENS * self.bytes_per_token_head

    @property
    def head_region_bytes(self) -> int:
        return self.tiles * self.tile_bytes

    # offsets inside a tile
    @property
    def k_rows_offset(self) -> int:
        return 0

    @property
    def v_rows_offset(self) -> int:
        return TILE_TOKENS * self.row_bytes

    @property
    def params_offset(self) -> int:
        return 2 * TILE_TOKENS * self.row_bytes

    def page_bytes(self, num_kv_heads: int) -> int:
        """Bytes of one vLLM block of one layer (what the KV-cache spec reports)."""
        return num_kv_heads * self.head_region_bytes

    def compression_vs(self, dtype_bytes: int = 2) -> float:
        """How many more tokens fit than with an unquantized cache of ``dtype_bytes``."""
        return 2 * self.head_size * dtype_bytes / self.bytes_per_token_head

    # ---- channel order inside a row --------------------------------------------------
    def k_channel_of_slot(self) -> torch.Tensor:
        """``[row_words * values_per_word]``: channel stored at each code slot of a K row.

        Slot ``i`` is bits ``[bits*(i % vpw), +bits)`` of word ``i // vpw``.
        Lane quad position ``t`` owns words ``t*W .. t*W+W-1`` (W = row_words/4);
        word ``w`` of lane ``t`` covers ``ksteps_per_word`` consecutive k-steps, and
        the lop3 unpack ``(word >> bits*i) & mask`` yields the half2 pair
        (slot i, slot i + vpw/2) = fragment register ``i`` of those k-steps.
        """
        return _k_channel_of_slot(self.head_size, self.bits)

    def v_channel_of_slot(self) -> torch.Tensor:
        """``[row_words * values_per_word]``: channel stored at each code slot of a V row.

        Lane group ``c`` (= lane / 4, 0..7) owns words ``c*W .. c*W+W-1`` (W = row_words/8);
        slot ``p`` of its word ``h`` holds channel ``c + 8 * (h * vpw + p)``, i.e. n-tile
        ``h * vpw + p``. ``prmt`` of two tokens' words (selectors 0x5410 / 0x7632)
        interleaves them so that the lop3 unpack yields (token a, token b) pairs.
        """
        return _v_channel_of_slot(self.head_size, self.bits)


@functools.cache
def _k_channel_of_slot(head_size: int, bits: int) -> torch.Tensor:
    vpw = WORD_BITS // bits
    words_per_lane = head_size * bits // WORD_BITS // 4
    ksteps_per_word = vpw // 4  # 4 values of one k-step per lane: 2 pairs
    half = vpw // 2
    out = torch.empty(4 * words_per_lane * vpw, dtype=torch.long)
    for t in range(4):
        for w in range(words_per_lane):
            for slot in range(vpw):
                i, elem = slot % half, slot // half  # fragment register, low/high half
                kstep = w * ksteps_per_word + i // 2
                channel = 16 * kstep + 8 * (i % 2) + 2 * t + elem
                out[(t * words_per_lane + w) * vpw + slot] = channel
    return out


@functools.cache
def _v_channel_of_slot(head_size: int, bits: int) -> torch.Tensor:
    vpw = WORD_BITS // bits
    words_per_group = head_size * bits // WORD_BITS // 8
    out = torch.empty(8 * words_per_group * vpw, dtype=torch.long)
    for c in range(8):
        for h in range(words_per_group):
            for p in range(vpw):
                out[(c * words_per_group + h) * vpw + p] = c + 8 * (h * vpw + p)
    return out


# ---- the K rotation -----------------------------------------------------------------
ROTATION_SEED = 0x5EED_B17D


@functools.cache
def rotation_signs(head_size: int) -> torch.Tensor:
    """Fixed +-1 vector applied before the Walsh-Hadamard transform (float32, CPU)."""
    gen = torch.Generator().manual_seed(ROTATION_SEED)
    return (torch.randint(0, 2, (head_size,), generator=gen) * 2 - 1).to(torch.float32)
