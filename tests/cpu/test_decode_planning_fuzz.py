"""Seeded randomized tests of the host-side decode planning, against brute force.

Random decode steps (requests of 1 + drafts query tokens; lengths of 1, a page, a page
+- 1, around the sparse threshold; CUDA-graph padding requests of no tokens and length
0; prefills after the decodes) go through ``BitDecodeMetadataBuilder.build`` made without
vLLM (as in test_decode_rows.py / test_sparse_workspace.py), at random SM counts, heads,
budgets and score-workspace sizes. Each row's length and block-table row, the split
plans as the decode kernel cuts them into tiles, and sparse mode's key offsets and the
kernels' rule for which rows get keys are checked against loops written out here; the
sparse reference's top-k helpers against sorting by hand.

Module functions are called through their modules (``bm.X``, ``rs.X``) so that a fault
monkeypatched into one reaches both the builder and these checks.
"""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch

from vllm_bitdecode import reference_sparse as rs
from vllm_bitdecode.backend import metadata as bm
from vllm_bitdecode.config import BitDecodeConfig, BitDecodeConfigError

D = 128
TILE = 16  # kTileTokens: a selected page, and the unit the split plans cut
WARPS = 4  # kDecodeWarps: a split's tiles go round-robin to its warps


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _has_keys(n: int, row0: int, min_seq_len: int, capacity: int) -> bool:
    """selection.cuh's selection_row_has_keys, written out."""
    return n >= 1 and n >= min_seq_len and row0 >= 0 and row0 + n <= capacity


def _kernel_tiles(num_tiles: int, split: int, num_splits: int, min_tiles: int) -> list[int]:
    """The tiles one split of a row reads, warp by warp (decode_kernel.cuh)."""
    per_split = max(_ceil(num_tiles, num_splits), min_tiles)
    begin, end = split * per_split, min(split * per_split + per_split, num_tiles)
    if begin >= end:
        return []
    tiles = []
    for warp in range(WARPS):
        first = begin + warp
        n_local = _ceil(end - first, WARPS) if first < end else 0
        tiles += [first + WARPS * i for i in range(n_local)]
    return tiles


def _seq_len(rng: random.Random, qlen: int, threshold: int, max_len: int) -> int:
    """A request's length, the edges drawn often: its own tokens only (first row 1
    long), a page and a page +- 1, the sparse threshold +- 1, max_model_len."""
    page = TILE * rng.randint(1, 4)
    n = rng.choice([qlen, 1, page - 1, page, page + 1, threshold - 1, threshold,
                    threshold + 1, max_len, rng.randint(1, max_len)])
    return min(max(n, qlen), max_len)


# ---- decode rows -------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_decode_rows_stop_at_their_own_token(seed):
    rng = random.Random(seed)
    counts = [rng.choice([0, 1, 1, 2, 3, 5]) for _ in range(rng.randint(0, 20))]
    start = rng.choice([0, 0, rng.randint(1, 9)])  # a slice of a longer batch
    qsl = np.concatenate([[start], start + np.cumsum(counts, dtype=np.int64)])
    nd = rng.randint(0, len(counts))
    arg = qsl.astype(np.int32) if rng.random() < 0.5 else qsl.tolist()
    request, after = bm.decode_rows(arg, nd)
    assert request.dtype == after.dtype == np.int32
    want = [(r, int(qsl[r + 1]) - 1 - t) for r in range(nd)
            for t in range(int(qsl[r]), int(qsl[r + 1]))]
    assert list(zip(request.tolist(), after.tolist(), strict=True)) == want
    lens = [rng.randint(counts[r], 99) for r in range(nd)]
    for r in range(nd):  # lengths 1 + n - count ... n: the newest row is the request's
        got = [lens[r] - a for q, a in want if q == r]
        assert got == list(range(lens[r] - counts[r] + 1, lens[r] + 1))


