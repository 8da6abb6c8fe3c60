"""Randomized differential tests of per-token prefill planning, on the host.

``prefill_workspace_rows`` sizes the workspace, ``context_windows`` cuts a long context
into windows and ``build_prefill_groups`` (through the builder's ``_build_prefill``) cuts
a step's prefills into groups. Here seeded random steps (chunks that start mid-page,
prefix-cache hits on shared pages, contexts at max_model_len, the largest chunk a step
allows) are planned, and the plan is replayed token by token the way the impl runs it:
``dequantize_pages`` writes each group's pages into a poisoned workspace, FlashAttention's
varlen masks (causal from the bottom right in the last window) pick the keys each query
sees, and the impl's LSE merge loop decides which results reach the output. Every query
must see each key of its context up to its own position exactly once, and nothing else.
"""

from __future__ import annotations

import dataclasses
import random
import types

import numpy as np
import pytest
import torch

from vllm_bitdecode.backend.metadata import (
    BitDecodeMetadataBuilder,
    PrefillGroup,
    PrefillMetadata,
    context_windows,
    prefill_workspace_rows,
)
from vllm_bitdecode.config import MIN_PREFILL_WINDOW, PREFILL_WINDOW_TOKENS
from vllm_bitdecode.page_format import LARGEST_BLOCK_SIZE, SUPPORTED_BLOCK_SIZES

# a block-table entry no request owns: what a read past a request's pages finds
GARBAGE_PAGE = 0


@dataclasses.dataclass
class Step:
    """A scheduler step: decodes first (as vLLM orders a batch), then the prefills."""

    max_model_len: int
    max_num_batched_tokens: int
    block_size: int
    window: int
    capacity: int  # prefill_workspace_rows for the above
    decode_lens: list[int]
    decode_qlens: list[int]
    lens: list[int]  # prefills' context lengths, new tokens included
    qlens: list[int]  # prefills' new tokens
    table: np.ndarray  # [decodes + prefills, ceil(max_model_len / block_size)] page ids


def _random_config(rng: random.Random) -> tuple[int, int, int, int]:
    """(max_model_len, max_num_batched_tokens, block_size, window): small enough to replay
    token by token, with the edges of prefill_workspace_rows' branches drawn often."""
    bs = rng.choice(SUPPORTED_BLOCK_SIZES)
    window = rng.choice([MIN_PREFILL_WINDOW, rng.randint(MIN_PREFILL_WINDOW, 1100),
                         LARGEST_BLOCK_SIZE * rng.randint(1, 8)])
    mnbt = rng.choice([rng.randint(1, 64), rng.randint(1, 1500), window - 1, window,
                       window + 1, window + LARGEST_BLOCK_SIZE])
    mml = rng.choice([rng.randint(1, window), rng.randint(window, 6 * window), mnbt,
                      mnbt + 1, window + 1, rng.randint(1, 4000)])
    return max(1, mml), max(1, mnbt), bs, window


