"""Checks of the sparse-decode reference in ``vllm_bitdecode.reference_sparse`` (issue #6).

It is the oracle of the future sparse kernels, so it is checked against computations
written out independently here: dense attention with a mask over the dequantized
sequence (not the per-token gather), planted high-score tokens, hand-made scores.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_bitdecode import reference as ref
from vllm_bitdecode import reference_sparse as rs
from vllm_bitdecode.config import SparseConfig
from vllm_bitdecode.page_format import PageFormat

HEAD = 128
DTYPE = torch.bfloat16
SCALE = HEAD**-0.5
KV_HEADS = 2
SEQ_LENS = (1, 37, 130, 77)  # odd lengths, partial last pages


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _batch(fmt, rotate_k, ratio, seed, seq_lens=SEQ_LENS, kv_heads=KV_HEADS, plant=None):
    """Writes sequences to permuted blocks (with unused blocks in between).

    plant(i, k) may edit sequence i's keys [n, kv_heads, D] (float32) before they are
    written. Returns q [rows, heads, D], cache, table, seq_lens, keys, values.
    """
    g = _gen(seed)
    bs = fmt.block_size
    nblocks = [math.ceil(n / bs) for n in seq_lens]
    ids = torch.randperm(sum(nblocks) + 5, generator=g)
    table = torch.full((len(seq_lens), max(max(nblocks), 1)), -1, dtype=torch.long)
    cache = torch.zeros(len(ids), kv_heads, fmt.head_region_bytes, dtype=torch.uint8)
    keys, values = [], []
    start = 0
    for i, n in enumerate(seq_lens):
        table[i, : nblocks[i]] = ids[start : start + nblocks[i]]
        start += nblocks[i]
        k = torch.randn(n, kv_heads, HEAD, generator=g)
        if plant is not None:
            plant(i, k)
        k = k.to(DTYPE)
        v = torch.randn(n, kv_heads, HEAD, generator=g).to(DTYPE)
        pos = torch.arange(n)
        ref.write_tokens(cache, k, v, table[i, pos // bs] * bs + pos % bs, fmt, rotate_k)
        keys.append(k)
        values.append(v)
    q = torch.randn(len(seq_lens), kv_heads * ratio, HEAD, generator=g).to(DTYPE)
    return q, cache, table, torch.tensor(seq_lens), keys, values


def _dense(q, cache, table, seq_lens, fmt, rotate_k):
    qsl = torch.arange(q.shape[0] + 1)
    return ref.paged_attention(q, cache, table, seq_lens, qsl, SCALE, fmt, rotate_k)


def _masked_reference(q_row, k, v, positions, fmt, rotate_k):
    """Attention of one decode query over the selected positions, written as dense
    float64 attention with -inf outside the selection (independent of the gather)."""
    qf = ref.rotate(q_row) if rotate_k else q_row.float()
    k = ref.rotate(k) if rotate_k else k
    kd = ref.dequantize(*ref.quantize(k, fmt, DTYPE), fmt).double()
    vd = ref.dequantize(*ref.quantize(v, fmt, DTYPE), fmt).double()
    hq, hk = q_row.shape[0], k.shape[1]
    rep = hq // hk
    out = torch.empty(hq, HEAD, dtype=torch.float64)
    for h in range(hq):
        sel = positions[h // rep if positions.shape[0] > 1 else 0].long()
        s = (kd[:, h // rep] @ qf[h].double()) * SCALE
        mask = torch.full_like(s, float("-inf"))
        mask[sel] = 0.0
        out[h] = torch.softmax(s + mask, dim=0) @ vd[:, h // rep]
    return out


# ---- k >= seq_len: sparse == dense ------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("rotate_k", [False, True])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize(("bits", "block_size"), [(4, 16), (2, 32)])
def test_full_budget_equals_dense(bits, block_size, ratio, rotate_k, shared):
    fmt = PageFormat(HEAD, bits, 64, block_size)
    q, cache, table, seq_lens, _, _ = _batch(fmt, rotate_k, ratio, seed=bits + ratio)
    sel = rs.select(
        q, cache, table, seq_lens, SCALE, fmt, rotate_k, token_budget=max(SEQ_LENS),
        shared=shared,
    )
    assert sel.counts.tolist() == list(SEQ_LENS)
    for i, n in enumerate(SEQ_LENS):
        heads = sel.positions.shape[1]
        assert torch.equal(sel.positions[i, :, :n], torch.arange(n).expand(heads, n))
        assert torch.all(sel.positions[i, :, n:] == -1)
    out = rs.sparse_attention(q, cache, table, seq_lens, sel, SCALE, fmt, rotate_k)
    torch.testing.assert_close(out, _dense(q, cache, table, seq_lens, fmt, rotate_k),
                               atol=2e-6, rtol=0)


# ---- k < seq_len: the gather == masked dense attention ----------------------------------
@pytest.mark.parametrize("how", rs.AGGREGATES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("rotate_k", [False, True])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("k", [1, 5, 16, 33])
def test_sparse_attention_matches_masked_dense(k, ratio, rotate_k, shared, how):
    fmt = PageFormat(HEAD, 4, 128, 16)
    q, cache, table, seq_lens, keys, values = _batch(fmt, rotate_k, ratio, seed=k * 7 + ratio)
    sel = rs.select(q, cache, table, seq_lens, SCALE, fmt, rotate_k, token_budget=k,
                    shared=shared, how=how)
    out = rs.sparse_attention(q, cache, table, seq_lens, sel, SCALE, fmt, rotate_k)
    for i, n in enumerate(SEQ_LENS):
        m = min(k, n)
        assert int(sel.counts[i]) == m
        pos = sel.positions[i, :, :m]
        assert pos.shape[0] == (1 if shared else KV_HEADS)
        assert torch.all(pos[:, -1] == n - 1)  # the newest token is always kept
        assert torch.all(pos[:, 1:] > pos[:, :-1])  # ascending, no repeats
        expected = _masked_reference(q[i], keys[i], values[i], pos, fmt, rotate_k)
        torch.testing.assert_close(out[i].double(), expected, atol=1e-5, rtol=0)
    if k < max(SEQ_LENS):  # not secretly dense
        assert not torch.allclose(out, _dense(q, cache, table, seq_lens, fmt, rotate_k), atol=1e-3)


# ---- selection picks what it should -----------------------------------------------------
PLANTED = {1: [3, 20, 31], 2: [0, 64, 100, 111, 128], 3: [10, 11, 50]}


def _plant_along_q(q_dirs, targets, strength=6.0):
    """A plant() that makes K at the target positions point along the query's direction,
    for the given KV heads, so their logits stand far above the rest."""

    def plant(i, k):
        for h, positions in targets(i).items():
            for p in positions:
                k[p, h] = q_dirs[i][h] * strength * math.sqrt(HEAD)

    return plant


@pytest.mark.parametrize("rotate_k", [False, True])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_top_k_finds_planted_tokens(ratio, rotate_k):
    g = _gen(5)
    fmt = PageFormat(HEAD, 4, 64, 16)
    rows = len(SEQ_LENS)
    # q of every head in the group along the same unit direction (plus noise): the group agrees
    dirs = torch.nn.functional.normalize(torch.randn(rows, KV_HEADS, HEAD, generator=g), dim=-1)
    plant = _plant_along_q(dirs, lambda i: {h: PLANTED.get(i, []) for h in range(KV_HEADS)})
    q, cache, table, seq_lens, _, _ = _batch(fmt, rotate_k, ratio, seed=9, plant=plant)
    q = (dirs.repeat_interleave(ratio, dim=1) * 8 + 0.3 * q.float()).to(DTYPE)
    for i, planted in PLANTED.items():
        k = len(planted) + 1
        sel = rs.select(q, cache, table, seq_lens, SCALE, fmt, rotate_k, token_budget=k)
        for h in range(KV_HEADS):
            got = sel.positions[i, h, :k].tolist()
            assert got == sorted({*planted, SEQ_LENS[i] - 1}), (i, h, got)


@pytest.mark.parametrize("rotate_k", [False, True])
def test_group_keeps_a_position_any_one_query_head_ranks_first(rotate_k):
    """GQA 4: query head 0 alone points at positions A (logit ~12), heads 1-3 together at
    B (logit ~8 each). TidalDecode's per-head rule would keep A for head 0, so the max
    over the group must keep A; a mean or sum over the heads would prefer B."""
    fmt = PageFormat(HEAD, 4, 128, 16)
    n = 100
    a, b = [5, 33, 70], [12, 48, 81]
    basis, _ = torch.linalg.qr(torch.randn(HEAD, 2, generator=_gen(21)))
    d0, d1 = basis[:, 0], basis[:, 1]
    c = 4.0  # query norm; logit = c * |k| * SCALE

    def plant(i, k):
        for p in a:
            k[p, 0] = d0 * 12 / (c * SCALE)
        for p in b:
            k[p, 0] = d1 * 8 / (c * SCALE)

    q, cache, table, sl, _, _ = _batch(fmt, rotate_k, 4, seed=22, seq_lens=(n,), kv_heads=1,
                                       plant=plant)
    q = torch.stack([d0 * c] + [d1 * c] * 3)[None].to(DTYPE)
    sel = rs.select(q, cache, table, sl, SCALE, fmt, rotate_k, token_budget=4)
    assert sel.positions[0, 0].tolist() == [*a, n - 1]
    # sanity: the mean over the group ranks B first
    kk, _ = ref.read_blocks(cache, table[0, :7], n, fmt, DTYPE)
    lg = rs.logits(ref.rotate(q[0]) if rotate_k else q[0].float(), kk, SCALE)
    assert set(torch.topk(lg.mean(0)[: n - 1], 3).indices.tolist()) == set(b)


def test_per_head_and_shared_selection_differ_when_heads_disagree():
    """KV head 0's queries point at positions A, head 1's at B: per-head selection keeps
    each head's own; a shared set must be one set for both heads, so it cannot."""
    g = _gen(6)
    fmt = PageFormat(HEAD, 4, 128, 16)
    n = 130
    a, b = [7, 40, 90], [15, 66, 101]
    dirs = torch.nn.functional.normalize(torch.randn(1, KV_HEADS, HEAD, generator=g), dim=-1)
    plant = _plant_along_q(dirs, lambda i: {0: a, 1: b})
    q, cache, table, seq_lens, _, _ = _batch(fmt, True, 4, seed=4, seq_lens=(n,), plant=plant)
    q = (dirs.repeat_interleave(4, dim=1) * 8 + 0.3 * q.float()).to(DTYPE)
    k = 4
    per_head = rs.select(q, cache, table, seq_lens, SCALE, fmt, True, token_budget=k)
    shared = rs.select(q, cache, table, seq_lens, SCALE, fmt, True, token_budget=k, shared=True)
    assert per_head.positions[0, 0].tolist() == [*a, n - 1]
    assert per_head.positions[0, 1].tolist() == [*b, n - 1]
    assert shared.positions.shape[1] == 1
    got = set(shared.positions[0, 0].tolist())
    assert n - 1 in got and got < {*a, *b, n - 1}
    # and attention differs accordingly
    out_h = rs.sparse_attention(q, cache, table, seq_lens, per_head, SCALE, fmt, True)
    out_s = rs.sparse_attention(q, cache, table, seq_lens, shared, SCALE, fmt, True)
    assert not torch.allclose(out_h, out_s, atol=1e-3)