@pytest.mark.parametrize("seed", range(20))
def test_start_up_checks_and_packing(seed):
    rng = random.Random(seed)
    seqs, per = rng.randint(1, 40000), rng.randint(1, 8)
    rows = min(seqs * per, rng.randint(1, 200000))
    if rows > bm.MAX_DECODE_ROWS:
        with pytest.raises(BitDecodeConfigError):
            bm.check_decode_rows(rows, seqs, per)
    else:
        bm.check_decode_rows(rows, seqs, per)
    sparse, gqa = rng.random() < 0.3, rng.choice([1, 2, 4, 5, 8, 16])
    cfg = _config(sparse, rng.choice(["page", "token"]), 64, None)
    packed = bm.packs_query_tokens(per, gqa, cfg)
    # the kernel's rows hold gqa x query tokens (ops.cpp, kMaxGqaRows)
    assert packed == (per > 1 and not sparse and gqa * per <= bm.MAX_QUERY_ROWS)


# ---- split plans -------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(30))
def test_split_plans_cover_every_tile_once(seed):
    rng = random.Random(seed)
    sms, ctas = rng.choice([1, 8, 78, 114, 132]), rng.randint(1, 8)
    kv_heads, budget = rng.choice([1, 2, 4, 8]), TILE * rng.randint(1, 300)
    for _ in range(40):
        rows = rng.choice([0, 1, 2, rng.randint(1, 64), rng.randint(1, 5000)])
        dense = bm.plan_num_splits(rows, kv_heads, sms, ctas)
        assert 1 <= dense <= bm.MAX_SPLITS
        if dense > 1:  # one wave, and one split more would not fit it
            assert dense * rows * kv_heads <= sms * ctas
        if dense < bm.MAX_SPLITS and rows > 0:
            assert (dense + 1) * rows * kv_heads > sms * ctas
        reuse = bm.plan_reuse_splits(rows, kv_heads, sms, budget, dense)
        assert 1 <= reuse <= dense
        if reuse > 1:  # (the tiles per split: test_reuse_splits_keep_min_tiles below)
            assert reuse <= _ceil(_ceil(budget, TILE), bm.MIN_TILES_PER_SPLIT)
            assert reuse * rows * kv_heads <= 2 * sms
        # a row of the dense plan, and a reuse row over at most the budget's tiles
        for splits, tiles in ((dense, rng.randint(0, 600)),
                              (reuse, rng.randint(0, _ceil(budget, TILE)))):
            seen = [t for s in range(splits)
                    for t in _kernel_tiles(tiles, s, splits, bm.MIN_TILES_PER_SPLIT)]
            assert sorted(seen) == list(range(tiles))


# ---- score workspace ---------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_score_keys_offsets_and_rows_past_the_workspace(seed):
    rng = random.Random(seed)
    unit, min_len = rng.choice([1, TILE]), rng.choice([1, 2, 16, 17, rng.randint(1, 400)])
    lens = [rng.choice([0, 1, 15, 16, 17, min_len - 1, min_len, rng.randint(0, 500)])
            for _ in range(rng.randint(1, 40))]
    lens = [max(n, 0) for n in lens]
    total = sum(_ceil(n, unit) for n in lens)
    capacity = rng.choice([0, 1, rng.randint(0, total + 500), total + max(lens)])
    t = torch.tensor(lens, dtype=torch.int32)
    out = torch.full((len(lens) + 3,), -5, dtype=torch.int64)
    offsets = bm.score_key_offsets(t, unit, out=out[: len(lens)])
    want = np.concatenate([[0], np.cumsum([_ceil(n, unit) for n in lens])[:-1]]).tolist()
    assert offsets.tolist() == want and out[: len(lens)].tolist() == want
    assert out[len(lens):].tolist() == [-5] * 3  # only the step's rows are written
    fits = bm.rows_with_score_keys(t, offsets, min_len, capacity).tolist()
    assert fits == [_has_keys(n, o, min_len, capacity) for n, o in zip(lens, want, strict=True)]
    for n, o, f in zip(lens, want, fits, strict=True):
        if f:  # a row with keys keeps them inside the workspace
            assert o + _ceil(n, unit) <= capacity
    eligible = sum(n >= 1 and n >= min_len for n in lens)
    dense = sum(n >= 1 and n >= min_len and not f for n, f in zip(lens, fits, strict=True))
    assert bm.rows_past_score_workspace(t, unit, min_len, capacity) == (eligible, dense)
    # random offsets, negative ones included: the rule itself
    rand = torch.tensor([rng.randint(-3, capacity + 3) for _ in lens])
    assert bm.rows_with_score_keys(t, rand, min_len, capacity).tolist() == [
        _has_keys(n, int(o), min_len, capacity) for n, o in zip(lens, rand, strict=True)]


