"""The extension's torch ops (``torch.ops.bitdecode.*``), with fake impls for tracing.

The kernels live in ``csrc/``; this module only loads them and states shapes for
torch.compile. Every argument the host can see is checked in ``csrc/ops.cpp``; values
that live on the device (block-table entries, lengths, slots, query_start_loc) are the
caller's promise, as in FlashAttention.

Launch order: the decode ops start as programmatic dependents of the kernel before them
(``launch_impl.cuh``, ``launch_dependent``), so that their CTAs read the step's metadata
(``seq_lens``, ``block_table``, ``query_start_loc``, ``sel_positions`` / ``sel_count``,
``row_slot``, ``key_offsets``) while that kernel finishes, and wait only before Q, the
pages and the residual. Only a kernel that triggers its dependents early lets them start
before it ends: here the page writes (``quantize_to_pages``, ``write_tokens_kc``), the
decodes and their combine; none of them writes those inputs, and PyTorch's kernels never
trigger early. A caller that writes one of them with its own early-triggering kernel
must not launch a decode op right after it.
"""

from __future__ import annotations

import torch

try:
    from vllm_bitdecode import _C  # noqa: F401  (registers torch.ops.bitdecode)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "vllm_bitdecode's CUDA extension is not built; install with "
        "`pip install --no-build-isolation -e .` (needs nvcc and torch 2.11)"
    ) from exc


@torch.library.register_fake("bitdecode::quantize_to_pages")
def _quantize_fake(key, value, slot_mapping, cache, rotation_signs, bits, group_size, block_size):
    return None


@torch.library.register_fake("bitdecode::dequantize_pages")
def _dequantize_fake(cache, block_table, seq_lens, out_start, key_out, value_out, bits,
                     group_size, block_size, max_tokens):
    return None


@torch.library.register_fake("bitdecode::dequantize_pages_kc")
def _dequantize_kc_fake(cache, block_table, seq_lens, out_start, key_out, value_out, bits,
                        group_size, block_size, max_tokens, k_param_bits=16):
    return None


@torch.library.register_fake("bitdecode::decode")
def _decode_fake(out, q, cache, block_table, seq_lens, partial_out, partial_lse,
                 rotation_signs, softmax_scale, bits, group_size, block_size, num_splits,
                 min_tiles_per_split, query_start_loc=None, max_query_len=1):
    return None


@torch.library.register_fake("bitdecode::decode_sparse")
def _decode_sparse_fake(out, q, cache, block_table, seq_lens, sel_positions, sel_count,
                        partial_out, partial_lse, rotation_signs, softmax_scale, bits,
                        group_size, block_size, num_splits, min_tiles_per_split,
                        shared_selection, selection_unit=1, sel_cache_tiles=None):
    return None


@torch.library.register_fake("bitdecode::decode_select")
def _decode_select_fake(out, q, cache, block_table, seq_lens, partial_out, partial_lse,
                        rotation_signs, softmax_scale, bits, group_size, block_size, num_splits,
                        min_tiles_per_split, sel_positions, sel_count, keys, key_offsets,
                        min_seq_len, shared_selection, selection_unit=1, sel_cache_tiles=None):
    return None


@torch.library.register_fake("bitdecode::write_tokens_kc")
def _write_tokens_kc_fake(key, value, slot_mapping, query_start_loc, seq_lens, row_slot, cache,
                          residual, bits, group_size, block_size, k_param_bits=16):
    return None


@torch.library.register_fake("bitdecode::decode_kc")
def _decode_kc_fake(out, q, cache, residual, block_table, seq_lens, row_slot, partial_out,
                    partial_lse, softmax_scale, bits, group_size, block_size, num_splits,
                    min_tiles_per_split, k_param_bits=16):
    return None


quantize_to_pages = torch.ops.bitdecode.quantize_to_pages
dequantize_pages = torch.ops.bitdecode.dequantize_pages
# per-channel K mode (issue #7): as dequantize_pages, over channel-mode pages
dequantize_pages_kc = torch.ops.bitdecode.dequantize_pages_kc
# decode(out, q, cache, block_table, seq_lens, partial_out, partial_lse, rotation_signs,
#        softmax_scale, bits, group_size, block_size, num_splits, min_tiles_per_split,
#        query_start_loc=None, max_query_len=1): one query token per sequence, or with
#        query_start_loc [num_seqs + 1] int32 up to max_query_len each (csrc/.../ops.h)
decode = torch.ops.bitdecode.decode
decode_ctas_per_sm = torch.ops.bitdecode.decode_ctas_per_sm