def test_newest_token_kept_even_with_the_lowest_score():
    fmt = PageFormat(HEAD, 4, 128, 16)
    n = 40
    dirs = torch.nn.functional.normalize(torch.randn(1, 1, HEAD, generator=_gen(1)), dim=-1)

    def plant(i, k):
        k[n - 1, 0] = -dirs[0, 0] * 10 * math.sqrt(HEAD)  # newest: the very lowest logit

    q, cache, table, seq_lens, _, _ = _batch(fmt, False, 1, seed=2, seq_lens=(n,),
                                             kv_heads=1, plant=plant)
    q = (dirs * 8).to(DTYPE)
    kk, _ = ref.read_blocks(cache, table[0, :3], n, fmt, DTYPE)
    scores = rs.logits(q[0].float(), kk, SCALE)
    assert int(scores[0].argmin()) == n - 1
    sel = rs.select(q, cache, table, seq_lens, SCALE, fmt, False, token_budget=6)
    expected = torch.topk(scores[0, : n - 1], 5).indices.sort().values.tolist() + [n - 1]
    assert sel.positions[0, 0, :6].tolist() == expected


# ---- top_k_positions on hand-made scores ------------------------------------------------
@pytest.mark.parametrize(
    ("scores", "k", "expected"),
    [
        ([[0.0, 5.0, 1.0, 4.0, -1.0]], 3, [[1, 3, 4]]),  # the newest (4) always, then 1, 3
        ([[0.0, 5.0, 1.0, 4.0, -1.0]], 1, [[4]]),
        ([[0.0, 5.0, 1.0, 4.0, -1.0]], 99, [[0, 1, 2, 3, 4]]),  # k clipped to n
        ([[2.0, 2.0, 2.0, 2.0, 2.0]], 3, [[0, 1, 4]]),  # ties: lower position first
        ([[9.0, 1.0, 1.0], [1.0, 9.0, 1.0]], 2, [[0, 2], [1, 2]]),  # per row
        ([[3.0]], 4, [[0]]),
    ],
)
def test_top_k_positions(scores, k, expected):
    got = rs.top_k_positions(torch.tensor(scores), k)
    assert got.tolist() == expected