@pytest.mark.parametrize("seed", range(60))
def test_workspace_holds_every_row_it_promises(seed):
    """score_workspace_keys: ``max_rows`` rows of at most ``max_model_len`` whose requests
    hold distinct pages of a cache of ``kv_tokens``, at most ``rows_per_request`` rows
    each, all get keys by the kernels' rule (unless MAX_SCORE_KEYS caps it)."""
    rng = random.Random(seed)
    max_rows, max_len = rng.randint(1, 64), rng.choice([1, 16, 17, rng.randint(1, 5000)])
    unit, rpr, bs = rng.choice([1, TILE]), rng.randint(1, 5), rng.choice([16, 32, 64])
    blocks = rng.choice([0, rng.randint(1, 40), rng.randint(1, 4000)])
    capacity = bm.score_workspace_keys(max_rows, max_len, unit, rpr, blocks * bs)
    assert capacity <= bm.MAX_SCORE_KEYS
    rows: list[int] = []
    free = blocks if blocks else None
    while len(rows) < max_rows:
        n = rng.choice([max_len, max_len, rng.randint(1, max_len)])
        q = min(rng.randint(1, rpr), n, max_rows - len(rows))
        if free is not None:
            if free < 1:
                break
            n = min(n, free * bs)  # fill the cache to the last page
            free -= _ceil(n, bs)
            q = min(q, n)
        rows += [n - a for a in range(q - 1, -1, -1)]
    offset = 0
    for n in rows:
        assert _has_keys(n, offset, 1, capacity), (rows, capacity)
        offset += _ceil(n, unit)


# ---- the builder -------------------------------------------------------------------
def _config(sparse: bool, granularity: str, budget: int, min_seq_len: int | None
            ) -> BitDecodeConfig:
    section = {"enabled": True, "token_budget": budget, "granularity": granularity,
               "min_seq_len": min_seq_len} if sparse else {"enabled": False}
    return BitDecodeConfig.from_additional_config({"bitdecode": {"bits": 4,
                                                                 "sparse": section}})


