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
from dataclasses import dataclass

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
    max_q: int
    max_closed: int
    max_own: int

    @property
    def num_segments(self) -> int:
        return int(self.closed_len.shape[0])


def plan_kc_prefill(query_start_loc: Sequence[int], seq_lens: Sequence[int],
                    rows: Sequence[int], block_size: int) -> KCPrefillPlan:
    """Segments of the prefill rows ``rows`` (batch rows, ascending) of a step whose
    host-side ``query_start_loc`` and ``seq_lens`` are given."""
    bs = block_size
    starts, lens, offsets, ws_start = [], [], [], []
    cu_q, closed, own_begin, cu_own, seg_req = [0], [], [], [0], []
    ws, token = 0, 0
    for i, r in enumerate(rows):
        qlen = int(query_start_loc[r + 1]) - int(query_start_loc[r])
        n = int(seq_lens[r])
        s = n - qlen
        starts.append(s)
        lens.append(n)
        offsets.append(token)
        ws_start.append(ws)
        ws += -(-n // bs)
        for page in range(s // bs, (n - 1) // bs + 1):
            q_lo, q_hi = max(s, page * bs), min(n, (page + 1) * bs)
            cu_q.append(cu_q[-1] + q_hi - q_lo)
            closed.append(page * bs)
            own_begin.append(page * bs)
            cu_own.append(cu_own[-1] + q_hi - page * bs)
            seg_req.append(i)
        token += qlen
    max_pages = max([c // bs for c in closed] + [1])
    table = torch.zeros(len(closed), max_pages, dtype=torch.int32)
    for j, (i, c) in enumerate(zip(seg_req, closed, strict=True)):
        table[j, : c // bs] = torch.arange(ws_start[i], ws_start[i] + c // bs)
    q_sizes = [b - a for a, b in zip(cu_q, cu_q[1:], strict=False)]
    own_sizes = [b - a for a, b in zip(cu_own, cu_own[1:], strict=False)]
    return KCPrefillPlan(
        block_size=bs, rows=list(rows), starts=starts, seq_lens=lens, token_offsets=offsets,
        ws_block_start=ws_start, ws_blocks=ws,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
        closed_len=torch.tensor(closed, dtype=torch.int32), block_table=table,
        own_begin=torch.tensor(own_begin, dtype=torch.int64),
        cu_seqlens_own=torch.tensor(cu_own, dtype=torch.int32),
        seg_request=torch.tensor(seg_req, dtype=torch.int64),
        max_q=max(q_sizes + [0]), max_closed=max(closed + [0]), max_own=max(own_sizes + [0]),
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
    dev = q.device
    seg = plan.seg_request.tolist()
    # own part: each segment's exact keys and values, contiguous in segment order
    own_k, own_v = [], []
    for j, i in enumerate(seg):
        page0 = plan.starts[i] // bs * bs
        begin = int(plan.own_begin[j])
        count = int(plan.cu_seqlens_own[j + 1] - plan.cu_seqlens_own[j])
        k, v = own_kv[i][:, begin - page0 : begin - page0 + count]
        own_k.append(k)
        own_v.append(v)
    cu_q = plan.cu_seqlens_q.to(dev)
    suffix_out, suffix_lse = own_attention(
        q, torch.cat(own_k), torch.cat(own_v), cu_q, plan.cu_seqlens_own.to(dev), plan.max_q,
        plan.max_own, scale)
    pages = (plan.ws_blocks, bs, *k_ws.shape[1:])
    prefix_out, prefix_lse = closed_attention(
        q, k_ws.view(pages), v_ws.view(pages), cu_q, plan.closed_len.to(dev),
        plan.block_table.to(dev), plan.max_q, max(plan.max_closed, 1), scale)
    # segments in a request's first page have no closed keys: their prefix weighs nothing
    empty = torch.repeat_interleave(plan.closed_len == 0,
                                    plan.cu_seqlens_q.diff().to(torch.int64)).to(dev)
    prefix_lse[:, empty] = float("-inf")
    prefix_out[empty] = 0
    merge(out, prefix_out, prefix_lse, suffix_out, suffix_lse)