def decode_sparse(
    out: torch.Tensor,  # [num_seqs, num_heads, 128], model dtype; written
    q: torch.Tensor,  # [num_seqs, num_heads, 128], one decode token per sequence
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_region_bytes] uint8
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: DENSE_ROW rows' lengths; sizes the own page
    sel_positions: torch.Tensor,  # [num_seqs, num_kv_heads (1 if shared), token_budget] int32
    sel_count: torch.Tensor,  # [num_seqs] int32: count <= token_budget | DENSE_ROW (-1) | 0
    partial_out: torch.Tensor,  # split-K workspace as for decode (unused if num_splits == 1)
    partial_lse: torch.Tensor,
    rotation_signs: torch.Tensor | None,
    softmax_scale: float,
    bits: int,
    group_size: int,
    block_size: int,
    num_splits: int,
    min_tiles_per_split: int,
    shared_selection: bool,
    selection_unit: int = 1,
    sel_cache_tiles: torch.Tensor | None = None,  # as sel_positions; selection_unit 16 only
) -> None:
    """Sparse decode of a reuse layer (docs/sparse-mode-design.md): the dense ``decode``
    over the selected positions only, ``reference_sparse.sparse_attention`` on the GPU.
    With ``selection_unit=16`` the selection holds 16-token pages instead
    (``reference_sparse.select_pages``, ascending, the row's own page last): each is read
    whole with one bulk copy, and its tokens below ``seq_lens[r]`` are attended to
    (``reference_sparse.pages_to_positions``).

    Row ``r`` attends with an exact softmax to ``sel_positions[r, h, :sel_count[r]]``
    (``h``: the KV head, or 0 with ``shared_selection``), in any order, each a position
    ``< seq_lens[r]`` of its sequence. ``sel_count[r] == -1`` (``DENSE_ROW``) attends to the
    whole sequence as ``decode`` does, 0 (a padding row) writes zeros and reads no page.
    Counts stay on the device and are not checked: a count above the budget reads the
    budget's positions, any other negative count is taken as 0. Splits are planned as for
    ``decode``, each split covering a share of the ``ceil(count / 16)`` tiles.

    ``sel_cache_tiles`` (pages only): the same lists as ``decode_select`` wrote them there,
    each page's place in the cache, so that the kernel reads a page after one load (the
    list) instead of two (the list, then ``block_table``); ``sel_positions`` is then read
    for nothing else. They must come from the same ``block_table``.
    """
    torch.ops.bitdecode.decode_sparse(
        out, q, cache, block_table, seq_lens, sel_positions, sel_count, partial_out,
        partial_lse, rotation_signs, softmax_scale, bits, group_size, block_size, num_splits,
        min_tiles_per_split, shared_selection, selection_unit, sel_cache_tiles,
    )