@pytest.mark.parametrize("k", [0, -3, 2.0, True])
def test_bad_budget_raises(k):
    with pytest.raises(ValueError, match="budget"):
        rs.top_k_positions(torch.zeros(1, 4), k)


def test_max_logit_is_tidaldecode_per_head_rule_without_gqa():
    """With one query head per KV head, the selection is TidalDecode's: per head, the
    top-(k-1) logits among the older tokens plus the newest."""
    fmt = PageFormat(HEAD, 4, 128, 16)
    q, cache, table, seq_lens, _, _ = _batch(fmt, True, 1, seed=12, seq_lens=(130,))
    k = 20
    sel = rs.select(q, cache, table, seq_lens, SCALE, fmt, True, token_budget=k)
    kk, _ = ref.read_blocks(cache, table[0, :9], 130, fmt, DTYPE)
    lg = rs.logits(rs._selection_query(q[0], True), kk, SCALE)  # rotated, rounded
    for h in range(KV_HEADS):
        top = torch.topk(lg[h, :129], k - 1).indices.sort().values.tolist()
        assert sel.positions[0, h].tolist() == [*top, 129]


@pytest.mark.parametrize(
    ("how", "shared", "expected"),
    [
        # heads 0,1 form KV head 0; heads 2,3 KV head 1
        ("max_logit", False, [[3.0, 2.0, 1.0], [0.0, 4.0, 0.0]]),
        ("max_logit", True, [[3.0, 4.0, 1.0]]),
    ],
)
def test_aggregate_max(how, shared, expected):
    lg = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 4.0, 0.0], [-1.0, -1.0, -1.0]])
    assert rs.aggregate(lg, 2, shared, how).tolist() == expected