def _builder(rng: random.Random, sparse: bool, drafts: int, block: int, max_len: int,
             max_seqs: int, mnbt: int, kv_blocks: int | None
             ) -> tuple[bm.BitDecodeMetadataBuilder, int, int]:
    """A builder made as its constructor makes it, without vLLM; (builder, max_rows,
    the split workspace's rows as the constructor sizes them)."""
    # within what check_vllm_config lets through: a budget and a threshold that fit
    budget = TILE * rng.randint(1, max(1, min(20, max_len // TILE)))
    min_len = rng.choice([1, budget, rng.randint(1, max_len)]
                         + ([None] if 2 * budget <= max_len else []))
    cfg = _config(sparse, rng.choice(["page", "token"]), budget, min_len)
    gqa = rng.choice([1, 2, 4, 8])
    b = bm.BitDecodeMetadataBuilder.__new__(bm.BitDecodeMetadataBuilder)
    b.bitdecode, b.device, b.head_size = cfg, torch.device("cpu"), D
    b.num_kv_heads = rng.choice([1, 2, 8])
    b.num_sms, b.ctas_per_sm = rng.choice([8, 78, 132]), rng.randint(1, 6)
    b.kv_cache_spec = types.SimpleNamespace(block_size=block)
    b.reorder_batch_threshold = 1 + drafts
    b.pack_queries = bm.packs_query_tokens(1 + drafts, gqa, cfg) and rng.random() < 0.7
    b.page_format, b.rotation_signs = cfg.page_format(D, block), None
    b.partial_out = b.partial_lse = torch.zeros(1)
    b.row_slots = None
    b.prefill_workspace_rows = bm.prefill_workspace_rows(False, max_len, mnbt, block)
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(max_model_len=max_len,
                                           get_total_num_hidden_layers=lambda: 32),
        scheduler_config=types.SimpleNamespace(max_num_seqs=max_seqs,
                                               max_num_batched_tokens=mnbt),
        cache_config=types.SimpleNamespace(num_gpu_blocks=kv_blocks))
    max_rows = b._init_decode_rows(vllm_config, max_seqs, b.device)
    b.sparse = b._init_sparse(vllm_config, max_rows, b.device)
    b.reset_persistent_buffers()
    for buf in (b._row_seq_lens, b._row_block_table):  # what earlier steps left
        if buf is not None:
            buf.fill_(-7)
    split_rows = max(r * b._num_splits(r) for r in range(1, max_rows + 1))
    return b, max_rows, split_rows * (1 + drafts if b.pack_queries else 1)


def _step(rng: random.Random, b: bm.BitDecodeMetadataBuilder, max_rows: int,
          max_seqs: int, mnbt: int, max_len: int) -> tuple[types.SimpleNamespace, int]:
    """vLLM's metadata of a random step: decodes, then prefills or a CUDA-graph batch's
    padding (requests of no tokens and length 0, tokens up to a captured size); and
    the number of decode requests with tokens."""
    per = b.reorder_batch_threshold
    threshold = b.sparse.min_seq_len if b.sparse is not None else 2 * TILE
    tokens_cap = min(mnbt, max_rows)  # the decode tokens a step can have
    qlens: list[int] = []
    for _ in range(rng.randint(0, max_seqs)):
        q = rng.choice([1, per, rng.randint(1, per)])
        if sum(qlens) + q > tokens_cap:
            break
        qlens.append(q)
    lens = [_seq_len(rng, q, threshold, max_len) for q in qlens]
    real = len(qlens)
    num_tokens = sum(qlens)
    free = max_seqs - real
    if rng.random() < 0.4 and free > 0 and real > 0:  # a graph batch's padding
        pad = rng.randint(1, free)
        qlens += [0] * pad
        lens += [0] * pad
        # decodes of one token pad to a request per token (vLLM's uniform batch)
        num_tokens = (len(qlens) if per == 1
                      else rng.randint(num_tokens, max(num_tokens, tokens_cap)))
    else:
        for _ in range(rng.randint(0, min(2, free))):
            q = rng.randint(per + 1, per + 40)
            if num_tokens + q > mnbt or q > max_len:
                break
            qlens.append(q)
            lens.append(rng.randint(q, max_len))
            num_tokens += q
    if not qlens:
        qlens, lens, real, num_tokens = [1], [1], 1, 1
    width = _ceil(max_len, b.kv_cache_spec.block_size)
    qsl = torch.tensor([0, *np.cumsum(qlens).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    # distinct page ids per request (1000 * request + column): a wrong copy shows
    table = (torch.arange(len(lens))[:, None] * 1000 + torch.arange(width)).to(torch.int32)
    cam = types.SimpleNamespace(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens,
        seq_lens_cpu_upper_bound=seq_lens, num_reqs=len(lens), num_actual_tokens=num_tokens,
        max_query_len=max(qlens), max_seq_len=max(lens), block_table_tensor=table,
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64),
        # every decode a real one (prompt chunks on the decode path: test_sparse_workspace)
        is_prefilling=torch.zeros(len(lens), dtype=torch.bool))
    return cam, real


def _case(seed: int, sparse: bool) -> tuple[bm.BitDecodeMetadataBuilder, int, int,
                                             types.SimpleNamespace, int, int | None]:
    """A random builder and step: (builder, max_rows, split workspace rows, step, decode
    requests with tokens, the KV cache's blocks or None where the process does not know)."""
    rng = random.Random(seed)
    block = rng.choice([16, 32, 64])
    drafts = rng.choice([0, 0, 1, 2, 3, 4])
    max_len = rng.choice([17, 64, rng.randint(2, 3000)])
    max_seqs = rng.randint(1, 24)
    mnbt = rng.choice([max_seqs * (1 + drafts), rng.randint(max(max_seqs, 41), 2048)])
    # small caches often: rows of requests that share pages pass the workspace
    kv_blocks = rng.choice([None, rng.randint(1, 8), rng.randint(1, 30), rng.randint(1, 3000)])
    b, max_rows, split_rows = _builder(rng, sparse, drafts, block, max_len, max_seqs,
                                       mnbt, kv_blocks)
    cam, real = _step(rng, b, max_rows, max_seqs, mnbt, max_len)
    return b, max_rows, split_rows, cam, real, kv_blocks


def _expected_rows(cam: types.SimpleNamespace, num_decodes: int, rows: int
                   ) -> tuple[list[int], list[int]]:
    """Per decode row: its request (-1: padding) and length, by brute force."""
    qsl, lens = cam.query_start_loc_cpu.tolist(), cam.seq_lens.tolist()
    request, length = [], []
    for r in range(num_decodes):
        for t in range(qsl[r], qsl[r + 1]):
            request.append(r)
            length.append(lens[r] - (qsl[r + 1] - 1 - t))
    pad = rows - len(request)
    return request + [-1] * pad, length + [0] * pad


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("seed", range(100))
def test_builder_decode_plan(monkeypatch, seed, sparse):
    warnings: list[tuple] = []
    b, max_rows, split_rows, cam, real, kv_blocks = _case(seed, sparse)
    monkeypatch.setattr(bm.logger, "warning", lambda msg, *a: warnings.append(a))
    per = b.reorder_batch_threshold
    qlens = np.diff(cam.query_start_loc_cpu.numpy()).tolist()
    num_decodes = sum(1 for q in qlens if q <= per) if max(qlens) > per else len(qlens)
    md = b.build(0, cam)
    block = b.kv_cache_spec.block_size
    nd_tokens = cam.num_actual_tokens if num_decodes == len(qlens) else sum(qlens[:num_decodes])
    assert md.num_decode_tokens == nd_tokens
    assert (md.prefill is None) == (num_decodes == len(qlens))
    if b.pack_queries:  # requests as they are, their tokens at vLLM's query starts
        assert md.num_decodes == num_decodes
        assert md.decode_query_start.tolist() == cam.query_start_loc.tolist()[: num_decodes + 1]
        assert all(q <= md.decode_max_query_len for q in qlens[:num_decodes])
        assert md.decode_seq_lens.tolist() == cam.seq_lens.tolist()[:num_decodes]
        rows = num_decodes
    else:  # a row per query token, row i reading query token i
        assert md.decode_query_start is None and md.decode_max_query_len == 1
        rows = md.num_decodes
        assert rows == (nd_tokens if per > 1 else num_decodes)
        request, length = _expected_rows(cam, num_decodes, rows)
        assert md.decode_seq_lens.tolist() == length
        for r, n in zip(request, length, strict=True):
            if r >= 0:  # at least its own token, no more than its request's
                assert 1 <= n <= int(cam.seq_lens[r])
        for i, r in enumerate(request):
            used = _ceil(length[i], block)  # the pages a row reads: its request's
            assert md.decode_block_table[i, :used].tolist() == (
                cam.block_table_tensor[r, :used].tolist())
    assert rows <= max_rows
    assert md.num_splits == bm.plan_num_splits(rows, b.num_kv_heads, b.num_sms, b.ctas_per_sm)
    # the split workspace the constructor sized holds this step's partials
    assert md.num_splits * rows * (md.decode_max_query_len if b.pack_queries else 1) <= (
        split_rows)
    sp = md.sparse
    if not sparse or rows == 0:
        assert sp is None
        assert warnings == []
        return
    unit, capacity, min_len = sp.selection_unit, sp.key_capacity, sp.min_seq_len
    assert sp.reuse_splits == bm.plan_reuse_splits(rows, b.num_kv_heads, b.num_sms,
                                                   sp.token_budget, md.num_splits)
    lens = md.decode_seq_lens.tolist()
    offsets = sp.key_offsets.tolist()
    assert len(offsets) == rows
    end, dense, eligible = 0, 0, 0
    for n, o in zip(lens, offsets, strict=True):
        assert o == end  # the exclusive sum: key ranges in batch order, no overlap
        end += _ceil(n, unit)
        if n >= 1 and n >= min_len:
            eligible += 1
            if _has_keys(n, o, min_len, capacity):
                assert o + _ceil(n, unit) <= capacity
            else:
                dense += 1
        else:  # padding and short rows: no keys, whatever the offset
            assert not _has_keys(n, o, min_len, capacity)
    assert bm.rows_with_score_keys(md.decode_seq_lens, sp.key_offsets, min_len,
                                   capacity).sum() == eligible - dense
    # the once-per-builder warning counts the rows the kernels decode densely
    assert warnings == ([] if dense == 0 else [(dense, eligible, capacity)])
    # requests on pages of their own within the cache: every row keeps its keys
    real_lens = cam.seq_lens.tolist()[:real]
    if (kv_blocks is None or sum(_ceil(n, block) for n in real_lens) <= kv_blocks) and (
            capacity < bm.MAX_SCORE_KEYS):
        assert dense == 0, (lens, offsets, capacity)


# ---- the sparse reference's top-k --------------------------------------------------
def _scores(rng: random.Random, heads: int, n: int) -> torch.Tensor:
    """Scores with many ties (a few integer levels) or none."""
    levels = rng.choice([1, 2, 3, 1000])
    return torch.tensor([[float(rng.randint(0, levels - 1)) for _ in range(n)]
                         for _ in range(heads)])


def _top(scores: list[float], k: int) -> list[int]:
    """The newest index plus the k - 1 best older ones, ties to the lower, ascending."""
    n = len(scores)
    best = sorted(range(n - 1), key=lambda p: (-scores[p], p))[: min(k, n) - 1]
    return sorted(best) + [n - 1]


@pytest.mark.parametrize("seed", range(60))
def test_top_k_positions_by_hand(seed):
    rng = random.Random(seed)
    heads, n = rng.randint(1, 4), rng.choice([1, 2, 16, rng.randint(1, 200)])
    k = max(1, rng.choice([1, 2, n - 1, n, n + 5, rng.randint(1, 2 * n)]))
    s = _scores(rng, heads, n)
    got = rs.top_k_positions(s, k)
    assert got.shape == (heads, min(k, n)) and got.dtype == torch.int64
    assert got.tolist() == [_top(row, k) for row in s.tolist()]


@pytest.mark.parametrize("seed", range(60))
def test_pages_to_positions_of_top_k_pages(seed):
    rng = random.Random(seed)
    heads, bs = rng.randint(1, 3), rng.choice([16, 16, 4, 32])
    rows = rng.randint(1, 6)
    lens = [rng.choice([0, 1, bs - 1, bs, bs + 1, 3 * bs, rng.randint(1, 12 * bs)])
            for _ in range(rows)]
    k = rng.choice([1, 2, 3, rng.randint(1, 14)])
    sel = rs.Selection(torch.full((rows, heads, k), -1, dtype=torch.int32),
                       torch.zeros(rows, dtype=torch.int32))
    for i, n in enumerate(lens):
        if n == 0:
            continue  # padding: count 0
        if rng.random() < 0.2:
            sel.counts[i] = rs.DENSE_ROW
            continue
        s = _scores(rng, heads, n)
        pages = rs.top_k_pages(s, k, bs)
        own = (n - 1) // bs
        for h in range(heads):  # the own page last, the best older ones, ties lower
            page_best = [max(s[h, p * bs:(p + 1) * bs].tolist()) for p in range(own)]
            assert pages[h].tolist() == _top([*page_best, 0.0], k)
        sel.positions[i, :, : pages.shape[1]] = pages.to(torch.int32)
        sel.counts[i] = pages.shape[1]
    seq_lens = torch.tensor(lens)
    tokens = rs.pages_to_positions(sel, seq_lens, bs)
    for i, n in enumerate(lens):
        c = int(sel.counts[i])
        if c <= 0:  # padding and dense rows stay as they are, no positions
            assert int(tokens.counts[i]) == c and (tokens.positions[i] == -1).all()
            continue
        count = int(tokens.counts[i])
        if bs == TILE:  # the reuse kernel's length of a page list
            assert count == (c - 1) * TILE + ((n - 1) % TILE + 1)
        own = (n - 1) // bs
        for h in range(heads):
            got = tokens.positions[i, h, :count].tolist()
            want = [t for p in sel.positions[i, h, :c].tolist()
                    for t in range(p * bs, p * bs + bs) if t < n]
            assert got == want and got == sorted(set(got))
            assert set(range(own * bs, n)) <= set(got) and got[-1] == n - 1
            assert (tokens.positions[i, h, count:] == -1).all()
        if c == own + 1:  # every page: every position
            assert count == n


@pytest.mark.parametrize("seed", range(6))
def test_selection_rows_by_the_rules(seed):
    """select / select_pages over a batch with padding, short and long rows: counts
    min(k, n), DENSE_ROW or 0; positions the best-scored, ties to the lower, newest kept;
    the page selection's tokens as pages_to_positions gives them; padding reads nothing."""
    from tests.cpu.attention_stand_ins import random_pages
    from vllm_bitdecode import reference as ref
    from vllm_bitdecode.page_format import PageFormat

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    kv_heads, gqa, rotate = rng.choice([1, 2]), rng.choice([1, 2]), rng.random() < 0.5
    fmt = PageFormat(D, 4, 64, rng.choice([16, 32]))
    k, min_len = rng.choice([1, 3, 8, 20]), rng.choice([1, 16, 17, 40])
    lens = [rng.choice([0, 1, 15, 16, 17, min_len - 1, min_len, rng.randint(1, 90)])
            for _ in range(6)]
    lens = [max(n, 0) for n in lens] + [0]  # a graph batch's padding row last
    cache, table = random_pages(fmt, rotate, [max(n, 1) for n in lens], kv_heads, gen)
    q = torch.randn(len(lens), kv_heads * gqa, D, generator=gen).to(torch.bfloat16)
    sl, scale = torch.tensor(lens), D**-0.5
    shared = rng.random() < 0.3
    sel = rs.select(q, cache, table, sl, scale, fmt, rotate, token_budget=k,
                    min_seq_len=min_len, shared=shared)
    pages = rs.select_pages(q, cache, table, sl, scale, fmt, rotate, page_budget=k,
                            min_seq_len=min_len, shared=shared)
    tokens = rs.pages_to_positions(pages, sl, TILE)
    for i, n in enumerate(lens):
        want = 0 if n == 0 else rs.DENSE_ROW if n < min_len else min(k, n)
        assert int(sel.counts[i]) == want
        assert int(pages.counts[i]) == (want if want <= 0 else min(k, _ceil(n, TILE)))
        if want <= 0:
            assert (sel.positions[i] == -1).all() and (pages.positions[i] == -1).all()
            continue
        kk, _ = ref.read_blocks(cache, table[i, : _ceil(n, fmt.block_size)], n, fmt,
                                torch.bfloat16)
        scores = rs.aggregate(rs.logits(rs._selection_query(q[i], rotate), kk, scale),
                              kv_heads, shared).tolist()
        for h, s in enumerate(scores):
            assert sel.positions[i, h, :want].tolist() == _top(s, k)
            assert (sel.positions[i, h, want:] == -1).all()
            own = (n - 1) // TILE
            best = [max(s[p * TILE:(p + 1) * TILE]) for p in range(own)]
            assert pages.positions[i, h, : int(pages.counts[i])].tolist() == (
                _top([*best, 0.0], k))
            got = tokens.positions[i, h, : int(tokens.counts[i])].tolist()
            assert got == sorted(set(got)) and set(range(own * TILE, n)) <= set(got)
            assert got[-1] == n - 1 and all(0 <= t < n for t in got)
    out = rs.sparse_attention(q, cache, table, sl, tokens, scale, fmt, rotate)
    assert (out[-1] == 0).all()  # the padding row: no positions, nothing read
    for i, n in enumerate(lens):
        if 0 < n < min_len:  # short rows decode densely
            dense = ref.paged_attention(q[i:i + 1], cache, table[i:i + 1], sl[i:i + 1],
                                        torch.tensor([0, 1]), scale, fmt, rotate)
            torch.testing.assert_close(out[i:i + 1], dense, atol=0, rtol=0)


@pytest.mark.parametrize("seed", range(20))
def test_reuse_splits_have_tiles(seed):
    """As the kernel cuts a reuse row: every split but the last gets MIN_TILES_PER_SPLIT
    tiles or more, and none gets nothing (until 2026-12-05 a count capped by the SMs or
    the dense plan could leave CTAs with no tile: 257 tiles in 32 splits of 9)."""
    rng = random.Random(seed)
    for _ in range(200):
        budget = rng.choice([rng.randint(1, 8192), 16 * rng.randint(1, 512), 400, 4112])
        rows, heads = rng.randint(1, 64), rng.choice([1, 2, 4, 8])
        sms, dense = rng.choice([78, 114, 132]), rng.randint(1, 64)
        tiles = -(-budget // 16)
        splits = bm.plan_reuse_splits(rows, heads, sms, budget, dense)
        got = [len(_kernel_tiles(tiles, s, splits, bm.MIN_TILES_PER_SPLIT))
               for s in range(splits)]
        assert sum(got) == tiles and min(got) > 0, (budget, rows, heads, sms, dense, got)
        assert all(n >= bm.MIN_TILES_PER_SPLIT for n in got[:-1]), got
        assert 1 <= splits <= max(1, min(dense, 2 * sms // (rows * heads)))
