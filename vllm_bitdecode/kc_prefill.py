"""Prefill in per-channel K mode (issue #7, docs/per-channel-k-design.md section 8).

A query at position ``p`` attends to the pages before its own page ``p // bs`` as stored
(K per channel, V per token), and to its own page's keys and values ``p // bs * bs .. p``
exactly. No
single FlashAttention call has that mask, so the queries of a step's prefill rows are cut
into *segments*, the queries of one request that sit in one page (consecutive tokens of
the step, so no reordering), and attention runs in two parts that are merged by LSE:

1. **closed**: each segment over the dequantized pages before its page (non-causal),
   read as a paged KV cache from a workspace where every request starts on a page
   boundary (``seqused_k = page * bs``; segments in a request's first page have none);
2. **own**: each segment over its page's exact keys and values up to its last query
   (causal, aligned at the bottom right): the rows before the step's first position
   come from the request's residual, gathered *before* the write can overwrite them, the
   rest from this step's ``key`` and ``value``.

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
# (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
#  -> (out, lse); causal, the last query aligned with the last key
OwnAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]
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
    closed_len: torch.Tensor     # [segments] int32: page * bs, the closed keys
    block_table: torch.Tensor    # [segments, max pages] int32: workspace pages
    own_begin: torch.Tensor      # [segments] int64: position of the page's first key
    cu_seqlens_own: torch.Tensor  # [segments + 1] int32: own keys of each segment
    seg_request: torch.Tensor    # [segments] int64: request index of each segment
    own_rows: torch.Tensor       # [own keys] int64: each segment's own keys, in segment
    #                              order, as rows of gather_own_kv's requests concatenated
    prefix_empty: torch.Tensor   # [prefill tokens] bool: in a request's first page (no
    #                              closed keys)
    max_q: int
    max_closed: int
    max_own: int
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_segments(self) -> int:
        return int(self.closed_len.shape[0])

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors every layer's attention reads, copied to ``device`` once per step
        (the plan is shared by all layers of a step)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {
                name: getattr(self, name).to(device, non_blocking=True)
                for name in ("cu_seqlens_q", "cu_seqlens_own", "closed_len", "block_table",
                             "own_rows", "prefix_empty")}
        return self._on_device[key]


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


def _cu(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(([0], np.cumsum(x))).astype(np.int32))


def plan_kc_prefill(query_start_loc: Sequence[int], seq_lens: Sequence[int],
                    rows: Sequence[int], block_size: int) -> KCPrefillPlan:
    """Segments of the prefill rows ``rows`` (batch rows, ascending) of a step whose
    host-side ``query_start_loc`` and ``seq_lens`` are given. Array ops throughout (numpy
    on the host), no Python loop over segments: a long prompt at block 16 has thousands."""
    bs = block_size
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    idx = np.asarray(rows, dtype=np.int64)
    qlen = qsl[idx + 1] - qsl[idx]
    n = np.asarray(seq_lens, dtype=np.int64)[idx]
    start = n - qlen
    first_page, last_page = start // bs, (n - 1) // bs
    pages_per_req = last_page - first_page + 1
    seg_req = np.repeat(np.arange(len(idx)), pages_per_req)
    num_seg = len(seg_req)
    page = first_page[seg_req] + (np.arange(num_seg)
                                  - np.repeat(_exclusive_cumsum(pages_per_req), pages_per_req))
    q_lo = np.maximum(start[seg_req], page * bs)
    q_hi = np.minimum(n[seg_req], (page + 1) * bs)
    closed = page * bs
    own_count = q_hi - closed
    q_count = q_hi - q_lo
    ws_blocks_per_req = -(-n // bs)
    ws_start = _exclusive_cumsum(ws_blocks_per_req)
    # workspace pages of each segment's closed part: its request's first closed pages
    closed_pages = closed // bs
    max_pages = max(int(closed_pages.max()) if num_seg else 0, 1)
    col = np.arange(max_pages)
    table = np.where(col[None, :] < closed_pages[:, None],
                     ws_start[seg_req][:, None] + col[None, :], 0).astype(np.int32)
    # own keys: gather_own_kv gives request i the positions first_page * bs .. n - 1
    own_len = n - first_page * bs
    seg_base = _exclusive_cumsum(own_len)[seg_req] + closed - first_page[seg_req] * bs
    own_starts = _exclusive_cumsum(own_count)
    own_rows = (np.repeat(seg_base - own_starts, own_count)
                + np.arange(int(own_count.sum())))
    return KCPrefillPlan(
        block_size=bs, rows=list(rows), starts=start.tolist(), seq_lens=n.tolist(),
        token_offsets=_exclusive_cumsum(qlen).tolist(), ws_block_start=ws_start.tolist(),
        ws_blocks=int(ws_blocks_per_req.sum()),
        cu_seqlens_q=_cu(q_count), closed_len=torch.from_numpy(closed.astype(np.int32)),
        block_table=torch.from_numpy(table), own_begin=torch.from_numpy(closed),
        cu_seqlens_own=_cu(own_count), seg_request=torch.from_numpy(seg_req),
        own_rows=torch.from_numpy(own_rows),
        prefix_empty=torch.from_numpy(np.repeat(closed == 0, q_count)),
        max_q=int(q_count.max()) if num_seg else 0,
        max_closed=int(closed.max()) if num_seg else 0,
        max_own=int(own_count.max()) if num_seg else 0,
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


def workspace_starts(plan: KCPrefillPlan) -> torch.Tensor:
    """``out_start`` for ``dequantize_pages_kc``: each request's first workspace row, a
    page boundary, then the total ([requests + 1] int32, CPU)."""
    starts = [b * plan.block_size for b in plan.ws_block_start]
    return torch.tensor(starts + [plan.ws_blocks * plan.block_size], dtype=torch.int32)


def run_kc_prefill(
    plan: KCPrefillPlan,
    q: torch.Tensor,  # [prefill tokens, heads, D] model dtype
    own_kv: list[torch.Tensor],  # gather_own_kv
    k_ws: torch.Tensor,  # [ws_blocks * bs, kv_heads, D]: dequantize_pages_kc's K
    v_ws: torch.Tensor,  # [ws_blocks * bs, kv_heads, D]: its V
    scale: float,
    closed_attention: ClosedAttention,
    own_attention: OwnAttention,
    merge: Merge,
    out: torch.Tensor,  # [prefill tokens, heads, D]; written
) -> None:
    """The two parts and their merge (see the module docstring)."""
    bs = plan.block_size
    dev = plan.on(q.device)
    own = torch.cat(own_kv, dim=1).index_select(1, dev["own_rows"])  # [2, own keys, kv, D]
    cu_q = dev["cu_seqlens_q"]
    suffix_out, suffix_lse = own_attention(q, own[0], own[1], cu_q, dev["cu_seqlens_own"],
                                           plan.max_q, plan.max_own, scale)
    pages = (plan.ws_blocks, bs, *k_ws.shape[1:])
    prefix_out, prefix_lse = closed_attention(
        q, k_ws.view(pages), v_ws.view(pages), cu_q, dev["closed_len"], dev["block_table"],
        plan.max_q, max(plan.max_closed, 1), scale)
    # segments in a request's first page have no closed keys: their prefix weighs nothing
    empty = dev["prefix_empty"]
    prefix_lse[:, empty] = float("-inf")
    prefix_out[empty] = 0
    merge(out, prefix_out, prefix_lse, suffix_out, suffix_lse)
