"""A scheduler step's inputs as vLLM lays them out, built from plain request records, for
the CPU tests that drive the references through schedules (``test_reference_kc.py``,
``test_reference_schedule_fuzz.py``)."""

from __future__ import annotations

from typing import Protocol

import torch


class SequenceData(Protocol):
    """One sequence's true Q, K and V, each ``[tokens, heads, head_size]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class ScheduledRequest(Protocol):
    """What a step needs of a request: its data, its pages, its residual slot and how many
    of its positions earlier steps computed."""

    seq: SequenceData
    blocks: list[int]  # page index -> block id
    slot: int  # residual slot
    done: int


def batch_lists(work: list[tuple[ScheduledRequest, int]], block_size: int, pad_rows: int,
                pad_slot: int) -> tuple[list, list, list, list[int], list[int], list[int],
                                        list[list[int]], list[int]]:
    """A step's inputs as lists: each row's new Q, K and V, the tokens' cache slots,
    query_start_loc, seq_lens, the block table (rows padded with block 0) and the rows'
    residual slots, then ``pad_rows`` CUDA-graph padding rows (no tokens, seq_len 0,
    residual slot ``pad_slot``). ``work``: (request, new tokens) in batch-row order."""
    bs = block_size
    qs, ks, vs, slots, qsl, lens, table, rslot = [], [], [], [], [0], [], [], []
    width = max(len(r.blocks) for r, _ in work)
    for req, m in work:
        s, e = req.done, req.done + m
        qs.append(req.seq.q[s:e])
        ks.append(req.seq.k[s:e])
        vs.append(req.seq.v[s:e])
        slots += [req.blocks[p // bs] * bs + p % bs for p in range(s, e)]
        qsl.append(qsl[-1] + m)
        lens.append(e)
        table.append(req.blocks + [0] * (width - len(req.blocks)))
        rslot.append(req.slot)
    for _ in range(pad_rows):  # CUDA-graph padding rows: no tokens, seq_len 0
        qsl.append(qsl[-1])
        lens.append(0)
        table.append([0] * width)
        rslot.append(pad_slot)
    return qs, ks, vs, slots, qsl, lens, table, rslot
