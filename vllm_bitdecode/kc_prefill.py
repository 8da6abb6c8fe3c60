"""Prefill in per-channel K mode (issue #7, docs/per-channel-k-design.md section 8).

A query at position ``p`` attends to the pages before its own page ``p // bs`` as stored
(K per channel, V per token), and to its own page's keys and values ``p // bs * bs .. p``
exactly. No single FlashAttention call has that mask. The queries of a step's prefill rows
are cut into *segments*, the queries of one request that sit in one page, and segments
into *groups* of up to ``group_pages`` consecutive pages of one request (consecutive
tokens of the step either way, so no reordering). Attention runs in two parts, merged by
LSE:

1. **closed**: each group over the dequantized pages before its first page ``g0``
   (non-causal), read as a paged KV cache from a workspace where every request starts on
   a page boundary (``seqused_k = g0 * bs``; groups starting at page 0 have none). A group
   is about 128 queries (``128 // bs`` pages), so FlashAttention's query tiles are full;
   page-long segments filled an eighth of them at block 16 (or half with GQA packing);
2. **near**: each segment over the keys and values from its group's first page to its
   own last query (causal, aligned at the bottom right), paged too: the workspace pages
   ``g0`` to its own (dequantized), then one scratch page holding its own page's exact
   rows, which come from the request's residual (gathered *before* the write can
   overwrite them) for positions before the step and from this step's ``key`` and
   ``value`` after. The scratch pages follow the workspace's, one per segment, so no key
   is copied more than once.

This module plans the segments on the host and runs the two parts through attention
functions passed in (FlashAttention in the backend, plain PyTorch in the CPU tests,
which compare the result with ``reference_kc.forward_step_kc``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# (q, k_pages, v_pages, cu_seqlens_q, seqused_k, block_table, max_seqlen_q, max_seqlen_k,
#  scale) -> (out [tokens, heads, D], lse [heads, tokens]); non-causal over paged K/V
ClosedAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# the same arguments -> (out, lse); causal, the last query aligned with the last key
NearAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# (out, prefix_out, prefix_lse, suffix_out, suffix_lse) -> None, as vLLM's merge_attn_states
Merge = Callable[..., None]


@dataclass
class KCPrefillPlan:
    """Host-side layout of one step's channel-mode prefill (all tensors on the CPU).

    Requests are the step's prefill rows in batch order; segments are in token order.
    """

    block_size: int
    rows: list[int]              # batch row of each prefill request
    starts: list[int]            # first position computed in this step, per request
    seq_lens: list[int]          # context length after this step, per request
    token_offsets: list[int]     # first token of each request among the prefill tokens
    ws_block_start: list[int]    # first workspace page of each request
    ws_blocks: int               # workspace pages in all
    cu_seqlens_q: torch.Tensor   # [segments + 1] int32, over the prefill tokens
    near_len: torch.Tensor       # [segments] int32: near keys (pages g0.. then own rows)
    near_table: torch.Tensor     # [segments, group pages] int32: their pages in the pool
    #                              (workspace pages, then scratch page ws_blocks + segment)
    scratch_rows: torch.Tensor   # [own_total] int64: pool row of each of gather_own_kv's
    #                              rows, the requests concatenated
    own_total: int               # rows of gather_own_kv's requests concatenated
    scratch_pad_rows: torch.Tensor  # [pad rows] int64: the rows of each request's last
    #                              scratch page after its last position, zeroed
    cu_seqlens_closed_q: torch.Tensor  # [groups + 1] int32, over the prefill tokens
    closed_len: torch.Tensor     # [groups] int32: g0 * bs, the closed keys
    block_table: torch.Tensor    # [groups, max pages] int32: workspace pages
    prefix_empty: torch.Tensor   # [prefill tokens] bool: in a group starting at page 0
    #                              (no closed keys)
    max_q: int
    max_closed_q: int
    max_closed: int
    max_near: int
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_segments(self) -> int:
        return int(self.near_len.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.closed_len.shape[0])

    @property
    def ws_rows(self) -> int:
        return self.ws_blocks * self.block_size

    @property
    def pool_rows(self) -> int:
        """Rows of the workspace ``run_kc_prefill`` takes: dequantized pages, then one
        scratch page per segment."""
        return (self.ws_blocks + self.num_segments) * self.block_size

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors every layer's attention reads, copied to ``device`` once per step
        (the plan is shared by all layers of a step)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {
                name: getattr(self, name).to(device, non_blocking=True)
                for name in ("cu_seqlens_q", "near_len", "near_table", "scratch_rows",
                             "scratch_pad_rows", "cu_seqlens_closed_q", "closed_len",
                             "block_table", "prefix_empty")}
        return self._on_device[key]


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


def _cu(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(([0], np.cumsum(x))).astype(np.int32))


def _request_pages(query_start_loc: Sequence[int], seq_lens: Sequence[int],
                   rows: Sequence[int], block_size: int) -> tuple[np.ndarray, ...]:
    """Per request of ``rows``: its query length, context length, first position of the
    step, first page of the step, pages its queries touch (its segments) and its pages in
    all (its workspace pages)."""
    bs = block_size
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    idx = np.asarray(rows, dtype=np.int64)
    qlen = qsl[idx + 1] - qsl[idx]
    n = np.asarray(seq_lens, dtype=np.int64)[idx]
    start = n - qlen
    first_page = start // bs
    return qlen, n, start, first_page, (n - 1) // bs - first_page + 1, -(-n // bs)


def plan_kc_prefill(query_start_loc: Sequence[int], seq_lens: Sequence[int],
                    rows: Sequence[int], block_size: int,
                    group_pages: int | None = None) -> KCPrefillPlan:
    """Segments and groups of the prefill rows ``rows`` (batch rows, ascending) of a step
    whose host-side ``query_start_loc`` and ``seq_lens`` are given; ``group_pages``
    defaults to ``128 // block_size`` (at least 1). Array ops throughout (numpy on the
    host), no Python loop over segments: a long prompt at block 16 has thousands."""
    bs = block_size
    gp = group_pages if group_pages is not None else max(1, 128 // bs)
    if gp < 1:
        raise ValueError(f"group_pages must be >= 1, got {gp}")
    qlen, n, start, first_page, pages_per_req, ws_blocks_per_req = _request_pages(
        query_start_loc, seq_lens, rows, bs)
    seg_first = _exclusive_cumsum(pages_per_req)  # first segment of each request
    seg_req = np.repeat(np.arange(len(n)), pages_per_req)
    num_seg = len(seg_req)
    rank = np.arange(num_seg) - np.repeat(seg_first, pages_per_req)
    page = first_page[seg_req] + rank  # each segment's page
    q_lo = np.maximum(start[seg_req], page * bs)
    q_hi = np.minimum(n[seg_req], (page + 1) * bs)
    q_count = q_hi - q_lo
    own_count = q_hi - page * bs
    # groups: runs of gp pages of a request, from the step's first page on
    group_start = first_page[seg_req] + rank // gp * gp  # g0 of each segment's group
    new_group = np.ones(num_seg, dtype=bool)
    new_group[1:] = (seg_req[1:] != seg_req[:-1]) | (group_start[1:] != group_start[:-1])
    grp_first = np.flatnonzero(new_group)  # first segment of each group
    grp_q = np.add.reduceat(q_count, grp_first) if num_seg else q_count
    g0 = group_start[grp_first]
    closed = g0 * bs
    ws_start = _exclusive_cumsum(ws_blocks_per_req)
    ws_blocks = int(ws_blocks_per_req.sum())
    grp_req = seg_req[grp_first]
    max_pages = max(int(g0.max()) if num_seg else 0, 1)
    col = np.arange(max_pages)
    table = np.where(col[None, :] < g0[:, None],
                     ws_start[grp_req][:, None] + col[None, :], 0).astype(np.int32)
    # near keys of a segment: workspace pages g0 .. page - 1 of its request, then its
    # scratch page (pool page ws_blocks + segment) with its own rows
    mid_pages = page - group_start
    col = np.arange(gp)
    near_table = np.where(col[None, :] < mid_pages[:, None],
                          (ws_start[seg_req] + group_start)[:, None] + col[None, :],
                          ws_blocks + np.arange(num_seg)[:, None]).astype(np.int32)
    near_len = mid_pages * bs + own_count
    # gather_own_kv's rows (request i: positions first_page * bs .. n - 1, requests in
    # order) land in the scratch page of their segment, at their offset in the page
    own_len = n - first_page * bs
    own_total = int(own_len.sum())
    pos = np.arange(own_total) - np.repeat(_exclusive_cumsum(own_len), own_len) \
        + np.repeat(first_page * bs, own_len)  # position of each own row
    row_seg = np.repeat(seg_first - first_page, own_len) + pos // bs
    scratch_rows = (ws_blocks + row_seg) * bs + pos % bs
    # a request's last page may be partial: FlashAttention reads a page whole (TMA at
    # 128-token pages) and masks only the scores, so rows past seqused_k must not hold
    # NaN or Inf from an earlier use of the workspace (0 x NaN is NaN in P @ V)
    last_seg = seg_first + pages_per_req - 1
    pad = (-n) % bs
    pad_first = (ws_blocks + last_seg + 1) * bs - pad
    scratch_pad_rows = np.repeat(pad_first, pad) + np.arange(int(pad.sum())) \
        - np.repeat(_exclusive_cumsum(pad), pad)
    return KCPrefillPlan(
        block_size=bs, rows=list(rows), starts=start.tolist(), seq_lens=n.tolist(),
        token_offsets=_exclusive_cumsum(qlen).tolist(), ws_block_start=ws_start.tolist(),
        ws_blocks=ws_blocks, cu_seqlens_q=_cu(q_count),
        near_len=torch.from_numpy(near_len.astype(np.int32)),
        near_table=torch.from_numpy(near_table),
        scratch_rows=torch.from_numpy(scratch_rows.astype(np.int64)),
        own_total=own_total,
        scratch_pad_rows=torch.from_numpy(scratch_pad_rows.astype(np.int64)),
        cu_seqlens_closed_q=_cu(grp_q), closed_len=torch.from_numpy(closed.astype(np.int32)),
        block_table=torch.from_numpy(table),
        prefix_empty=torch.from_numpy(np.repeat(closed == 0, grp_q)),
        max_q=int(q_count.max()) if num_seg else 0,
        max_closed_q=int(grp_q.max()) if num_seg else 0,
        max_closed=int(closed.max()) if num_seg else 0,
        max_near=int(near_len.max()) if num_seg else 0,
    )


def gather_own_kv(plan: KCPrefillPlan, residual: torch.Tensor, row_slot: Sequence[int],
                  key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
    """Per prefill request, the exact K and V of positions ``start // bs * bs ..
    seq_len - 1``: the residual's rows before ``start`` (read now, before the write
    replaces them) and this step's ``key`` / ``value`` rows (the prefill tokens only, in
    order). Returns ``[2, positions, kv_heads, D]`` tensors in the model dtype."""
    bs = plan.block_size
    out = []
    for i, r in enumerate(plan.rows):
        s, n = plan.starts[i], plan.seq_lens[i]
        old = residual[int(row_slot[r]), :, :, : s - s // bs * bs].transpose(1, 2)
        rows = slice(plan.token_offsets[i], plan.token_offsets[i] + n - s)
        out.append(torch.cat((old, torch.stack((key[rows], value[rows]))), dim=1))
    return out


def pool_rows_per_request(query_start_loc: Sequence[int], seq_lens: Sequence[int],
                          rows: Sequence[int], block_size: int) -> list[int]:
    """Rows of ``run_kc_prefill``'s pool that each request of ``rows`` takes, as
    ``plan_kc_prefill`` lays it out: its pages dequantized, then a scratch page per page
    that its queries of this step touch."""
    *_, segments, ws_blocks = _request_pages(query_start_loc, seq_lens, rows, block_size)
    return ((ws_blocks + segments) * block_size).tolist()


def workspace_rows(max_model_len: int, max_num_batched_tokens: int, block_size: int) -> int:
    """Pool rows that always hold one request: its pages (at most max_model_len tokens)
    and a scratch page per page its chunk touches (a chunk of at most
    max_num_batched_tokens tokens touches one page more than it fills)."""
    bs = block_size
    chunk = min(max_model_len, max_num_batched_tokens)
    return (-(-max_model_len // bs) + -(-chunk // bs) + 1) * bs


def workspace_starts(plan: KCPrefillPlan) -> torch.Tensor:
    """``out_start`` for ``dequantize_pages_kc``: each request's first workspace row, a
    page boundary, then the total ([requests + 1] int32, CPU)."""
    starts = [b * plan.block_size for b in plan.ws_block_start]
    return torch.tensor(starts + [plan.ws_blocks * plan.block_size], dtype=torch.int32)


def run_kc_prefill(
    plan: KCPrefillPlan,
    q: torch.Tensor,  # [prefill tokens, heads, D] model dtype
    own_kv: list[torch.Tensor],  # gather_own_kv
    k_pool: torch.Tensor,  # [pool_rows, kv_heads, D]: dequantize_pages_kc's K in the
    #                        first ws_rows rows; the scratch pages after them are filled here
    v_pool: torch.Tensor,  # the same for V
    scale: float,
    closed_attention: ClosedAttention,
    near_attention: NearAttention,
    merge: Merge,
    out: torch.Tensor,  # [prefill tokens, heads, D]; written
) -> None:
    """The two parts and their merge (see the module docstring)."""
    bs = plan.block_size
    if k_pool.shape[0] < plan.pool_rows:
        raise ValueError(f"the workspace has {k_pool.shape[0]} rows, the plan needs "
                         f"{plan.pool_rows}")
    dev = plan.on(q.device)
    own = torch.cat(own_kv, dim=1)  # [2, own_total, kv, D]
    k_pool.index_copy_(0, dev["scratch_rows"], own[0])
    v_pool.index_copy_(0, dev["scratch_rows"], own[1])
    k_pool.index_fill_(0, dev["scratch_pad_rows"], 0)
    v_pool.index_fill_(0, dev["scratch_pad_rows"], 0)
    pool = (plan.ws_blocks + plan.num_segments, bs, *k_pool.shape[1:])
    k_pages, v_pages = k_pool[: plan.pool_rows].view(pool), v_pool[: plan.pool_rows].view(pool)
    suffix_out, suffix_lse = near_attention(
        q, k_pages, v_pages, dev["cu_seqlens_q"], dev["near_len"], dev["near_table"],
        plan.max_q, plan.max_near, scale)
    prefix_out, prefix_lse = closed_attention(
        q, k_pages, v_pages, dev["cu_seqlens_closed_q"], dev["closed_len"],
        dev["block_table"], plan.max_closed_q, max(plan.max_closed, 1), scale)
    # groups starting at a request's first page have no closed keys: their prefix weighs
    # nothing
    empty = dev["prefix_empty"]
    prefix_lse[:, empty] = float("-inf")
    prefix_out[empty] = 0
    merge(out, prefix_out, prefix_lse, suffix_out, suffix_lse)