def _random_step(rng: random.Random, mml: int, mnbt: int, bs: int, window: int) -> Step:
    capacity = prefill_workspace_rows(False, mml, mnbt, bs, window)
    budget = mnbt  # a step's tokens, decodes' and prefills' together
    dec_lens, dec_qlens = [], []
    for _ in range(rng.choice([0, 0, 1, 3])):
        q = rng.randint(1, 4)
        if budget - q < 1 or q > mml:
            break
        dec_qlens.append(q)
        dec_lens.append(rng.randint(q, mml))
        budget -= q
    lens: list[int] = []
    qlens: list[int] = []
    shared: dict[int, tuple[int, int]] = {}  # prefill -> (donor prefill, shared pages)
    for _ in range(rng.randint(1, 8)):
        if budget == 0:
            break
        kind = rng.choice(["fresh", "chunk", "hit", "long", "worst"])
        if kind == "fresh":  # a whole prompt in one chunk
            q = rng.randint(1, min(budget, mml))
            n = q
        elif kind == "chunk":  # a later chunk: its context usually starts mid-page
            n = rng.randint(1, mml)
            q = rng.randint(1, min(n, budget))
        elif kind == "hit":  # prefix-cache hit: the computed tokens are whole pages
            n = rng.randint(1, mml)
            cached = rng.randint(0, (n - 1) // bs) * bs
            q = min(n - cached, budget)
            n = cached + q
            donors = [i for i, m in enumerate(lens) if m >= cached]
            if cached and donors and rng.random() < 0.7:  # the same physical pages
                shared[len(lens)] = (rng.choice(donors), cached // bs)
        elif kind == "long":
            n = rng.randint(min(capacity, mml), mml)
            q = rng.randint(1, min(n, budget))
        else:  # the largest chunk just past a window edge, or at max_model_len
            n = min(mml, rng.choice([mml, capacity + 1 + bs * rng.randint(0, 5),
                                     2 * capacity + rng.randint(-bs, bs)]))
            n = max(1, n)
            q = min(n, budget)
        lens.append(n)
        qlens.append(q)
        budget -= q
    return Step(mml, mnbt, bs, window, capacity, dec_lens, dec_qlens, lens, qlens,
                _block_table(rng, dec_lens + lens, len(dec_lens), shared, mml, bs))


def _block_table(rng: random.Random, lens: list[int], num_decodes: int,
                 shared: dict[int, tuple[int, int]], mml: int, bs: int) -> np.ndarray:
    """vLLM's block table: ceil(max_model_len / block_size) columns, a request's pages
    in shuffled physical order, shared prefix pages where ``shared`` says, the rest of a
    row GARBAGE_PAGE."""
    width = -(-mml // bs)
    table = np.full((len(lens), width), GARBAGE_PAGE, dtype=np.int64)
    next_page = 1
    for r, n in enumerate(lens):
        pages = -(-n // bs)
        table[r, :pages] = np.arange(next_page, next_page + pages)
        next_page += pages
        donor = shared.get(r - num_decodes)
        if donor is not None:
            d, k = donor
            table[r, :k] = table[num_decodes + d, :k]
    perm = np.concatenate([[GARBAGE_PAGE], 1 + np.asarray(
        rng.sample(range(next_page - 1), next_page - 1), dtype=np.int64)])
    return perm[table]


def _plan(step: Step) -> PrefillMetadata:
    """The builder's _build_prefill on CPU tensors, decodes ahead of the prefills."""
    qlens = step.decode_qlens + step.qlens
    lens = torch.tensor(step.decode_lens + step.lens, dtype=torch.int32)
    qsl = torch.tensor([0, *np.cumsum(qlens).tolist()], dtype=torch.int32)
    cam = types.SimpleNamespace(
        query_start_loc_cpu=qsl, seq_lens=lens, seq_lens_cpu_upper_bound=lens,
        num_reqs=len(qlens), block_table_tensor=torch.from_numpy(step.table).to(torch.int32))
    builder = types.SimpleNamespace(
        bitdecode=types.SimpleNamespace(channel_k=False),
        prefill_workspace_rows=step.capacity, device=torch.device("cpu"),
        page_format=types.SimpleNamespace(block_size=step.block_size))
    nd = len(step.decode_qlens)
    return BitDecodeMetadataBuilder._build_prefill(builder, cam, nd, int(qsl[nd]))


def _check_group_shapes(g: PrefillGroup, capacity: int, bs: int) -> None:
    """What dequantize_pages (csrc/ops.cpp's checks), FlashAttention and the impl's
    _workspace_rows need of one group."""
    n = g.seq_lens.shape[0]
    for t in (g.query_start_loc, g.kv_start_loc, g.seq_lens, g.block_table):
        assert t.dtype == torch.int32
    assert g.query_start_loc.shape == (n + 1,) and g.kv_start_loc.shape == (n + 1,)
    assert g.block_table.dim() == 2 and g.block_table.shape[0] == n and n >= 1
    assert g.block_table.stride(1) == 1 and g.seq_lens.stride(0) == 1
    assert g.max_seq_len <= g.block_table.shape[1] * bs  # the table addresses max_tokens
    qsl = g.query_start_loc.tolist()
    assert qsl[0] == 0 and qsl[-1] == g.token_end - g.token_begin
    assert 0 <= g.token_begin < g.token_end
    kv = g.kv_start_loc.tolist()
    assert kv[0] == 0 and kv[-1] == g.total_kv_tokens <= capacity
    assert all(b <= a for a, b in zip(kv[1:], kv[:-1], strict=True))
    # dequantize reads seq_lens, FlashAttention cu_seqlens_k: the same rows
    assert g.seq_lens.tolist() == [b - a for a, b in zip(kv[:-1], kv[1:], strict=True)]
    assert g.max_query_len == max(b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True))
    assert g.max_seq_len == max(g.seq_lens.tolist())
    assert 0 <= g.window < g.windows
    if g.windows > 1:
        assert n == 1 and g.kv_begin % bs == 0  # one request, read from a page
    else:
        assert g.kv_begin == 0


def _replay(step: Step, md: PrefillMetadata) -> None:
    """Runs the plan as the impl does, on page ids instead of values, and checks that
    every prefill query sees exactly its causal context, once."""
    bs, capacity = step.block_size, step.capacity
    nd = len(step.decode_qlens)
    lens, qlens = step.lens, step.qlens
    table = step.table[nd:]
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int64)
    owner = np.repeat(np.arange(len(qlens)), qlens)  # each prefill token's request
    # per request: physical page -> its column in the request's row (-1: not its page)
    inv = np.full((len(lens), int(table.max()) + 1), -1, dtype=np.int64)
    for r, n in enumerate(lens):
        pages = -(-n // bs)
        inv[r, table[r, :pages]] = np.arange(pages)
    assert md.block_table.shape[0] == len(lens) and md.seq_lens.tolist() == lens
    assert md.max_seq_len == max(lens)

    written = np.zeros(qsl[-1], dtype=np.int64)
    seen: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in lens]  # (lo, hi) per query
    merged: tuple[int, list] | None = None  # the impl's merge state: (rows, contributions)
    end = 0  # the tokens planned so far: groups go in order, a context's windows repeat
    for g in md.groups:
        _check_group_shapes(g, capacity, bs)
        assert g.token_begin == end or (g.window > 0 and g.token_end == end)
        end = g.token_end
        bt = g.block_table.numpy()
        sl = g.seq_lens.tolist()
        kv = g.kv_start_loc.tolist()
        gq = g.query_start_loc.tolist()
        # dequantize_pages: request i's first sl[i] tokens of its (sliced) row, page by
        # page, into rows kv[i]... of a workspace view of total_kv_tokens rows
        ws = np.full(g.total_kv_tokens, -1, dtype=np.int64)  # -1: not written this group
        for i, n in enumerate(sl):
            t = np.arange(n)
            assert (t // bs < bt.shape[1]).all()
            rows = kv[i] + t
            assert (ws[rows] == -1).all(), "two requests of a group share workspace rows"
            ws[rows] = bt[i, t // bs].astype(np.int64) * bs + t % bs
        contributions = []
        causal = g.window == g.windows - 1
        for i in range(len(sl)):
            tok = g.token_begin + gq[i]
            r = int(owner[tok])  # the group's rows must be request r's whole chunk
            assert tok == qsl[r] and g.token_begin + gq[i + 1] == qsl[r + 1]
            q, klen = gq[i + 1] - gq[i], kv[i + 1] - kv[i]
            keys = ws[kv[i] : kv[i + 1]]
            assert (keys >= 0).all(), "FlashAttention reads a row no dequantize wrote"
            cols = inv[r, keys // bs]
            assert (cols >= 0).all(), "a window reads a page outside its request's row"
            pos = cols * bs + keys % bs  # the context positions the rows hold
            assert (pos == pos[0] + np.arange(klen)).all()
            # keys each query sees: all, or causal from the bottom right
            vis = np.full(q, klen) if not causal else klen - q + 1 + np.arange(q)
            assert (vis >= 1).all() and (vis <= klen).all()
            contributions.append((gq[i], r, np.full(q, pos[0]), pos[0] + vis))
        # the impl's loop: a single window writes its output, windows merge by LSE and
        # the last merge writes it
        rows = g.token_end - g.token_begin
        finished = None
        if g.windows == 1:
            finished = contributions
        elif merged is None:
            merged = (rows, contributions)
        else:
            assert merged[0] == rows, "windows of different chunks merged"
            merged = (rows, merged[1] + contributions)
            if causal:
                finished, merged = merged[1], None
        if finished is None:
            continue
        written[g.token_begin : g.token_end] += 1  # one write of the group's output rows
        for rel, r, lo, hi in finished:
            tok = g.token_begin + rel + np.arange(len(lo))
            assert (owner[tok] == r).all(), "a result reaches another request's rows"
            seen[r].append((lo, hi))
    assert merged is None, "windows left unmerged"
    assert end == qsl[-1]
    assert (written == 1).all(), "a prefill token's output written other than once"
    for r, (n, q) in enumerate(zip(lens, qlens, strict=True)):
        # each query j's spans tile [0, its own position] exactly
        lo = np.stack([a for a, _ in seen[r]])
        hi = np.stack([b for _, b in seen[r]])
        order = np.argsort(lo, axis=0, kind="stable")
        lo, hi = np.take_along_axis(lo, order, 0), np.take_along_axis(hi, order, 0)
        assert (lo[0] == 0).all() and (hi > lo).all() and (lo[1:] == hi[:-1]).all()
        assert (hi[-1] == n - q + 1 + np.arange(q)).all()


def _check_windows_layout(step: Step, md: PrefillMetadata) -> None:
    """context_windows' documented layout: whole contexts when they fit, else windows of
    ``capacity`` tokens from the start, one cut short before the last, all from a page."""
    cap, bs = step.capacity, step.block_size
    per_request: dict[int, list[PrefillGroup]] = {}
    r = 0
    for g in md.groups:
        if g.windows == 1:
            r += g.seq_lens.shape[0]
            continue
        per_request.setdefault(r, []).append(g)
        if g.window == g.windows - 1:
            r += 1
    assert r == len(step.lens)
    for r, n in enumerate(step.lens):
        wins = per_request.get(r)
        assert (wins is None) == (n <= cap)
        if wins is None:
            continue
        assert [g.window for g in wins] == list(range(len(wins)))
        assert all(g.windows == len(wins) for g in wins)
        spans = [(g.kv_begin, g.kv_begin + g.max_seq_len) for g in wins]
        assert spans == context_windows(n, step.qlens[r], cap, bs)
        assert all(b - a == cap for a, b in spans[:-2])
        assert len(spans) == -(-n // cap)  # the short window costs no extra call
        last = spans[-1][0]
        assert last % bs == 0 and last <= n - step.qlens[r] and n - last <= cap
        assert last - bs < n - cap  # the last window is as long as a page start allows


@pytest.mark.parametrize("seed", range(300))
def test_random_steps_read_every_key_once(seed):
    rng = random.Random(seed)
    step = _random_step(rng, *_random_config(rng))
    md = _plan(step)
    _check_windows_layout(step, md)
    _replay(step, md)


@pytest.mark.parametrize("seed", range(12))
def test_random_steps_at_served_sizes(seed):
    """The defaults' scale: 16K-token windows, contexts to 128K (replayed on page ids
    only, so still cheap)."""
    rng = random.Random(1000 + seed)
    mnbt = rng.choice([2048, 8192, 16384, 16385, 20001, 32768])
    step = _random_step(rng, rng.choice([32768, 131072]), mnbt,
                        rng.choice(SUPPORTED_BLOCK_SIZES), PREFILL_WINDOW_TOKENS)
    md = _plan(step)
    _check_windows_layout(step, md)
    _replay(step, md)


@pytest.mark.parametrize("ext", [1, 2, 3, 8])
@pytest.mark.parametrize(("mml", "mnbt"), [(65536, 16384), (8192, 2048), (131072, 20001),
                                           (20000, 16384)])
def test_workspace_rows_hold_a_drafters_longer_chunks(mml, mnbt, ext):
    """A drafter's first pass (vLLM 0.20's extend_all_queries_by_N) lengthens a full
    chunk by up to ``ext`` tokens, and its context past max_model_len by as many: with
    ``draft_extension`` the workspace plans every such context at every block size; the
    rows for no drafter miss some (block 128: a context whose part before the chunk ends
    126 or 127 tokens into a page, found by review)."""
    rng = random.Random(mml + 7 * mnbt + ext)
    cap = prefill_workspace_rows(False, mml, mnbt, 16, PREFILL_WINDOW_TOKENS, ext)
    q = mnbt + ext
    lens = sorted(set(range(q, min(q + 3 * LARGEST_BLOCK_SIZE, mml + ext + 1)))
                  | set(rng.sample(range(q, mml + ext + 1), min(2000, mml + ext + 1 - q))))
    for bs in SUPPORTED_BLOCK_SIZES:
        assert prefill_workspace_rows(False, mml, mnbt, bs, PREFILL_WINDOW_TOKENS, ext) == cap
        for n in lens:
            wins = context_windows(n, q, cap, bs)
            assert wins[-1][0] <= n - q and all(a % bs == 0 for a, _ in wins)
    if (mml, mnbt) == (65536, 16384) and ext >= 2:
        cap0 = prefill_workspace_rows(False, mml, mnbt, 128)
        with pytest.raises(ValueError, match="does not fit a window"):
            for n in lens:
                context_windows(n, q, cap0, 128)


@pytest.mark.parametrize("seed", range(60))
def test_workspace_rows_hold_every_chunk_a_step_allows(seed):
    """For a random configuration, the rows are what the docstring says and every
    context up to max_model_len with the largest chunk the step allows (the hardest to
    place: the last window must start at or before the chunk) is planned."""
    rng = random.Random(2000 + seed)
    mml, mnbt, _, window = _random_config(rng)
    rows = {bs: prefill_workspace_rows(False, mml, mnbt, bs, window)
            for bs in SUPPORTED_BLOCK_SIZES}
    cap = rows[16]
    # the impl sizes the workspace from cache_config's block size, the builder plans
    # from the KV spec's: the same rows at every block size
    assert set(rows.values()) == {cap}
    assert cap >= mnbt and cap >= min(mml, window)
    if max(min(mml, window), mnbt) < mml:  # windows: whole largest pages, a step's
        # tokens plus a page
        assert cap % LARGEST_BLOCK_SIZE == 0 and cap >= mnbt + LARGEST_BLOCK_SIZE
    else:  # whole, and a drafter's context past max_model_len too
        assert cap >= mml + LARGEST_BLOCK_SIZE
    bound = -(-max(window, mnbt + LARGEST_BLOCK_SIZE) // LARGEST_BLOCK_SIZE)
    # bounded, whatever max_model_len
    assert cap <= bound * LARGEST_BLOCK_SIZE + LARGEST_BLOCK_SIZE
    if mml > max(window, mnbt):  # no longer grows with max_model_len
        assert prefill_workspace_rows(False, 2 * mml, mnbt, 16, window) == cap
    assert prefill_workspace_rows(False, mml + 1, mnbt, 16, window) >= cap
    for bs in SUPPORTED_BLOCK_SIZES:
        lens = range(1, mml + 1) if mml <= 3000 else rng.sample(range(1, mml + 1), 3000)
        for n in lens:
            q = min(n, mnbt)
            wins = context_windows(n, q, cap, bs)
            assert wins[0][0] == 0 and wins[-1] == (wins[-1][0], n)
            assert wins[-1][0] <= n - q and all(a % bs == 0 for a, _ in wins)