def decode_select(
    out: torch.Tensor,  # [num_seqs, num_heads, 128], model dtype; written
    q: torch.Tensor,  # [num_seqs, num_heads, 128], one decode token per sequence
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_region_bytes] uint8
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, 0 = padding row
    partial_out: torch.Tensor,  # split-K workspace as for decode (unused if num_splits == 1)
    partial_lse: torch.Tensor,
    rotation_signs: torch.Tensor | None,
    softmax_scale: float,
    bits: int,
    group_size: int,
    block_size: int,
    num_splits: int,
    min_tiles_per_split: int,
    sel_positions: torch.Tensor,  # [num_seqs, num_kv_heads (1 if shared), token_budget] int32
    sel_count: torch.Tensor,  # [num_seqs] int32; written
    keys: torch.Tensor,  # [(num_kv_heads or 1) * capacity] int32 workspace, zeros at first
    key_offsets: torch.Tensor,  # [num_seqs] int64: the row's first workspace key
    min_seq_len: int,
    shared_selection: bool,
    selection_unit: int = 1,
    sel_cache_tiles: torch.Tensor | None = None,  # as sel_positions; written (pages only)
) -> None:
    """A selection layer (docs/sparse-mode-design.md): ``decode``, which writes ``out``
    exactly as ``decode`` does, and from the same logits ``reference_sparse.select`` with
    the ``"max_logit"`` aggregate, writing what ``decode_sparse`` reads.

    Row ``r`` keeps its newest position and the ``token_budget - 1`` older positions of the
    highest scaled logit (maximum over the query heads of the KV head, or of all heads
    with ``shared_selection``), ascending; ties go to the lower position. The logits are
    the attention's own: Q rotated like K and rounded to the model dtype. Rows shorter
    than ``min_seq_len``, rows whose ``key_offsets[r]`` is negative (the builder's mark for
    a prompt's chunk, which stays dense) and rows whose ``key_offsets[r] + seq_lens[r]``
    passes the workspace's capacity get ``DENSE_ROW`` (-1); padding rows 0; unused position slots
    -1. The workspace holds one 32-bit key per selection unit (token, or 16-token page)
    of the step's rows, per KV head without ``shared_selection`` (head-major:
    ``keys[h * capacity + key_offsets[r] + unit]``): rows that share prefix pages have
    different queries, so it is indexed by row offset and unit, not by physical slot.
    With ``shared_selection`` the heads combine with atomicMax and the kernel returns the
    keys it used to zero.

    ``selection_unit=16`` ranks 16-token pages instead (``reference_sparse.select_pages``
    with pages of 16 tokens): a page's key is the best of its tokens', the row's own page
    is kept, ``sel_positions`` holds page indices (position // 16) and its last dimension
    is the budget in pages. The workspace then holds one key per page of each row, at
    the row's offset. With ``sel_cache_tiles`` it also writes each listed page's place
    in the cache there (``reference_sparse.cache_tiles``: ``block_table[r, page // t] * t
    + page % t``, ``t = block_size // 16``), for ``decode_sparse``; entries past a row's
    count are left as they were.
    """
    torch.ops.bitdecode.decode_select(
        out, q, cache, block_table, seq_lens, partial_out, partial_lse, rotation_signs,
        softmax_scale, bits, group_size, block_size, num_splits, min_tiles_per_split,
        sel_positions, sel_count, keys, key_offsets, min_seq_len, shared_selection,
        selection_unit, sel_cache_tiles,
    )


def write_tokens_kc(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, 128], model dtype
    value: torch.Tensor,  # [num_tokens, num_kv_heads, 128]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, block * block_size + offset; < 0 skips
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32, context length including this step
    row_slot: torch.Tensor,  # [num_reqs] int32, residual slot of each batch row
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, channel-mode head region] uint8
    residual: torch.Tensor,  # [num_slots, 2, num_kv_heads, block_size, 128], model dtype
    bits: int,
    group_size: int,
    block_size: int,
    k_param_bits: int = 16,
) -> None:
    """One step's write in per-channel K mode (issue #7), ``reference_kc.write_tokens_kc``
    on the GPU: V per token into the pages; every page whose last slot a token of this
    step writes, quantized per channel over its tokens (earlier keys from the request's
    residual); then each request's last written page's K and V rows into its residual.
    ``group_size`` applies to V; K has one (scale, zc) per channel and 16-token K group,
    in fp16 (``k_param_bits`` 16) or e4m3 (8)."""
    torch.ops.bitdecode.write_tokens_kc(
        key, value, slot_mapping, query_start_loc, seq_lens, row_slot, cache, residual, bits,
        group_size, block_size, k_param_bits,
    )


def decode_kc(
    out: torch.Tensor,  # [num_seqs, num_heads, 128], model dtype; written
    q: torch.Tensor,  # [num_seqs, num_heads, 128], one decode token per sequence
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, channel-mode head region] uint8
    residual: torch.Tensor,  # [num_slots, 2, num_kv_heads, block_size, 128], model dtype
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, including the query token; 0 = padding
    row_slot: torch.Tensor,  # [num_seqs] int32, residual slot of each sequence
    partial_out: torch.Tensor,  # [num_splits, num_seqs, num_heads, 128] float32 (splits > 1)
    partial_lse: torch.Tensor,  # [num_splits, num_seqs, num_heads] float32 (splits > 1)
    softmax_scale: float,
    bits: int,
    group_size: int,
    block_size: int,
    num_splits: int,
    min_tiles_per_split: int = 1,
    k_param_bits: int = 16,
) -> None:
    """Decode in per-channel K mode (issue #7), ``reference_kc.paged_decode_kc`` on the GPU:
    one online softmax over the packed per-channel pages and, in the same pass, the
    sequence's own page with its exact K and V from ``residual[row_slot[seq]]``. ``group_size``
    applies to V, ``k_param_bits`` is the pages' K-parameter width (16 or 8). Split-K as
    :func:`decode`."""
    torch.ops.bitdecode.decode_kc(
        out, q, cache, residual, block_table, seq_lens, row_slot, partial_out, partial_lse,
        softmax_scale, bits, group_size, block_size, num_splits, min_tiles_per_split,
        k_param_bits,
    )