def test_aggregate_prob_sum_is_scale_free_per_head():
    """prob_sum normalizes each head first: a head with huge logits does not dominate."""
    lg = torch.tensor([[100.0, 0.0, 0.0], [0.0, 1.0, 1.2]])
    probs = rs.aggregate(lg, 1, False, "prob_sum")[0]
    torch.testing.assert_close(probs.sum(), torch.tensor(2.0))
    mx = rs.aggregate(lg, 1, False, "max_logit")[0]
    assert int(mx.argmax()) == 0 and probs[0] > 0.99
    with pytest.raises(ValueError, match="aggregate"):
        rs.aggregate(lg, 1, False, "mean")


# ---- dense fallback, padding rows, buffer reuse -----------------------------------------
def test_short_rows_fall_back_to_dense_and_padding_rows_are_zero():
    fmt = PageFormat(HEAD, 4, 64, 16)
    seq_lens = (130, 37, 0, 77)  # row 2: CUDA-graph padding (seq_len 0)
    q, cache, table, sl, keys, values = _batch(fmt, True, 4, seed=3, seq_lens=seq_lens)
    sel = rs.select(q, cache, table, sl, SCALE, fmt, True, token_budget=16, min_seq_len=64)
    assert sel.counts.tolist() == [16, rs.DENSE_ROW, 0, 16]
    assert torch.all(sel.positions[1:3] == -1)
    out = rs.sparse_attention(q, cache, table, sl, sel, SCALE, fmt, True)
    dense = _dense(q[1:2], cache, table[1:2], sl[1:2], fmt, True)
    torch.testing.assert_close(out[1:2], dense, atol=0, rtol=0)
    assert torch.all(out[2] == 0)
    for i in (0, 3):
        expected = _masked_reference(q[i], keys[i], values[i], sel.positions[i], fmt, True)
        torch.testing.assert_close(out[i].double(), expected, atol=1e-5, rtol=0)


