"""Per-step metadata: the decode split plan and the prefill layout, built once per step.

vLLM reorders every batch so that decodes come first: one query token each, or with
speculative decoding up to 1 + num_speculative_tokens (the drafts being verified, and
short prefill chunks). Decodes go to the BITDECODE split-K kernel, their query tokens
beside their query heads where the kernel's rows hold them, else one row per query
token; the remaining requests (prefills and chunked-prefill continuations) read their
whole context back from the quantized pages and run FlashAttention over it, so every
query, whatever the schedule, sees the same quantized keys and values.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.config import get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_bitdecode import config, kc_prefill, residual_slots
from vllm_bitdecode._registration import wrap_once
from vllm_bitdecode.page_format import (
    LARGEST_BLOCK_SIZE,
    TILE_TOKENS,
    PageFormat,
    rotation_signs,
)

# Under "vllm." so that vLLM's own logging configuration (handler, format, level) applies:
# a logger outside that tree prints nothing below WARNING in a vLLM process.
logger = init_logger(f"vllm.{__name__}")

# A split never reads fewer than this many 16-token tiles: below that, the combine
# pass costs more than the parallelism gains.
MIN_TILES_PER_SPLIT = 8
MAX_SPLITS = 64
# Keys the sparse-mode score workspace holds at most (4 bytes each per selection head).
MAX_SCORE_KEYS = 1 << 23
# The selected positions' buffer (rows x heads x budget, int32) above which start-up warns:
# it is made after vLLM sizes the KV cache, outside that budget.
SELECTION_WARN_BYTES = 1 << 30


# Decode rows (sequences) per kernel call: the launch grid's z dimension (csrc/ops.cpp's
# kMaxGridSeqs).
MAX_DECODE_ROWS = 65535

# Query rows per KV head that the decode kernel holds (two MMA head tiles of 8): the
# query heads of a KV head times the query tokens of a request (csrc/ops.cpp's bound).
MAX_QUERY_ROWS = 16


def packs_query_tokens(max_query_len: int, gqa: int, cfg: config.BitDecodeConfig) -> bool:
    """Whether decode requests of several query tokens (drafts to verify) go to the kernel
    as they are, their tokens beside their query heads (every page read once), or as a
    row per token: the former in dense per-token mode where the rows fit."""
    return (max_query_len > 1 and not cfg.sparse.enabled and not cfg.channel_k
            and gqa * max_query_len <= MAX_QUERY_ROWS)


def group_heads(layers: Iterable[object],
                model_heads: tuple[int, int]) -> tuple[int, int, int]:
    """The query heads, KV heads and query heads per KV head that a builder plans for:
    the most of each over its layers, or vLLM's model-wide (query, KV) heads per process
    where it has none. The model-wide counts are the first layer's, and some models
    (DeciLM / Nemotron-NAS, ``n_heads_in_group``) give each layer its own KV heads; vLLM
    then makes a builder per KV-head count, and a plan from the first layer would size
    the split workspace and the sparse buffers for another count, or put draft tokens
    beside more query heads than the kernel's rows hold."""
    counts = [(layer.num_heads, layer.num_kv_heads) for layer in layers] or [model_heads]
    return (max(h for h, _ in counts), max(k for _, k in counts),
            max(h // k for h, k in counts))


def plan_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int, ctas_per_sm: int) -> int:
    """Splits per sequence for a decode batch: as many as fit in one wave of resident
    CTAs (never more, so no CTA waits for a second wave). Depends on the batch size
    only, so a CUDA graph captured for a batch size replays the same grid."""
    if num_seqs <= 0:
        return 1
    slots = ctas_per_sm * num_sms
    return max(1, min(MAX_SPLITS, slots // (num_seqs * num_kv_heads)))


def decode_rows(query_start_loc: np.ndarray | Sequence[int], num_decodes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The decode kernel's rows for decode requests of several query tokens each (drafts
    under verification, short chunks): one row per token. Returns, per row, its request
    and how many of that request's query tokens come after it: the row attends to the
    request's first ``seq_len - after`` positions, its own included (causal)."""
    qsl = np.asarray(query_start_loc[: num_decodes + 1], dtype=np.int64)
    counts = np.diff(qsl)
    request = np.repeat(np.arange(num_decodes, dtype=np.int32), counts)
    after = (np.repeat(qsl[1:], counts) - 1 - np.arange(qsl[0], qsl[-1])).astype(np.int32)
    return request, after


def check_decode_rows(max_rows: int, max_num_seqs: int, tokens_per_request: int) -> None:
    """Start-up check: a step's decode rows fit one kernel launch (MAX_DECODE_ROWS)."""
    if max_rows > MAX_DECODE_ROWS:
        drafts = (f" x {tokens_per_request} query tokens (a decode row each)"
                  if tokens_per_request > 1 else "")
        raise config.BitDecodeConfigError(
            f"BITDECODE decodes at most {MAX_DECODE_ROWS} rows per step (a kernel launch "
            f"dimension), but --max-num-seqs {max_num_seqs}{drafts} allows {max_rows}; "
            "lower --max-num-seqs or --max-num-batched-tokens"
        )


def layer_ranges(layers: Sequence[int]) -> str:
    """Layer indices as ranges for a log line: [3, 4, 5, 7] -> "3-5, 7"."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def score_workspace_keys(max_rows: int, max_model_len: int, unit: int,
                         rows_per_request: int, kv_tokens: int) -> int:
    """Keys per selection head of sparse mode's score workspace: one per selection unit
    (token or 16-token page) of every decode row of a step, at the rows' exclusive sum
    of keys (``key_offsets``). Enough for ``max_rows`` rows of ``max_model_len`` and,
    where this process knows the KV cache's size (``kv_tokens`` > 0; a worker may not:
    vLLM sets num_gpu_blocks in the engine), for rows that together hold the cache
    ``rows_per_request`` times over (a request of 1 + drafts query tokens is that many
    rows over the same pages), at most MAX_SCORE_KEYS (the workspace is outside vLLM's
    KV budget: 256 MiB at 8 KV heads). The kernels give a row keys only where its first
    key plus its length *in tokens* fits (``selection_row_has_keys``), so one row's
    tokens are added as slack. A row past the workspace decodes densely: exact, slower.
    """
    row_keys = -(-max_model_len // unit)
    keys = max_rows * row_keys
    if kv_tokens > 0:
        keys = min(keys, -(-kv_tokens // unit) * rows_per_request)
    return min(keys + max_model_len, MAX_SCORE_KEYS)


def rows_long_enough_for_sparse(seq_lens: torch.Tensor, min_seq_len: int) -> torch.Tensor:
    """Which decode rows sparse mode applies to, element-wise: not padding (length 0) and
    at least ``min_seq_len`` tokens long. [rows] bool."""
    return (seq_lens >= 1) & (seq_lens >= min_seq_len)


def rows_with_score_keys(seq_lens: torch.Tensor, key_offsets: torch.Tensor,
                         min_seq_len: int, capacity: int) -> torch.Tensor:
    """Which decode rows the selection layer gives score keys, element-wise: the kernels'
    rule (selection.cuh, ``selection_row_has_keys``). The others are padding (length 0),
    shorter than ``min_seq_len`` or past the workspace, and decode densely. [rows] bool."""
    lens = seq_lens.to(torch.int64)
    return (rows_long_enough_for_sparse(lens, min_seq_len) & (key_offsets >= 0)
            & (key_offsets + lens <= capacity))


def score_key_offsets(row_lens: torch.Tensor, unit: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Each decode row's first key in the score workspace: the exclusive sum of the rows'
    keys (one per selection unit), in batch order. ``out``: an int64 buffer to write."""
    keys = (row_lens.to(torch.int64) + (unit - 1)).div_(unit, rounding_mode="floor")
    return torch.cumsum(keys, 0, out=out).sub_(keys)


def rows_past_score_workspace(row_lens: torch.Tensor, unit: int, min_seq_len: int,
                              capacity: int) -> tuple[int, int]:
    """For a step's decode rows of these lengths, in batch order: how many are long enough
    to decode sparsely, and how many of those get no score keys (their keys would pass the
    workspace of ``capacity``) and so decode densely."""
    lens = row_lens.to(torch.int64)
    offsets = score_key_offsets(lens, unit)
    eligible = rows_long_enough_for_sparse(lens, min_seq_len)
    fits = rows_with_score_keys(lens, offsets, min_seq_len, capacity)
    return int(eligible.sum()), int((eligible & ~fits).sum())


def plan_reuse_splits(num_seqs: int, num_kv_heads: int, num_sms: int, token_budget: int,
                      dense_splits: int) -> int:
    """Splits per sequence for a sparse reuse layer, whose rows attend to ``token_budget``
    positions each. The dense plan (``dense_splits``, one wave for whole contexts) would
    leave most of its CTAs empty here, and an empty CTA still costs a launch slot and a
    partial result for the combine to read: on an H200 at 128K, a reuse layer over 2,048
    positions took 17.8 us with the dense plan's 64 splits (16 of them with tiles) against
    14.1 with 16, and 25.4 against 22.3 us at B = 8 with 4 instead of 8 (bench_sparse
    --split-sweep, 2026-11-30). So: MIN_TILES_PER_SPLIT tiles per split (the last may
    hold fewer), at most about two CTAs per SM, never more than the dense plan, and no
    split without tiles. Depends on the batch size only (CUDA graphs)."""
    if num_seqs <= 0:
        return 1
    tiles = -(-token_budget // TILE_TOKENS)
    splits = max(1, min(dense_splits, -(-tiles // MIN_TILES_PER_SPLIT),
                        2 * num_sms // (num_seqs * num_kv_heads)))
    # the kernel gives each split ceil(tiles / splits) tiles (MIN_TILES_PER_SPLIT at
    # least), so a capped count can leave the last splits none: 257 tiles in 32 splits
    # are 28 of 9 and one of 5, and 3 CTAs that only write an empty partial
    per_split = max(-(-tiles // splits), MIN_TILES_PER_SPLIT)
    return -(-tiles // per_split)


def decode_slots(dtype: torch.dtype, bits: int, group_size: int, gqa: int,
                 device: torch.device, channel_k: bool = False,
                 k_param_bits: int = 16) -> tuple[int, int]:
    """(SMs, decode CTAs resident per SM) of this device for these decode kernels (the
    per-channel K kernel's with ``channel_k``, for its K-parameter width)."""
    from vllm_bitdecode import ops

    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    query_like = torch.empty(0, dtype=dtype, device=device)
    return num_sms, int(ops.decode_ctas_per_sm(query_like, bits, group_size, gqa, channel_k,
                                               k_param_bits))


@dataclass
class PrefillGroup:
    """Consecutive prefill requests whose contexts fit the dequantization workspace
    together: one dequantize_pages and one FlashAttention call."""

    token_begin: int  # the group's query rows, counted from the first prefill token
    token_end: int
    query_start_loc: torch.Tensor  # [n + 1] int32, from the group's first token
    kv_start_loc: torch.Tensor  # [n + 1] int32, the group's rows of the workspace
    seq_lens: torch.Tensor  # [n] int32, context length including new tokens
    block_table: torch.Tensor  # [n, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    total_kv_tokens: int  # workspace rows the group fills
    # a context longer than the workspace is read in windows, one group each, merged by
    # LSE: window i of n covers tokens from kv_begin; only the last (i = n - 1) holds the
    # queries' own positions and is causal, the others are seen whole by every query
    window: int = 0
    windows: int = 1
    kv_begin: int = 0


@dataclass
class PrefillMetadata:
    seq_lens: torch.Tensor  # [num_prefills] int32, context length including new tokens
    block_table: torch.Tensor  # [num_prefills, max_blocks] int32
    max_seq_len: int
    # per-token K: the requests cut into groups that fit the workspace (channel mode
    # plans its own prefill, kc_prefill)
    groups: list[PrefillGroup] = dataclasses.field(default_factory=list)


def prefill_workspace_rows(channel_k: bool, max_model_len: int, max_num_batched_tokens: int,
                           block_size: int,
                           window: int = config.PREFILL_WINDOW_TOKENS,
                           draft_extension: int = 0) -> int:
    """Rows of K and V that prefill dequantizes into at most, per layer call; a step's
    requests are grouped so that no group needs more. Without the bound the rows were
    the sum of the contexts of a step's prefills, which prefix-cache hits make far larger
    than the step's tokens.

    Per-token K: a whole context up to ``window`` tokens (and up to a step's tokens),
    and then a page more for a drafter's context, which vLLM lets pass max_model_len;
    a longer one is read in windows (:func:`context_windows`), whose last must hold a
    step's tokens and start on a page, so the rows are then at least a step's tokens plus
    the largest page, and a whole number of the largest pages, whatever the block size
    (the impl sizes the workspace before vLLM settles it). ``draft_extension``
    (config.drafter_query_extension): a drafter's first pass lengthens each query, and so
    a step's longest chunk, by up to that many tokens. Channel mode (which refuses
    drafters): ``kc_prefill.workspace_rows``, one whole request."""
    if channel_k:
        return kc_prefill.workspace_rows(max_model_len, max_num_batched_tokens, block_size)
    page = LARGEST_BLOCK_SIZE
    chunk = max_num_batched_tokens + draft_extension
    rows = max(min(max_model_len, window), chunk)
    if rows >= max_model_len:
        # every context fits whole, a drafter's too: vLLM 0.20's drafters lengthen their
        # contexts past max_model_len by up to num_speculative_tokens (a draft model's
        # first pass, parallel drafting), so a page more
        return max(rows, max_model_len + max(page, draft_extension))
    return -(-max(rows, chunk + page) // page) * page


def workspace_rows(vllm_config: Any, bitdecode: config.BitDecodeConfig, block_size: int) -> int:
    """prefill_workspace_rows for an engine's settings: what the metadata builder plans
    with, and what each impl's workspace holds (at ``block_size``: the KV spec's for the
    builder, the cache config's for the impl, the same rows per token). A draft model's
    layers are built under the draft's own config, whose max_model_len may be below the
    target's, while the builder (made from the runner's, the target's config) plans
    their prefills: the larger length counts."""
    spec = getattr(vllm_config, "speculative_config", None)
    target = getattr(spec, "target_model_config", None)
    max_model_len = max(vllm_config.model_config.max_model_len,
                        getattr(target, "max_model_len", 0) or 0)
    return prefill_workspace_rows(
        bitdecode.channel_k, max_model_len, vllm_config.scheduler_config.max_num_batched_tokens,
        block_size, bitdecode.prefill_window, config.drafter_query_extension(vllm_config))


def context_windows(seq_len: int, query_len: int, capacity: int,
                    block_size: int) -> list[tuple[int, int]]:
    """``[begin, end)`` token windows, in order, that cover a context of ``seq_len``
    tokens, each at most ``capacity`` long: the whole context when it fits; else windows
    of ``capacity`` tokens from the start, each beginning on a page (dequantize_pages
    reads from a page), and a last one that ends at the context's end and holds the
    ``query_len`` newest positions, the queries' own, where attention is causal."""
    if seq_len <= capacity:
        return [(0, seq_len)]
    if capacity % block_size:
        raise ValueError(f"the prefill workspace's {capacity} rows are not whole "
                         f"{block_size}-token pages")
    last = -(-(seq_len - capacity) // block_size) * block_size  # on a page, ends at seq_len
    if last > seq_len - query_len:
        raise ValueError(f"a prefill chunk of {query_len} tokens does not fit a window of "
                         f"the BITDECODE prefill workspace's {capacity} rows")
    return [(a, min(a + capacity, last)) for a in range(0, last, capacity)] + [(last, seq_len)]


def group_prefills(rows_needed: list[int], capacity: int) -> list[tuple[int, int]]:
    """``[begin, end)`` runs of consecutive requests, in order, each run's workspace rows
    summing to at most ``capacity``; as few runs as a greedy cut makes."""
    runs: list[tuple[int, int]] = []
    begin, used = 0, 0
    for i, n in enumerate(rows_needed):
        if n > capacity:
            raise ValueError(f"a prefill request needs {n} workspace rows, more than the "
                             f"BITDECODE prefill workspace's {capacity}")
        if used + n > capacity:
            runs.append((begin, i))
            begin, used = i, 0
        used += n
    if begin < len(rows_needed):
        runs.append((begin, len(rows_needed)))
    return runs


def build_prefill_groups(
    query_start_loc_cpu: torch.Tensor,  # [n + 1], from the first prefill token
    seq_lens_cpu: torch.Tensor,  # [n] int32, exact
    seq_lens: torch.Tensor,  # [n] int32 on the device
    block_table: torch.Tensor,  # [n, max_blocks] int32 on the device
    capacity: int,
    device: torch.device,
    block_size: int,
) -> list[PrefillGroup]:
    """The groups of :func:`group_prefills`, a context longer than the workspace in
    windows of its own (:func:`context_windows`), their offsets sent to the device in
    one copy."""
    lens = seq_lens_cpu.tolist()
    qlens = (query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).tolist()
    # per group: its requests [b, e), its window (index, count, first token) and, on the
    # host, its query starts and KV starts from the group's first row
    specs: list[tuple[int, int, tuple[int, int, int], torch.Tensor, torch.Tensor]] = []
    for b, e in group_prefills([min(n, capacity) for n in lens], capacity):
        if lens[b] <= capacity:  # the run's contexts fit whole
            kv = torch.zeros(e - b + 1, dtype=torch.int32)
            torch.cumsum(seq_lens_cpu[b:e], 0, out=kv[1:])
            specs.append((b, e, (0, 1, 0),
                          query_start_loc_cpu[b : e + 1] - query_start_loc_cpu[b], kv))
            continue
        wins = context_windows(lens[b], qlens[b], capacity, block_size)  # alone: e == b + 1
        for i, (k0, k1) in enumerate(wins):
            specs.append((b, e, (i, len(wins), k0), torch.tensor([0, qlens[b]]),
                          torch.tensor([0, k1 - k0])))
    host = [t for *_, qsl, kv in specs for t in (qsl, kv)]
    dev = iter(torch.cat(host).to(torch.int32).to(device, non_blocking=True)
               .split([len(t) for t in host]))
    groups = []
    for b, e, (i, n, k0), qsl, kv in specs:
        query_start_loc, kv_start_loc = next(dev), next(dev)
        groups.append(PrefillGroup(
            token_begin=int(query_start_loc_cpu[b]), token_end=int(query_start_loc_cpu[e]),
            query_start_loc=query_start_loc, kv_start_loc=kv_start_loc,
            # a window's length is its one request's KV end
            seq_lens=seq_lens[b:e] if n == 1 else kv_start_loc[1:],
            block_table=block_table[b:e, k0 // block_size :],  # its pages from k0 on
            max_query_len=int((qsl[1:] - qsl[:-1]).max()),
            max_seq_len=int(seq_lens_cpu[b:e].max()) if n == 1 else int(kv[-1]),
            total_kv_tokens=int(kv[-1]), window=i, windows=n, kv_begin=k0))
    return groups


@dataclass
class SparseMetadata:
    """What the layers of one step share in sparse mode (docs/sparse-mode-design.md).

    Persistent buffers (fixed addresses for CUDA graphs): every selection layer rewrites
    every decode row of ``sel_positions`` / ``sel_count`` before a reuse layer reads it,
    so nothing passes between steps or requests."""

    plan: config.SparseLayerPlan
    token_budget: int
    min_seq_len: int
    shared: bool
    selection_unit: int  # tokens per selected unit: 1, or 16 (page granularity)
    sel_positions: torch.Tensor  # [max_num_seqs, num_kv_heads or 1, unit_budget] int32
    sel_count: torch.Tensor  # [max_num_seqs] int32
    keys: torch.Tensor  # [(num_kv_heads or 1) * key_capacity] int32 score workspace
    key_offsets: torch.Tensor  # [num_decodes] int64: each row's first key (one per unit)
    reuse_splits: int = 1  # the reuse layers' split count this step (plan_reuse_splits)
    # pages only: the lists again as the pages' places in the cache, written by the
    # selection layers through the step's block table, so that a reuse layer reads a page
    # after one load instead of two (ops.decode_select / decode_sparse); None for tokens
    sel_cache_tiles: torch.Tensor | None = None  # as sel_positions

    @property
    def key_capacity(self) -> int:
        """Keys per selection head in the score workspace (as csrc/ops.cpp reads it)."""
        return self.keys.numel() // self.sel_positions.shape[1]


@dataclass
class KCPrefillGroup:
    """Consecutive prefill requests whose pool (``kc_prefill.run_kc_prefill``) fits the
    prefill workspace together."""

    req_begin: int  # among the step's prefill requests
    req_end: int
    token_begin: int  # among the step's prefill tokens
    token_end: int
    plan: kc_prefill.KCPrefillPlan
    workspace_start: torch.Tensor  # [requests + 1] int32 on the device, dequantize_pages_kc
    max_seq_len: int


@dataclass
class ChannelKMetadata:
    """Per-channel K mode (docs/per-channel-k-design.md): what the write, decode and the
    two-part prefill of every layer need in one step."""

    row_slot: torch.Tensor  # [max_num_seqs] int32 residual slot of each batch row (persistent)
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, all rows
    seq_lens: torch.Tensor  # [num_reqs] int32, all rows
    # prefill rows only (empty / None in decode-only steps)
    prefill_groups: list[KCPrefillGroup] = dataclasses.field(default_factory=list)
    row_slot_host: list[int] | None = None  # every batch row's slot, for the gather


@dataclass
class BitDecodeMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64
    # decode rows: one per query token of the first requests (decode_rows), each
    # attending to its own length of its request's pages; or, with decode_query_start,
    # the requests themselves, whose query tokens (at most decode_max_query_len each)
    # the kernel reads beside their heads, each attending up to its own position
    num_decodes: int
    decode_seq_lens: torch.Tensor  # [num_decodes] int32
    decode_block_table: torch.Tensor  # [num_decodes, max_blocks] int32
    num_splits: int
    # prefills: the rest, their tokens start at num_decode_tokens
    num_decode_tokens: int
    prefill: PrefillMetadata | None
    # shared by every layer
    page_format: PageFormat
    rotation_signs: torch.Tensor | None  # [head_size] float32 on the device
    partial_out: torch.Tensor  # split-K workspace, float32
    partial_lse: torch.Tensor
    sparse: SparseMetadata | None = None  # sparse decode, when configured
    channel_k: ChannelKMetadata | None = None  # per-channel K mode, when configured
    decode_query_start: torch.Tensor | None = None  # [num_decodes + 1] int32
    decode_max_query_len: int = 1


# The process's live builders, for the sleep-mode hook below.
_BUILDERS: weakref.WeakSet[BitDecodeMetadataBuilder] = weakref.WeakSet()


def reset_builders(vllm_config: object | None = None) -> int:
    """reset_persistent_buffers of every live builder of the engine whose config is
    ``vllm_config`` (of every engine when None); returns how many."""
    builders = [b for b in _BUILDERS if vllm_config is None or b.vllm_config is vllm_config]
    for builder in builders:
        builder.reset_persistent_buffers()
    return len(builders)


def install_wake_up_hook(worker_cls=None) -> None:
    """Make ``worker_cls.wake_up`` (vLLM's GPU ``Worker`` by default) reset the builders'
    persistent buffers once the KV cache's memory is back, as vLLM itself re-initializes
    fp8 KV scales there. Idempotent."""
    if worker_cls is None:
        from vllm.v1.worker.gpu_worker import Worker as worker_cls

    @wrap_once(worker_cls, "wake_up")
    def wake_up(original, self, tags: list[str] | None = None) -> None:
        original(self, tags)
        if tags is None or "kv_cache" in tags:
            reset_builders(getattr(self, "vllm_config", None))


class BitDecodeMetadataBuilder(AttentionMetadataBuilder[BitDecodeMetadata]):
    # Full CUDA graphs for pure-decode batches, of one query token per request or of
    # 1 + num_speculative_tokens (on vLLM's tensors, or as rows in persistent buffers);
    # mixed batches run piecewise (attention eager).
    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # with speculative decoding, requests of up to 1 + num_speculative_tokens query
        # tokens are decodes too (channel mode refuses speculative decoding)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        self.bitdecode = config.check_vllm_config(vllm_config)
        config.set_active(self.bitdecode)
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        # (imported here, not with this module, which the CPU tests import before any
        # layer exists: vLLM's layer module binds the current platform when imported)
        from vllm.model_executor.layers.attention.attention import Attention

        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()
        self.num_heads, self.num_kv_heads, gqa = group_heads(
            layers,
            (model.get_num_attention_heads(parallel), model.get_num_kv_heads(parallel)))
        self.head_size = model.get_head_size()
        self.page_format = self.bitdecode.page_format(self.head_size, kv_cache_spec.block_size)
        logger.info_once(config.describe_cache(self.bitdecode, self.head_size,
                                               kv_cache_spec.block_size, model.dtype.itemsize),
                         scope="global")
        self.rotation_signs = (  # written by reset_persistent_buffers, as those below
            torch.empty(self.head_size, dtype=torch.float32, device=device)
            if self.bitdecode.rotate_k else None
        )
        # Drafts to verify (speculative decoding): a request's query tokens beside its
        # query heads in the kernel's rows, every page read once, where they fit (dense
        # per-token mode, gqa x (1 + drafts) rows at most); else a decode row per token.
        per_request = self.reorder_batch_threshold
        self.pack_queries = packs_query_tokens(per_request, gqa, self.bitdecode)
        self.num_sms, self.ctas_per_sm = decode_slots(
            model.dtype, self.bitdecode.bits, self.bitdecode.group_size,
            gqa * (per_request if self.pack_queries else 1), device,
            self.bitdecode.channel_k, self.bitdecode.k_param_bits,
        )
        # Split-K workspace for the largest decode batch, allocated once so that CUDA
        # graphs capture fixed addresses.
        max_seqs = vllm_config.scheduler_config.max_num_seqs
        max_rows = self._init_decode_rows(vllm_config, max_seqs, device)
        check_decode_rows(max_rows, max_seqs, self.reorder_batch_threshold)
        rows = max(b * self._num_splits(b) for b in range(1, max_rows + 1))
        if self.pack_queries:  # partials per split, request and query token
            rows *= per_request
        self.partial_out = torch.empty(
            rows * self.num_heads * self.head_size, dtype=torch.float32, device=device
        )
        self.partial_lse = torch.empty(rows * self.num_heads, dtype=torch.float32, device=device)
        self.sparse = self._init_sparse(vllm_config, max_rows, device)
        if self.sparse is not None:  # each layer's role, checked now, not at a first decode
            self.sparse.plan.check_layers(layer_names)
        # per-channel K: the worker's residual-slot table, stepped after vLLM's
        # _update_states; rows map to slots of the impls' residual buffers
        self.row_slots = (residual_slots.install_table(max_seqs, device, vllm_config)
                          if self.bitdecode.channel_k else None)
        self.prefill_workspace_rows = workspace_rows(vllm_config, self.bitdecode,
                                                     kv_cache_spec.block_size)
        self.reset_persistent_buffers()
        _BUILDERS.add(self)
        install_wake_up_hook()

    def reset_persistent_buffers(self) -> None:
        """Write the values the persistent buffers start from: the rotation signs every
        decode reads, and the zeros (-1 for selected positions) that rows past a step's
        batch keep. Done when the builder is made, and again after vLLM's sleep mode
        (``LLM.sleep`` / ``wake_up``): vLLM makes the builders while it allocates the KV
        cache, inside the cache's memory pool, so their buffers come back from a sleep
        with the pool's memory, uninitialized. Before this, decoding after a wake-up
        read whatever that memory held for the signs and answered garbage (H200,
        2026-12-04)."""
        if self.rotation_signs is not None:
            self.rotation_signs.copy_(rotation_signs(self.head_size))
        for buffer in (self._row_seq_lens, self._row_block_table):
            if buffer is not None:
                buffer.zero_()
        if self.sparse is not None:
            self.sparse.sel_positions.fill_(-1)
            if self.sparse.sel_cache_tiles is not None:
                self.sparse.sel_cache_tiles.fill_(-1)
            self.sparse.sel_count.zero_()
            self.sparse.keys.zero_()
            self.sparse.key_offsets.zero_()
        if self.row_slots is not None:  # every row to the scratch slot until a step maps it
            self.row_slots.device_row_slot.fill_(self.row_slots.slots.scratch)

    def _init_decode_rows(self, vllm_config, max_seqs: int, device: torch.device) -> int:
        """The most decode rows a step can have. Past one query token per request, the
        rows' lengths and block-table rows (a copy of their request's) live in persistent
        buffers, so that a CUDA graph captured for a batch replays on this step's."""
        per_request = self.reorder_batch_threshold
        self._row_seq_lens = self._row_block_table = None
        if self.pack_queries:
            return max_seqs  # a request is one kernel sequence, on vLLM's own tensors
        max_rows = min(max_seqs * per_request,
                       vllm_config.scheduler_config.max_num_batched_tokens)
        if per_request > 1:
            max_blocks = -(-vllm_config.model_config.max_model_len
                           // self.kv_cache_spec.block_size)
            self._row_seq_lens = torch.empty(max_rows, dtype=torch.int32, device=device)
            self._row_block_table = torch.empty((max_rows, max_blocks), dtype=torch.int32,
                                                device=device)
        return max_rows

    def _init_sparse(self, vllm_config, max_rows: int, device: torch.device):
        """Persistent buffers of sparse mode for up to ``max_rows`` decode rows. The score
        workspace holds one key per selection unit of the step's decode rows (and per KV
        head unless the selection is shared), sized by :func:`score_workspace_keys`; a
        row past it decodes densely (its result is then exact)."""
        sparse = self.bitdecode.sparse
        self._workspace_warned = False  # _check_score_workspace
        if not sparse.enabled:
            return None
        model = vllm_config.model_config
        plan = sparse.layer_plan(model.get_total_num_hidden_layers())
        sel_heads = 1 if sparse.shared_selection else self.num_kv_heads
        capacity = score_workspace_keys(
            max_rows=max_rows, max_model_len=model.max_model_len,
            unit=sparse.selection_unit, rows_per_request=self.reorder_batch_threshold,
            kv_tokens=(vllm_config.cache_config.num_gpu_blocks or 0)
            * self.kv_cache_spec.block_size)
        self.key_offsets = torch.empty(max_rows, dtype=torch.int64, device=device)
        # with pages, their places in the cache too (as many)
        positions_bytes = max_rows * sel_heads * sparse.unit_budget * 4 * (
            2 if sparse.selection_unit > 1 else 1)
        logger.info(
            "BITDECODE sparse decode: dense layers %s, selection layers %s, reuse layers "
            "%s; token budget %d, dense below %d tokens, %s selection of %ss; score "
            "workspace %d keys (%.1f MiB), selected positions %.1f MiB",
            list(plan.dense), list(plan.selection), layer_ranges(plan.reuse),
            sparse.token_budget, sparse.dense_below,
            "shared" if sparse.shared_selection else "per-KV-head", sparse.granularity,
            capacity, capacity * sel_heads * 4 / 2**20, positions_bytes / 2**20)
        if positions_bytes >= SELECTION_WARN_BYTES:
            # made after vLLM sized the KV cache, so it comes out of the memory that
            # --gpu-memory-utilization leaves free
            logger.warning(
                "BITDECODE sparse decode: the selected positions take %.2f GiB per GPU "
                "(%d decode rows x %d heads x %d %ss), outside the KV cache's budget; "
                "page granularity (8x fewer bytes), a smaller token_budget or --max-num-seqs "
                "lowers it", positions_bytes / 2**30, max_rows, sel_heads,
                sparse.unit_budget, sparse.granularity)
        if model.max_model_len > capacity:
            # the kernels' fit test counts a row's tokens (selection.cuh), so a row longer
            # than the capped workspace never fits, even at page granularity
            logger.warning(
                "BITDECODE sparse decode: the score workspace is capped at %d keys, so rows "
                "longer than that many tokens (--max-model-len is %d) decode densely",
                capacity, model.max_model_len)
        if sparse.dense_below < sparse.token_budget:
            logger.warning(
                "BITDECODE sparse decode: min_seq_len=%d is below token_budget=%d; rows "
                "shorter than the budget keep every position and gain nothing over dense "
                "decoding", sparse.dense_below, sparse.token_budget)
        return SparseMetadata(
            plan=plan,
            token_budget=sparse.token_budget,
            min_seq_len=sparse.dense_below,
            shared=sparse.shared_selection,
            selection_unit=sparse.selection_unit,
            sel_positions=torch.empty((max_rows, sel_heads, sparse.unit_budget),
                                      dtype=torch.int32, device=device),
            sel_cache_tiles=torch.empty((max_rows, sel_heads, sparse.unit_budget),
                                        dtype=torch.int32, device=device)
            if sparse.selection_unit > 1 else None,
            sel_count=torch.empty(max_rows, dtype=torch.int32, device=device),
            keys=torch.empty(capacity * sel_heads, dtype=torch.int32, device=device),
            key_offsets=self.key_offsets,
        )

    def _check_score_workspace(self, cam: CommonAttentionMetadata, num_decodes: int) -> None:
        """Warns once when some of the step's decode rows get no score keys and decode
        densely: the workspace holds the KV cache's tokens (times the rows per request),
        and requests that share prefix pages each need keys of their own. From the
        host's upper bounds of the lengths, so no device sync: first one sum over the
        requests, the rows one by one only when that bound passes the workspace."""
        bound = cam.seq_lens_cpu_upper_bound
        if bound is None or num_decodes == 0:
            return
        sp = self.sparse
        unit, capacity = sp.selection_unit, sp.key_capacity
        lens = bound[:num_decodes]
        rows_per_request = 1 if self.pack_queries else self.reorder_batch_threshold
        upper = (int(lens.sum()) + num_decodes * (unit - 1)) // unit * rows_per_request
        if upper + int(lens.max()) <= capacity:
            return  # every row's keys fit, whatever the lengths below the bounds
        if rows_per_request > 1:  # a row per query token (_expand_decode_rows)
            request, after = decode_rows(cam.query_start_loc_cpu.numpy(), num_decodes)
            lens = lens[torch.from_numpy(request).long()] - torch.from_numpy(after)
        eligible, dense = rows_past_score_workspace(lens, unit, sp.min_seq_len, capacity)
        if dense > 0:
            self._workspace_warned = True
            logger.warning(
                "BITDECODE sparse decode: up to %d of a step's %d decode rows long enough "
                "for sparse decoding (counted from the host's upper bounds of their "
                "lengths) found the score workspace (%d keys) full and decoded "
                "densely: exact, but without the sparse speed-up, and which rows depends on "
                "their place in the batch. The workspace holds the KV cache's tokens; "
                "requests that share prefix pages each need keys of their own. Logged "
                "once.", dense, eligible, capacity)

    def _num_splits(self, num_decodes: int) -> int:
        return plan_num_splits(num_decodes, self.num_kv_heads, self.num_sms, self.ctas_per_sm)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> BitDecodeMetadata:
        cam = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            cam, decode_threshold=self.reorder_batch_threshold
        )
        prefill = None
        if num_prefills > 0:
            prefill = self._build_prefill(cam, num_decodes, num_decode_tokens)
        query_start = None
        rows_per_token = self.reorder_batch_threshold > 1 and not self.pack_queries
        if rows_per_token and num_decodes > 0:
            # drafts to verify or short chunks: a row per query token (every step, so
            # that a graph captured for a batch size always reads the same buffers)
            seq_lens, block_table = self._expand_decode_rows(cam, num_decodes,
                                                             num_decode_tokens)
        else:
            seq_lens = cam.seq_lens[:num_decodes]
            block_table = cam.block_table_tensor[:num_decodes]
            if self.pack_queries:
                # the requests as they are, their query tokens at vLLM's query_start_loc
                # (flat over a graph batch's padding: no tokens, nothing written)
                query_start = cam.query_start_loc[: num_decodes + 1]
        rows = seq_lens.shape[0]
        num_splits = self._num_splits(rows)
        sparse = None
        if self.sparse is not None and rows > 0:
            # each decode row's first key in the score workspace, on the device, into
            # the persistent buffer graphs captured
            prompt_rows = self._prompt_rows(cam, num_decodes, expanded=rows_per_token)
            key_lens = seq_lens
            if prompt_rows is not None:  # they take no room in the workspace
                prompt_rows = prompt_rows.to(self.device, non_blocking=True)
                key_lens = seq_lens.index_fill(0, prompt_rows, 0)
            score_key_offsets(key_lens, self.sparse.selection_unit,
                              out=self.key_offsets[:rows])
            if prompt_rows is not None:
                # no score keys: the kernels' rule makes these rows dense in every layer
                self.key_offsets.index_fill_(0, prompt_rows, -1)
            if not self._workspace_warned:
                self._check_score_workspace(cam, num_decodes)
            sparse = dataclasses.replace(
                self.sparse, key_offsets=self.key_offsets[:rows],
                reuse_splits=plan_reuse_splits(rows, self.num_kv_heads, self.num_sms,
                                               self.sparse.token_budget, num_splits))
        return BitDecodeMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            slot_mapping=cam.slot_mapping,
            num_decodes=rows,
            decode_seq_lens=seq_lens,
            decode_block_table=block_table,
            decode_query_start=query_start,
            decode_max_query_len=1 if query_start is None else self.reorder_batch_threshold,
            num_splits=num_splits,
            num_decode_tokens=num_decode_tokens,
            prefill=prefill,
            page_format=self.page_format,
            rotation_signs=self.rotation_signs,
            partial_out=self.partial_out,
            partial_lse=self.partial_lse,
            sparse=sparse,
            channel_k=self._build_channel_k(cam, num_decodes) if self.row_slots else None,
        )

    @staticmethod
    def _prompt_rows(cam: CommonAttentionMetadata, num_decodes: int,
                     expanded: bool) -> torch.Tensor | None:
        """The decode rows of requests still reading their prompt, on the host (None when
        there are none). vLLM hands the decode path a prompt's chunk no longer than a
        decode's query: the one token a prefix-cache hit leaves, the last piece of a
        chunked prefill. Prefill stays dense in sparse mode, so that a prompt's KV and
        first token do not depend on the cache's state or the scheduler's load.
        ``expanded``: a row per query token (_expand_decode_rows)."""
        if num_decodes == 0:
            return None
        flags = cam.is_prefilling  # host tensor, per request
        if flags is None:  # dual-batch overlap's micro-batches, vLLM's V2 model runner
            logger.warning_once(
                "BITDECODE sparse decode: vLLM passed no is_prefilling flags to this step's "
                "metadata (dual-batch overlap, or the V2 model runner), so a prompt's last "
                "chunk of a decode's length (a prefix-cache hit's one token) decodes "
                "sparsely here, not densely like the rest of the prompt. Logged once.",
                scope="process")
            return None
        flags = flags[:num_decodes]
        if not bool(flags.any()):
            return None
        if expanded:
            request, _ = decode_rows(cam.query_start_loc_cpu.numpy(), num_decodes)
            flags = flags[torch.from_numpy(request).long()]
        return flags.nonzero().flatten()

    def build_for_drafting(self, common_attn_metadata: CommonAttentionMetadata,
                           draft_index: int) -> BitDecodeMetadata:
        cam = common_attn_metadata
        if cam.max_query_len > self.reorder_batch_threshold:
            # Prefill rows are planned on host lengths (_build_prefill). vLLM 0.20's
            # drafters lengthen every query by N tokens (extend_all_queries_by_N: a
            # draft model's first pass, parallel drafting) in the device lengths and the
            # host query starts but not in seq_lens_cpu_upper_bound, which is then N
            # short: the groups would overlap in the workspace and attention would miss
            # each request's newest keys. So the drafter's prefill passes take the
            # exact lengths, with one copy from the device.
            cam = cam.replace(seq_lens_cpu_upper_bound=cam.seq_lens.cpu())
        return self.build(common_prefix_len=0, common_attn_metadata=cam, fast_build=True)

    def _expand_decode_rows(self, cam: CommonAttentionMetadata, num_decodes: int,
                            rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query token of the decode requests as a decode row of its own: its
        length (the request's, less the query tokens after it) and a copy of its
        request's block-table row, written into the persistent buffers (only the columns
        the step's longest context uses). ``rows`` is the decode tokens, padding
        included: vLLM pads a CUDA-graph batch with requests of no query tokens and
        tokens after them, whose rows get length 0. [rows] int32, [rows, max_blocks]
        int32."""
        request, after = decode_rows(cam.query_start_loc_cpu.numpy(), num_decodes)
        real = len(request)
        # a fresh pageable host tensor each step: the copy has read it when .to returns
        index = torch.from_numpy(np.stack([request, after])).to(self.device,
                                                                non_blocking=True)
        seq_lens = self._row_seq_lens[:rows]
        torch.sub(cam.seq_lens[:num_decodes].index_select(0, index[0]), index[1],
                  out=seq_lens[:real])
        seq_lens[real:].zero_()  # the padding tokens' rows
        table = self._row_block_table[:rows]
        width = min(-(-cam.max_seq_len // self.kv_cache_spec.block_size), table.shape[1])
        table[:real, :width] = cam.block_table_tensor[:num_decodes, :width].index_select(
            0, index[0])
        return seq_lens, table

    def _build_channel_k(self, cam: CommonAttentionMetadata,
                         num_decodes: int) -> ChannelKMetadata:
        md = ChannelKMetadata(
            row_slot=self.row_slots.device_row_slot,
            query_start_loc=cam.query_start_loc[: cam.num_reqs + 1],
            seq_lens=cam.seq_lens[: cam.num_reqs],
        )
        if cam.num_reqs > num_decodes:  # prefill rows: host-side plans, no device sync
            bound = cam.seq_lens_cpu_upper_bound
            if bound is None:
                bound = cam.seq_lens.cpu()
            qsl, lens = cam.query_start_loc_cpu.tolist(), bound.tolist()
            rows = list(range(num_decodes, cam.num_reqs))
            bs = self.kv_cache_spec.block_size
            need = kc_prefill.pool_rows_per_request(qsl, lens, rows, bs)
            for b, e in group_prefills(need, self.prefill_workspace_rows):
                plan = kc_prefill.plan_kc_prefill(qsl, lens, rows[b:e], bs)
                md.prefill_groups.append(KCPrefillGroup(
                    req_begin=b, req_end=e,
                    token_begin=qsl[rows[b]] - qsl[num_decodes],
                    token_end=qsl[rows[e - 1] + 1] - qsl[num_decodes], plan=plan,
                    workspace_start=kc_prefill.workspace_starts(plan).to(
                        self.device, non_blocking=True),
                    max_seq_len=max(plan.seq_lens)))
            md.row_slot_host = self.row_slots.host[: cam.num_reqs].tolist()
        return md

    def _build_prefill(
        self, cam: CommonAttentionMetadata, num_decodes: int, num_decode_tokens: int
    ) -> PrefillMetadata:
        # seq_lens_cpu_upper_bound is exact for the runner's prefill rows (the drafter's
        # are made exact in build_for_drafting); no device sync needed.
        bound = cam.seq_lens_cpu_upper_bound
        if bound is None:  # older callers: one small copy, prefill steps only
            bound = cam.seq_lens.cpu()
        seq_lens_cpu = bound[num_decodes : cam.num_reqs].to(torch.int32)
        qsl_cpu = cam.query_start_loc_cpu[num_decodes : cam.num_reqs + 1] - num_decode_tokens
        seq_lens = cam.seq_lens[num_decodes : cam.num_reqs]
        block_table = cam.block_table_tensor[num_decodes : cam.num_reqs]
        groups = []
        if not self.bitdecode.channel_k:
            groups = build_prefill_groups(qsl_cpu, seq_lens_cpu, seq_lens, block_table,
                                          self.prefill_workspace_rows, self.device,
                                          self.page_format.block_size)
        return PrefillMetadata(seq_lens=seq_lens, block_table=block_table,
                               max_seq_len=int(seq_lens_cpu.max()), groups=groups)
