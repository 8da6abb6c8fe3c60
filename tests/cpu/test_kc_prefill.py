"""Per-channel K mode's prefill plan (vllm_bitdecode.kc_prefill) against the reference.

Requests go through random schedules (chunks that end mid-page or fill several pages,
single tokens, requests left out of steps, shuffled rows and residual slots). Every step
runs both ``reference_kc.forward_step_kc`` and the two-part plan, whose attention
functions here are plain PyTorch stand-ins for FlashAttention's varlen calls (paged and
non-causal for the closed pages, causal from the bottom right for the own page), on a
float32 workspace so that the comparison is tight: a wrong segment, page, offset or
residual row shows as a large error, not as rounding.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.cpu.attention_stand_ins import merge_attn_states
from vllm_bitdecode import kc_prefill
from vllm_bitdecode import reference as ref
from vllm_bitdecode import reference_kc as kc
from vllm_bitdecode.page_format import PageFormat

KV_HEADS, GQA, D = 2, 4, 128
SCALE = D**-0.5


def _closed(q, k_pages, v_pages, cu_q, seqused_k, table, max_q, max_k, scale):
    assert scale == SCALE
    bs = k_pages.shape[1]
    outs, lses = [], []
    for j in range(seqused_k.shape[0]):
        qs = q[int(cu_q[j]) : int(cu_q[j + 1])]
        n = int(seqused_k[j])
        blocks = table[j, : n // bs].long()
        k = k_pages[blocks].flatten(0, 1)
        v = v_pages[blocks].flatten(0, 1)
        if n == 0:  # FlashAttention's empty rows: whatever they hold is overwritten
            outs.append(torch.full(qs.shape, 7.0))
            lses.append(torch.full((qs.shape[1], qs.shape[0]), 3.0))
            continue
        o, lse = ref.attention_lse(qs, k, v, SCALE, causal=False)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def _near(q, k_pages, v_pages, cu_q, seqused_k, table, max_q, max_k, scale):
    """Paged and causal, the last query aligned with the last key (FlashAttention's
    bottom-right causal mask when there are more keys than queries), pages read whole and
    the rows past ``seqused_k`` masked in the scores only, as FlashAttention-3 does."""
    assert scale == SCALE
    bs = k_pages.shape[1]
    outs, lses = [], []
    for j in range(seqused_k.shape[0]):
        qs = q[int(cu_q[j]) : int(cu_q[j + 1])]
        n = int(seqused_k[j])
        blocks = table[j, : -(-n // bs)].long()
        o, lse = ref.attention_lse(qs, k_pages[blocks].flatten(0, 1),
                                   v_pages[blocks].flatten(0, 1), SCALE, causal=True, num_keys=n)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def _workspace(cache, table, plan, layout, dtype):
    """What dequantize_pages_kc writes: every request's pages from a page boundary, then
    NaN scratch pages for run_kc_prefill to fill with the own rows."""
    bs = layout.block_size
    k_ws = torch.full((plan.pool_rows, KV_HEADS, D), float("nan"))
    v_ws = torch.full_like(k_ws, float("nan"))
    for i, r in enumerate(plan.rows):
        n = plan.seq_lens[i]
        k, v = kc.read_pages_kc(cache, table[r, : -(-n // bs)], layout, dtype)
        w = plan.ws_block_start[i] * bs
        k_ws[w : w + n], v_ws[w : w + n] = k[:n], v[:n]
    return k_ws, v_ws


@pytest.mark.parametrize("group_pages", [1, 2, None])  # None: 128 // block_size
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_part_prefill_matches_the_reference_over_random_schedules(dtype, block_size,
                                                                      group_pages):
    bs = block_size
    gen = torch.Generator().manual_seed(block_size + (dtype == torch.float16))
    rng = random.Random(block_size)
    layout = kc.KCPageLayout(PageFormat(D, 4, 64, bs))
    lengths = [3 * bs + 5, 2 * bs, bs // 2 + 1, 4 * bs - 1]
    slots_total = 6
    blocks = sum(-(-n // bs) for n in lengths) + 2
    perm = torch.randperm(blocks, generator=gen).tolist()
    table = torch.zeros(len(lengths), max(-(-n // bs) for n in lengths), dtype=torch.int32)
    reqs = []
    for i, n in enumerate(lengths):
        nb = -(-n // bs)
        table[i, :nb] = torch.tensor(perm[:nb], dtype=torch.int32)
        perm = perm[nb:]
        reqs.append(dict(i=i, n=n, done=0, slot=slots_total - 1 - i,
                         k=(torch.randn(n, KV_HEADS, D, generator=gen) * 2).to(dtype),
                         v=torch.randn(n, KV_HEADS, D, generator=gen).to(dtype)))
    cache = torch.randint(0, 256, (blocks, KV_HEADS, layout.head_region_bytes),
                          dtype=torch.uint8, generator=gen)
    residual = kc.new_residual(slots_total, KV_HEADS, layout, dtype)
    cache_ref, residual_ref = cache.clone(), residual.clone()
    worst, steps, segments = 0.0, 0, 0
    while any(r["done"] < r["n"] for r in reqs):
        work = [r for r in reqs if r["done"] < r["n"] and rng.random() > 0.2]
        if not work:
            continue
        rng.shuffle(work)
        sizes = [min(r["n"] - r["done"], rng.choice([1, 3, bs - 1, bs + 2, 2 * bs + 1]))
                 for r in work]
        keys, values, qs, slot_map, qsl, lens = [], [], [], [], [0], []
        for r, m in zip(work, sizes, strict=True):
            s, e = r["done"], r["done"] + m
            keys.append(r["k"][s:e])
            values.append(r["v"][s:e])
            qs.append(torch.randn(m, KV_HEADS * GQA, D, generator=gen).to(dtype))
            slot_map += [int(table[r["i"], p // bs]) * bs + p % bs for p in range(s, e)]
            qsl.append(qsl[-1] + m)
            lens.append(e)
        key, value, q = torch.cat(keys), torch.cat(values), torch.cat(qs)
        row_slot = torch.tensor([r["slot"] for r in work], dtype=torch.int32)
        step_table = table[[r["i"] for r in work]]
        args = (torch.tensor(slot_map), torch.tensor(qsl, dtype=torch.int32),
                torch.tensor(lens, dtype=torch.int32), row_slot)
        expected = kc.forward_step_kc(q, key, value, cache_ref, residual_ref, *args, step_table,
                                      SCALE, layout)

        plan = kc_prefill.plan_kc_prefill(qsl, lens, list(range(len(work))), bs, group_pages)
        own = kc_prefill.gather_own_kv(plan, residual, row_slot.tolist(), key, value)
        kc.write_tokens_kc(cache, residual, key, value, *args, layout)
        k_ws, v_ws = _workspace(cache, step_table, plan, layout, dtype)
        got = torch.full(q.shape, float("nan"))
        kc_prefill.run_kc_prefill(plan, q, [o.float() for o in own], k_ws, v_ws, SCALE, _closed,
                                  _near, merge_attn_states, got)
        err = float((got - expected).norm() / expected.norm())
        worst = max(worst, err)
        assert err < 1e-5, f"step {steps}: relative error {err:.2e}"
        assert torch.equal(cache, cache_ref)
        for r, m in zip(work, sizes, strict=True):
            r["done"] += m
        steps += 1
        segments += plan.num_segments
    assert steps >= 4 and segments > steps, (steps, segments)
    print(f"\n{steps} steps, {segments} segments, worst relative error {worst:.1e}")


def test_plan_cuts_queries_at_page_boundaries():
    # rows: a chunk from 13 to 40 at bs 16 (pages 0, 1, 2), a decode at 17, a chunk 0..16
    plan = kc_prefill.plan_kc_prefill([0, 27, 28, 44], [40, 18, 16], [0, 1, 2], 16,
                                      group_pages=1)
    assert plan.cu_seqlens_q.tolist() == [0, 3, 19, 27, 28, 44]
    assert plan.closed_len.tolist() == [0, 16, 32, 16, 0]
    assert plan.near_len.tolist() == [16, 16, 8, 2, 16]  # own keys only: groups of 1 page
    assert plan.ws_block_start == [0, 3, 5] and plan.ws_blocks == 6
    assert plan.block_table[2].tolist() == [0, 1] and plan.block_table[3].tolist()[:1] == [3]
    assert kc_prefill.workspace_starts(plan).tolist() == [0, 48, 80, 96]
    assert (plan.max_q, plan.max_closed, plan.max_near) == (16, 32, 16)
    assert plan.num_segments == 5


def test_plan_groups_pages_for_the_closed_part():
    # one request prefilling positions 0..39 at bs 16 (pages 0, 1, 2) in groups of 2 pages
    plan = kc_prefill.plan_kc_prefill([0, 40], [40], [0], 16, group_pages=2)
    assert plan.cu_seqlens_closed_q.tolist() == [0, 32, 40]  # pages 0-1, page 2
    assert plan.closed_len.tolist() == [0, 32]
    assert plan.block_table.tolist() == [[0, 0], [0, 1]]
    # near keys: page 0 its own 16 (scratch page 3); page 1 workspace page 0, then its own
    # 16 (scratch page 4); page 2 its own 8 (scratch page 5: its group starts at page 2)
    assert plan.near_len.tolist() == [16, 32, 8]
    assert plan.near_table.tolist() == [[3, 3], [0, 4], [5, 5]]
    assert plan.ws_rows == 48 and plan.own_total == 40 and plan.pool_rows == 96
    assert plan.scratch_rows.tolist() == (list(range(48, 64)) + list(range(64, 80))
                                          + list(range(80, 88)))
    assert plan.prefix_empty.tolist() == [True] * 32 + [False] * 8
    assert (plan.max_closed_q, plan.max_near, plan.num_groups) == (32, 32, 2)
    # the default: 128 // bs pages, one group here
    assert kc_prefill.plan_kc_prefill([0, 40], [40], [0], 16).num_groups == 1