def test_selection_rewrites_every_row_of_a_reused_buffer():
    """A buffer left over from other requests (garbage everywhere, more rows than the
    batch) is fully rewritten: no slot keeps an earlier request's positions."""
    fmt = PageFormat(HEAD, 4, 64, 16)
    q, cache, table, sl, _, _ = _batch(fmt, False, 4, seed=8)
    k = 24
    buf = rs.Selection.allocate(8, KV_HEADS, k)
    buf.positions.fill_(12345)
    buf.counts.fill_(777)
    sel = rs.select(q, cache, table, sl, SCALE, fmt, False, token_budget=k, out=buf)
    assert sel is buf
    fresh = rs.select(q, cache, table, sl, SCALE, fmt, False, token_budget=k)
    rows = len(SEQ_LENS)
    assert torch.equal(buf.positions[:rows], fresh.positions)
    assert torch.equal(buf.counts[:rows], fresh.counts)
    assert torch.all(buf.positions[rows:] == -1) and torch.all(buf.counts[rows:] == 0)
    with pytest.raises(ValueError, match="buffer"):
        rs.select(q, cache, table, sl, SCALE, fmt, False, token_budget=k + 1, out=buf)


# ---- a whole decode step over a layer plan ----------------------------------------------
def _layer_cache(fmt, table, seq_lens, num_blocks, seed):
    """One layer's cache: fresh random K/V written through the shared block table."""
    g = _gen(seed)
    cache = torch.zeros(num_blocks, KV_HEADS, fmt.head_region_bytes, dtype=torch.uint8)
    bs = fmt.block_size
    for i, n in enumerate(seq_lens):
        pos = torch.arange(n)
        k = torch.randn(n, KV_HEADS, HEAD, generator=g).to(DTYPE)
        v = torch.randn(n, KV_HEADS, HEAD, generator=g).to(DTYPE)
        ref.write_tokens(cache, k, v, table[i, pos // bs] * bs + pos % bs, fmt, True)
    return cache


def test_decode_step_roles_and_no_leak_between_steps():
    fmt = PageFormat(HEAD, 4, 64, 16)
    plan = SparseConfig(enabled=True, selection_layers=[2, 4]).layer_plan(6)
    assert (plan.dense, plan.selection, plan.reuse) == ((0, 1), (2, 4), (3, 5))
    seq_lens = (130, 37, 77)
    q, cache, table, sl, _, _ = _batch(fmt, True, 4, seed=40, seq_lens=seq_lens)
    # one block table for every layer, as in vLLM; a cache and a query per layer
    caches = [_layer_cache(fmt, table, seq_lens, cache.shape[0], 100 + i) for i in range(6)]
    qs = [torch.randn(q.shape, generator=_gen(200 + i)).to(DTYPE) for i in range(6)]
    kw = dict(token_budget=16, min_seq_len=64)
    outs = rs.decode_step(plan, qs, caches, table, sl, SCALE, fmt, True, **kw)
    for layer in (0, 1, 2, 4):  # dense and selection layers attend to everything
        dense = _dense(qs[layer], caches[layer], table, sl, fmt, True)
        torch.testing.assert_close(outs[layer], dense, atol=0, rtol=0)
    for layer, source in ((3, 2), (5, 4)):  # a reuse layer reads the last selection
        sel = rs.select(qs[source], caches[source], table, sl, SCALE, fmt, True, **kw)
        expected = rs.sparse_attention(qs[layer], caches[layer], table, sl, sel, SCALE, fmt, True)
        torch.testing.assert_close(outs[layer], expected, atol=0, rtol=0)
        dense = _dense(qs[layer], caches[layer], table, sl, fmt, True)
        assert not torch.allclose(outs[layer][0], dense[0], atol=1e-3)  # row 0 is sparse
    # the two selection layers chose differently, so layer 5 did not read layer 2's choice
    sel2 = rs.select(qs[2], caches[2], table, sl, SCALE, fmt, True, **kw)
    sel4 = rs.select(qs[4], caches[4], table, sl, SCALE, fmt, True, **kw)
    assert not torch.equal(sel2.positions, sel4.positions)
    # row 1 (37 tokens < min_seq_len 64) decodes densely in every layer
    for layer in range(6):
        dense = _dense(qs[layer][1:2], caches[layer], table[1:2], sl[1:2], fmt, True)
        torch.testing.assert_close(outs[layer][1:2], dense, atol=0, rtol=0)

    # the next step puts other requests in the rows and adds a padding row; one buffer
    # serves both steps and gives what a fresh buffer gives
    buf = rs.Selection.allocate(4, KV_HEADS, 16)
    rs.decode_step(plan, qs, caches, table, sl, SCALE, fmt, True, buffer=buf, **kw)
    perm = torch.tensor([2, 0, 1])
    step2 = [torch.cat((x[perm], x[:1])) for x in qs]
    table2 = torch.cat((table[perm], table[:1]))
    sl2 = torch.cat((sl[perm], torch.zeros(1, dtype=sl.dtype)))
    got = rs.decode_step(plan, step2, caches, table2, sl2, SCALE, fmt, True, buffer=buf, **kw)
    fresh = rs.decode_step(plan, step2, caches, table2, sl2, SCALE, fmt, True, **kw)
    for layer in range(6):
        torch.testing.assert_close(got[layer], fresh[layer], atol=0, rtol=0)
        torch.testing.assert_close(got[layer][:3], outs[layer][perm], atol=0, rtol=0)
        if plan.role(layer) == "reuse":
            assert torch.all(got[layer][3] == 0)  # the padding row reads nothing


def test_decode_step_rejects_reuse_before_selection():
    from vllm_bitdecode.config import SparseLayerPlan

    plan = SparseLayerPlan(3, dense=(0,), selection=(2,), reuse=(1,))
    fmt = PageFormat(HEAD, 4, 64, 16)
    q, cache, table, sl, _, _ = _batch(fmt, False, 1, seed=1, seq_lens=(20,))
    with pytest.raises(ValueError, match="before any selection"):
        rs.decode_step(plan, [q] * 3, [cache] * 3, table, sl, SCALE, fmt, False, token_budget=4)


def test_rejects_float32_query():
    fmt = PageFormat(HEAD, 4, 64, 16)
    q, cache, table, sl, _, _ = _batch(fmt, False, 1, seed=1, seq_lens=(20,))
    with pytest.raises(TypeError, match="model dtype"):
        rs.select(q.float(), cache, table, sl, SCALE, fmt, False, token_budget=4)


# ---- page granularity ---------------------------------------------------------------------
@pytest.mark.parametrize(("n", "k"), [(1, 3), (16, 1), (17, 2), (70, 3), (70, 10), (128, 4)])
def test_top_k_pages_keeps_the_own_page_and_the_best_older_pages(n, k):
    bs = 16
    scores = torch.randn(2, n, generator=_gen(n + k))
    got = rs.top_k_pages(scores, k, bs)
    own = (n - 1) // bs
    for h in range(2):
        best = [max(scores[h, p * bs:(p + 1) * bs].tolist()) for p in range(own)]
        order = sorted(range(own), key=lambda p: (-best[p], p))[: min(k, own + 1) - 1]
        assert got[h].tolist() == sorted(order) + [own]


def test_top_k_pages_ties_go_to_the_lower_page():
    scores = torch.zeros(1, 64)  # four pages of equal score
    assert rs.top_k_pages(scores, 3, 16).tolist() == [[0, 1, 3]]
    with pytest.raises(ValueError, match="page budget k must be an integer > 0"):
        rs.top_k_pages(scores, 0, 16)


@pytest.mark.parametrize("shared", [False, True])
def test_page_selection_expands_to_the_tokens_of_its_pages(shared):
    fmt = PageFormat(HEAD, 4, 128, 16)
    lens = (1, 37, 130, 77)
    q, cache, table, seq_lens, _, _ = _batch(fmt, True, 4, seed=31, seq_lens=lens)
    pages = rs.select_pages(q, cache, table, seq_lens, SCALE, fmt, True, page_budget=3,
                            min_seq_len=20, shared=shared)
    assert pages.counts.tolist() == [rs.DENSE_ROW, 3, 3, 3]
    tokens = rs.pages_to_positions(pages, seq_lens, 16)
    for i, n in enumerate(lens[1:], start=1):
        own = (n - 1) // 16
        count = 2 * 16 + n - own * 16
        assert int(tokens.counts[i]) == count
        for h in range(pages.positions.shape[1]):
            want = [t for p in pages.positions[i, h, :3].tolist() for t in range(16 * p,
                                                                                 16 * p + 16)
                    if t < n]
            assert tokens.positions[i, h, :count].tolist() == want
            assert (tokens.positions[i, h, count:] == -1).all()
    assert (tokens.positions[0] == -1).all() and int(tokens.counts[0]) == rs.DENSE_ROW


@pytest.mark.parametrize("block_size", [16, 64])
def test_a_page_budget_over_every_page_equals_dense(block_size):
    """Pages are 16 tokens at every block size (one tile of the page format)."""
    fmt = PageFormat(HEAD, 4, 128, block_size)
    q, cache, table, seq_lens, _, _ = _batch(fmt, True, 4, seed=32)
    pages = rs.select_pages(q, cache, table, seq_lens, SCALE, fmt, True, page_budget=9)
    n_max = int(seq_lens.max())
    assert int(pages.counts.max()) == min(9, (n_max + 15) // 16)
    tokens = rs.pages_to_positions(pages, seq_lens, 16)
    got = rs.sparse_attention(q, cache, table, seq_lens, tokens, SCALE, fmt, True)
    torch.testing.assert_close(got, _dense(q, cache, table, seq_lens, fmt, True), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_cache_tiles_name_each_selected_page_in_its_block(block_size):
    """A selected 16-token page's place in the cache: its tile in the block that the
    row's block table maps it to; -1 past the count and for DENSE_ROW and padding rows."""
    per_block = block_size // 16
    table = torch.tensor([[7, 2, 9, 4], [3, 0, 5, 1], [6, 8, 10, 11]], dtype=torch.int32)
    pages = rs.Selection(torch.full((3, 2, 5), -1, dtype=torch.int32),
                         torch.tensor([3, rs.DENSE_ROW, 0], dtype=torch.int32))
    last = 4 * per_block - 1  # the row's last page
    pages.positions[0, 0, :3] = torch.tensor([0, per_block, last])
    pages.positions[0, 1, :3] = torch.tensor([1 % per_block, 2 * per_block + 1 % per_block, last])
    got = rs.cache_tiles(pages, table, block_size)
    for h in range(2):
        for j in range(3):
            page = int(pages.positions[0, h, j])
            block = int(table[0, page // per_block])
            assert int(got[0, h, j]) == block * per_block + page % per_block
    assert (got[0, :, 3:] == -1).all() and (got[1:] == -1).all()
    assert int(got[0, 0, 2]) == 4 * per_block + per_block - 1  # block 4's last tile


def test_cache_tiles_refuse_a_block_size_not_of_whole_pages():
    pages = rs.Selection(torch.zeros(1, 1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="not a multiple of 16"):
        rs.cache_tiles(pages, torch.zeros(1, 1, dtype=torch.int32), 24)
