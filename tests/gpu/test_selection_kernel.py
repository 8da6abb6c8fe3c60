"""Selection layer of sparse decode (issue #6): ``ops.decode_select`` against the CPU oracle.

``decode_select`` is the dense decode that also ranks every token by its best logit over
the KV head's query heads and keeps the top k. Its attention output must be bit for bit
``decode``'s (same kernel, same arithmetic). Its selection is checked against
``reference_sparse.select`` (aggregate ``"max_logit"``), which ranks the float32 logits
of the dequantized pages; the kernel ranks the logits of its tensor-core products, the
same up to rounding. So counts must be equal, every row's positions ascending, distinct,
within the sequence and ending with the newest, and the selected set equal to the
reference's except for positions whose score is within rounding of the k-th best (a
near-tie the two may break differently). Outputs are poisoned before every call; the key
workspace is reused across calls, as the backend reuses it.
"""

from __future__ import annotations

import pytest
import torch

from tests.clear_errors import expect_clear_error
from tests.gpu.test_kernels import (
    BAD_CALL_SETUP,
    DEV,
    PerTokenPages,
    _fill_pages,
    _ops,
    _reference_decode,
    _run_decode,
    check_decode_right_after_the_write,
)
from vllm_bitdecode import reference_sparse as rs
from vllm_bitdecode.backend.metadata import MIN_TILES_PER_SPLIT
from vllm_bitdecode.page_format import PageFormat, rotation_signs

pytestmark = pytest.mark.gpu

SCALE = 128**-0.5
KV_HEADS = 2
POISON = 12345
SPLITS = 3  # several splits per row: each writes the keys of its own tiles
# Near-tie tolerance, in logits, relative to 1 + |threshold|: the kernel's products run on
# tensor cores against K codes biased by M (128 in bf16, 1024 in fp16, taken back after
# the MMA), so its fp32 sums lose about M * sum|q| * 2^-24 before the scale multiplies;
# on an H200 (2026-11-30) fp16 at 2 bits differed from the float32 reference by 2.4e-3 at
# a threshold of 3.27. A wrong selection differs by far more.
NEAR_TIE = {torch.bfloat16: 2e-4, torch.float16: 2e-3}


def _run(q, cache, table, seq_lens, fmt, rotate, budget, min_seq_len, shared, *,
         keys=None, capacity=None, offsets=None, check_output=True, unit=1,
         return_tiles=False):
    rows, hq, d = q.shape
    sel_heads = 1 if shared else cache.shape[1]
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    if offsets is None:
        offsets = torch.cumsum(lens.long(), 0) - lens.long()
    if keys is None:
        cap = int(lens.sum()) if capacity is None else capacity
        keys = torch.zeros(max(cap, 1) * sel_heads, dtype=torch.int32, device=DEV)
    positions = torch.full((rows, sel_heads, budget), POISON, dtype=torch.int32, device=DEV)
    counts = torch.full((rows,), POISON, dtype=torch.int32, device=DEV)
    tiles = torch.full_like(positions, POISON) if unit > 1 else None
    out = torch.full((rows, hq, d), float("nan"), dtype=q.dtype, device=DEV)
    partial_out = torch.full((SPLITS * rows * hq * d,), float("nan"), device=DEV)
    partial_lse = torch.full((SPLITS * rows * hq,), float("nan"), device=DEV)
    signs = rotation_signs(fmt.head_size).to(DEV) if rotate else None
    _ops().decode_select(out, q.to(DEV), cache.to(DEV), table.to(DEV), lens.to(DEV),
                         partial_out, partial_lse, signs, SCALE, fmt.bits, fmt.group_size,
                         fmt.block_size, SPLITS, MIN_TILES_PER_SPLIT, positions, counts, keys,
                         offsets.to(DEV), min_seq_len, shared, unit, tiles)
    torch.cuda.synchronize()
    if check_output:  # the attention itself is decode's, bit for bit
        dense = _run_decode(q, cache, table, seq_lens, fmt, rotate, SPLITS, SCALE)
        assert torch.equal(out.cpu(), dense), "decode_select's output differs from decode's"
    sel = rs.Selection(positions.cpu(), counts.cpu())
    if tiles is not None:  # each listed page's place in the cache, through the table
        want = rs.cache_tiles(sel, table.cpu(), fmt.block_size)
        for i, c in enumerate(sel.counts.tolist()):
            assert torch.equal(tiles[i, :, :max(c, 0)].cpu(), want[i, :, :max(c, 0)]), (
                f"row {i}: sel_cache_tiles")
    return (sel, keys, tiles) if return_tiles else (sel, keys)


def _scores(q, cache, table, n, fmt, rotate, shared, row, unit=1):
    """[heads, units]: every position's score, or every 16-token page's best."""
    k, _ = rs._read_sequence(cache, table[row], n, fmt, q.dtype)
    s = rs.aggregate(rs.logits(rs._selection_query(q[row], rotate), k, SCALE),
                     cache.shape[1], shared)
    if unit == 1:
        return s
    pad = (-n) % unit
    s = torch.nn.functional.pad(s, (0, pad), value=-float("inf"))
    return s.unflatten(-1, (-1, unit)).amax(-1)


def _assert_matches(got, want, q, cache, table, seq_lens, fmt, rotate, shared, unit=1):
    assert torch.equal(got.counts, want.counts), (got.counts.tolist(), want.counts.tolist())
    for i, n in enumerate(seq_lens):
        c = int(want.counts[i])
        if c <= 0:  # padding or dense row: every slot -1
            assert (got.positions[i] == -1).all(), f"row {i}: slots of a count-{c} row"
            continue
        assert (got.positions[i, :, c:] == -1).all(), f"row {i}: slots past the count"
        scores = None
        for h in range(got.positions.shape[1]):
            g, w = got.positions[i, h, :c], want.positions[i, h, :c]
            newest = (n - 1) // unit
            assert int(g[-1]) == newest, f"row {i} head {h}: newest position not last"
            assert (g[1:] > g[:-1]).all() and int(g[0]) >= 0, f"row {i} head {h}: order"
            if torch.equal(g, w):
                continue
            if scores is None:
                scores = _scores(q, cache, table, n, fmt, rotate, shared, i, unit)
            s = scores[h, :newest]
            threshold = float(s.sort(descending=True).values[c - 2])
            tol = NEAR_TIE[q.dtype] * (1.0 + abs(threshold))
            for pos in set(g.tolist()) ^ set(w.tolist()):
                assert abs(float(s[pos]) - threshold) <= tol, (
                    f"row {i} head {h}: position {pos} (score {float(s[pos]):.6g}) differs "
                    f"from the reference, which is not a near-tie at {threshold:.6g}")


SEQ_LENS = [0, 5, 40, 3001, 2049, 700]  # padding, dense (short), all, three ranked rows


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rot"])
@pytest.mark.parametrize("gqa", [1, 4, 8, 12])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (2, 128), (4, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_select_matches_reference(dtype, bits, group_size, gqa, rotate, shared):
    """Token granularity; V group 64 too, whose kernels unroll the V loop differently."""
    gen = torch.Generator().manual_seed(100 * bits + 10 * gqa + 2 * rotate + shared
                                        + group_size)
    fmt = PageFormat(128, bits, group_size, 16)
    cache, table = _fill_pages([max(n, 1) for n in SEQ_LENS], KV_HEADS, fmt, dtype, rotate,
                               gen)
    q = torch.randn(len(SEQ_LENS), KV_HEADS * gqa, 128, generator=gen).to(dtype)
    for budget in (257, 2048):
        want = rs.select(q, cache, table, torch.tensor(SEQ_LENS), SCALE, fmt, rotate,
                         token_budget=budget, min_seq_len=16, shared=shared)
        got, _ = _run(q, cache, table, SEQ_LENS, fmt, rotate, budget, 16, shared)
        _assert_matches(got, want, q, cache, table, SEQ_LENS, fmt, rotate, shared)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("gqa", [1, 4, 8, 12])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (2, 128), (4, 32), (4, 64),
                                                   (2, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_select_pages_matches_reference(dtype, bits, group_size, gqa, shared, block_size):
    """Page granularity (selection_unit=16): 16-token pages ranked by their best token,
    the own page last, at block sizes 16 and 64 (pages are tiles, not vLLM blocks), up to
    12 query heads per KV head (the kernel for more than 8), at 2 bits and V group 32;
    twice on one workspace, so that shared mode's reset of every token key counts."""
    gen = torch.Generator().manual_seed(300 + 10 * gqa + 2 * shared + block_size + bits
                                        + group_size)
    fmt = PageFormat(128, bits, group_size, block_size)
    cache, table = _fill_pages([max(n, 1) for n in SEQ_LENS], KV_HEADS, fmt, dtype, True,
                               gen)
    keys = None
    for budget_pages in (17, 128):
        q = torch.randn(len(SEQ_LENS), KV_HEADS * gqa, 128, generator=gen).to(dtype)
        want = rs.select_pages(q, cache, table, torch.tensor(SEQ_LENS), SCALE, fmt, True,
                               page_budget=budget_pages, min_seq_len=16, shared=shared)
        got, keys = _run(q, cache, table, SEQ_LENS, fmt, True, budget_pages, 16, shared,
                         keys=keys, unit=16)
        _assert_matches(got, want, q, cache, table, SEQ_LENS, fmt, True, shared, unit=16)
    if shared:  # the top-k returned every token key it read to 0
        assert not keys.any(), "shared page selection left keys in the workspace"


@pytest.mark.parametrize("unit", [1, 16], ids=["tokens", "pages"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
def test_the_smallest_budgets_keep_the_newest_and_reset_the_workspace(shared, unit):
    """Budgets of 1 (only the newest unit: the top-k's own branch, which in shared mode
    still returns every key it read to 0), 2 and 3, twice on one workspace, so that a key
    left behind would show in the second call's selection. Pages on blocks of 64 tokens:
    the cache tiles of every branch, budget 1's included, checked in _run."""
    gen = torch.Generator().manual_seed(13)
    fmt = PageFormat(128, 4, 128, 16 if unit == 1 else 64)
    lens = [1, 2, 3, 700, 4097] if unit == 1 else [1, 17, 40, 700, 4097]
    cache, table = _fill_pages(lens, KV_HEADS, fmt, torch.bfloat16, True, gen)
    keys = None
    for budget in (1, 2, 3, 1):
        q = torch.randn(len(lens), KV_HEADS * 4, 128, generator=gen).to(torch.bfloat16)
        if unit == 1:
            want = rs.select(q, cache, table, torch.tensor(lens), SCALE, fmt, True,
                             token_budget=budget, min_seq_len=1, shared=shared)
        else:
            want = rs.select_pages(q, cache, table, torch.tensor(lens), SCALE, fmt, True,
                                   page_budget=budget, min_seq_len=1, shared=shared)
        got, keys = _run(q, cache, table, lens, fmt, True, budget, 1, shared, keys=keys,
                         unit=unit)
        assert got.counts.tolist() == [min(budget, -(-n // unit)) for n in lens]
        _assert_matches(got, want, q, cache, table, lens, fmt, True, shared, unit)
        if shared:
            assert not keys.any(), f"budget {budget}: shared selection left keys behind"


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
def test_rows_on_the_same_pages_keep_their_own_selection(shared):
    """Prefix caching: two rows read the same pages with different queries; each row must
    get its own top-k (a workspace indexed by physical slot would mix them)."""
    gen = torch.Generator().manual_seed(7)
    fmt = PageFormat(128, 4, 128, 16)
    cache, table = _fill_pages([3000], KV_HEADS, fmt, torch.bfloat16, True, gen)
    table = table.repeat(2, 1)
    q = torch.randn(2, KV_HEADS * 4, 128, generator=gen).to(torch.bfloat16)
    want = rs.select(q, cache, table, torch.tensor([3000, 3000]), SCALE, fmt, True,
                     token_budget=300, shared=shared)
    got, _ = _run(q, cache, table, [3000, 3000], fmt, True, 300, 1, shared)
    _assert_matches(got, want, q, cache, table, [3000, 3000], fmt, True, shared)
    assert not torch.equal(got.positions[0], got.positions[1])


def test_reused_workspace_leaks_nothing_between_calls():
    """The shared mode combines KV heads with atomicMax on zeroed keys: a second call on
    the same workspace, with other queries, must see none of the first call's keys."""
    gen = torch.Generator().manual_seed(8)
    fmt = PageFormat(128, 4, 128, 16)
    lens = [2500, 1800]
    cache, table = _fill_pages(lens, KV_HEADS, fmt, torch.bfloat16, True, gen)
    keys = None
    for _ in range(2):
        q = torch.randn(2, KV_HEADS * 4, 128, generator=gen).to(torch.bfloat16)
        want = rs.select(q, cache, table, torch.tensor(lens), SCALE, fmt, True,
                         token_budget=200, shared=True)
        got, keys = _run(q, cache, table, lens, fmt, True, 200, 1, True, keys=keys)
        _assert_matches(got, want, q, cache, table, lens, fmt, True, True)


def test_rows_past_the_workspace_decode_densely():
    gen = torch.Generator().manual_seed(9)
    fmt = PageFormat(128, 2, 64, 32)
    lens = [1000, 1500, 600]
    cache, table = _fill_pages(lens, KV_HEADS, fmt, torch.float16, False, gen)
    q = torch.randn(3, KV_HEADS * 4, 128, generator=gen).to(torch.float16)
    got, _ = _run(q, cache, table, lens, fmt, False, 100, 1, False, capacity=2000)
    # offsets 0, 1000, 2500: the second row ends at 2500 > 2000, the third starts past it
    assert got.counts.tolist() == [100, rs.DENSE_ROW, rs.DENSE_ROW]
    want = rs.select(q[:1], cache, table[:1], torch.tensor(lens[:1]), SCALE, fmt, False,
                     token_budget=100)
    _assert_matches(rs.Selection(got.positions[:1], got.counts[:1]), want, q[:1], cache,
                    table[:1], lens[:1], fmt, False, False)


@pytest.mark.parametrize("rows", [3, 70])
@pytest.mark.parametrize("unit", [1, 16], ids=["tokens", "pages"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
def test_equal_scores_go_to_the_lowest_positions(shared, unit, rows):
    """A zero query gives every token the same key: the kept older positions (tokens or
    16-token pages) must be the lowest ones, across the warps' shares (and a row start
    that is not 16-byte aligned). Token selection at 3 rows ranks in clusters of CTAs, at
    70 rows in one CTA a row (select_topk_ranks), as page selection always does."""
    gen = torch.Generator().manual_seed(11 + rows + unit)
    fmt = PageFormat(128, 4, 128, 16)
    lens = [7, 5000, 40_001] + [3001 + 16 * i for i in range(rows - 3)]
    cache, table = _fill_pages(lens, KV_HEADS, fmt, torch.bfloat16, True, gen)
    q = torch.zeros(len(lens), KV_HEADS * 4, 128, dtype=torch.bfloat16)
    for budget in (300, 6000):
        got, _ = _run(q, cache, table, lens, fmt, True, budget, 1, shared, unit=unit)
        for i, n in enumerate(lens):
            units = -(-n // unit)
            k = min(budget, units)
            want = list(range(units)) if units <= budget else [*range(k - 1), units - 1]
            for h in range(got.positions.shape[1]):
                assert got.positions[i, h, :k].tolist() == want, (i, h, budget)


def test_long_row_matches_reference():
    """128K-scale rows: every warp of the top-k owns thousands of positions."""
    gen = torch.Generator().manual_seed(12)
    fmt = PageFormat(128, 4, 128, 16)
    lens = [100_003, 65_537]
    cache, table = _fill_pages(lens, KV_HEADS, fmt, torch.bfloat16, True, gen)
    q = torch.randn(2, KV_HEADS * 4, 128, generator=gen).to(torch.bfloat16)
    want = rs.select(q, cache, table, torch.tensor(lens), SCALE, fmt, True, token_budget=2048)
    got, _ = _run(q, cache, table, lens, fmt, True, 2048, 1, False)
    _assert_matches(got, want, q, cache, table, lens, fmt, True, False)


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("rows", [10, 20, 70])
def test_every_cluster_size(rows, shared):
    """The top-k spreads a row over a cluster of 1, 2, 4 or 8 CTAs, fewer as the batch
    grows (select_topk_ranks): with 2 KV heads on 132 SMs, 10 rows take 4 per (row, head)
    (8 shared), 20 take 2 (4 shared), 70 take 1 (1); the other tests' few rows take 8. A
    CTA's range is at least 32 warps x 256 keys: the first two rows (30,011 and 17,003
    tokens) spread their keys over 4 and 3 CTAs of a cluster of 4 or 8, and over both of
    a cluster of 2, so that every rank counts and adds a histogram, not only rank 0."""
    gen = torch.Generator().manual_seed(13 + rows)
    fmt = PageFormat(128, 4, 128, 16)
    lens = [30_011, 17_003, *torch.randint(600, 3000, (rows - 2,), generator=gen).tolist()]
    cache, table = _fill_pages(lens, KV_HEADS, fmt, torch.bfloat16, True, gen)
    q = torch.randn(rows, KV_HEADS * 4, 128, generator=gen).to(torch.bfloat16)
    want = rs.select(q, cache, table, torch.tensor(lens), SCALE, fmt, True, token_budget=257,
                     shared=shared)
    got, _ = _run(q, cache, table, lens, fmt, True, 257, 1, shared)
    _assert_matches(got, want, q, cache, table, lens, fmt, True, shared)


LOG2E = 1.4426950408889634
TOP_ROUNDS_BITS = 22  # the first two radix rounds' bits of a key (11 + 11); round 3 the rest


def _near_equal_keys(n, heads, head_size, gen, a=4.0):
    """Every token's K has one min and max (+a in channel 0, -a in the last, zeros
    between), so one scale and zero, and its channels 1 and 2 at random quantization
    levels. With a query of 1 in channel 0, 2^-14 in channel 1 and 2^-16 in channel 2,
    the logits differ by at most 75 steps of 2^-16 in the kernel's biased products: all
    within a bin or two of the top 22 bits. The float32 oracle tells 125 scores apart; the
    kernel's tensor-core sums keep fewer low bits (H100, 2026-12-06: 10 distinct keys per
    token row, 6 in the threshold's bin; 4-5 per page row). Larger query weights give more
    distinct keys but spread them over more bins, no more than 8 in the threshold's."""
    k = torch.zeros(n, heads, head_size)
    k[..., 0], k[..., -1] = a, -a
    k[..., 1:3] = -a + torch.randint(0, 16, (n, heads, 2), generator=gen) * (2 * a / 15)
    return k


def _key_scores(keys: torch.Tensor) -> torch.Tensor:
    """order_key's inverse: the float32 scores of 32-bit keys (held in int32)."""
    u = keys.long() & 0xFFFFFFFF
    bits = torch.where(u >= 2**31, u - 2**31, ~u & 0xFFFFFFFF)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("unit", [1, 16], ids=["tokens", "pages"])
def test_keys_alike_in_their_top_bits_rank_by_their_last_bits(unit):
    """Keys that share the bits of the first two radix rounds and differ in the last 10:
    round 3 alone picks the threshold, from the histograms of every rank of the cluster
    (token selection: rows of 40,001 and 33,335 tokens spread their keys over 5 CTAs of
    8; pages: over the warps of one CTA). Against the CPU oracle these scores are all
    near-ties, so the selection is checked exactly against the kernel's own keys (left in
    the per-head workspace): the budget - 1 highest of the older positions, the lowest
    positions among equal keys, then the newest; and the keys against the oracle's
    scores."""
    gen = torch.Generator().manual_seed(14 + unit)
    fmt = PageFormat(128, 4, 128, 16)
    lens = [40_001, 33_335]
    cache, table = _fill_pages(lens, KV_HEADS, fmt, torch.bfloat16, False, gen,
                               make_keys=_near_equal_keys)
    q = torch.zeros(len(lens), KV_HEADS * 4, 128)
    q[..., 0], q[..., 1], q[..., 2] = 1.0, 2.0**-14, 2.0**-16
    q = q.to(torch.bfloat16)
    budget = 12_000 if unit == 1 else 700
    got, keys = _run(q, cache, table, lens, fmt, False, budget, 1, False, unit=unit)
    keys = keys.cpu().view(KV_HEADS, -1)
    row0 = 0
    for i, n in enumerate(lens):
        units = -(-n // unit)
        scores = _scores(q, cache, table, n, fmt, False, False, i, unit)  # [heads, units]
        for h in range(KV_HEADS):
            row_keys = keys[h, row0 : row0 + units]
            # a row's scores span about 5.4e-5; the kernel's sums lose up to about 6e-6
            # (2^-13 of its biased products, scaled), a key at a wrong position mostly more
            torch.testing.assert_close(_key_scores(row_keys) / LOG2E, scores[h],
                                       rtol=0, atol=1.5e-5)
            older = row_keys[:-1].long() & 0xFFFFFFFF
            order = torch.sort(older, descending=True, stable=True).indices  # ties: lowest
            want = [*sorted(order[: budget - 1].tolist()), units - 1]
            assert got.positions[i, h].tolist() == want, f"row {i} head {h}"
            # what makes this a round-3 test: the threshold's top-22-bit bin holds many
            # distinct keys, in the ranges of several CTAs (tokens) or warps (pages)
            threshold = int(older[order[budget - 2]])
            same_top = (older >> (32 - TOP_ROUNDS_BITS)) == threshold >> (32 - TOP_ROUNDS_BITS)
            members = same_top.nonzero().flatten()
            assert older[same_top].unique().numel() >= 3, (i, h)
            assert int(members[0]) < units // 8 and int(members[-1]) > units * 7 // 8, (i, h)
        row0 += n  # _run's offsets: one workspace row per token, pages use the first units


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_select_right_after_the_write_sees_the_written_token(graph):
    """The selection layer's decode is a programmatic dependent of the step's KV-cache
    write as well (tests.gpu.test_kernels.check_decode_right_after_the_write); its
    attention is the dense decode's."""
    gen = torch.Generator().manual_seed(53)
    pages = PerTokenPages(8, 8, 4, gen)
    rows, budget = len(pages.seq_lens), 64
    lens = torch.tensor(pages.seq_lens, dtype=torch.int64)
    offsets = (torch.cumsum(lens, 0) - lens).to(DEV)
    keys = torch.zeros(int(lens.sum()) * pages.kv_heads, dtype=torch.int32, device=DEV)
    positions = torch.zeros(rows, pages.kv_heads, budget, dtype=torch.int32, device=DEV)
    counts = torch.zeros(rows, dtype=torch.int32, device=DEV)

    def decode(layer, out, q):
        _ops().decode_select(out, q, pages.caches[layer], pages.tables[layer], pages.lens,
                             pages.partial_out, pages.partial_lse, pages.signs, SCALE, 4, 128,
                             16, pages.splits, MIN_TILES_PER_SPLIT, positions, counts, keys,
                             offsets, 0, False, 1)

    def reference(layer, q, state):
        cache, table = state
        return _reference_decode(q, cache, table, pages.seq_lens, pages.fmt, True, SCALE)

    check_decode_right_after_the_write(pages, decode, reference, graph, gen)


def _assert_reuse_layer_matches(q, cache, table, lens, fmt, positions, counts, expected,
                                 unit=1, tiles=None):
    """decode_sparse (4 splits, outputs poisoned) over what a selection layer wrote,
    against the reference's sparse attention."""
    out = torch.full_like(q, float("nan"), device=DEV)
    partial_out = torch.full((4 * q.shape[0] * q.shape[1] * 128,), float("nan"), device=DEV)
    partial_lse = torch.full((4 * q.shape[0] * q.shape[1],), float("nan"), device=DEV)
    _ops().decode_sparse(out, q.to(DEV), cache.to(DEV), table.to(DEV),
                         torch.tensor(lens, dtype=torch.int32, device=DEV), positions.to(DEV),
                         counts.to(DEV), partial_out, partial_lse, rotation_signs(128).to(DEV),
                         SCALE, fmt.bits, fmt.group_size, fmt.block_size, 4, 1, False, unit,
                         tiles)
    torch.cuda.synchronize()
    err = float((out.cpu().float() - expected).norm() / expected.norm())
    assert torch.isfinite(out).all() and err <= 1e-2, err


def test_selection_feeds_the_sparse_decode_kernel():
    """What a selection layer writes is what a reuse layer reads: decode_sparse over the
    kernel's selection equals the reference's sparse attention over the same selection."""
    gen = torch.Generator().manual_seed(10)
    fmt = PageFormat(128, 4, 128, 16)
    lens = [4000, 33, 2100]
    cache, table = _fill_pages(lens, KV_HEADS, fmt, torch.bfloat16, True, gen)
    q = torch.randn(3, KV_HEADS * 4, 128, generator=gen).to(torch.bfloat16)
    sel, _ = _run(q, cache, table, lens, fmt, True, 512, 64, False)
    assert sel.counts.tolist() == [512, rs.DENSE_ROW, 512]
    expected = rs.sparse_attention(q, cache, table, torch.tensor(lens), sel, SCALE, fmt, True)
    _assert_reuse_layer_matches(q, cache, table, lens, fmt, sel.positions, sel.counts,
                                expected)


def test_page_selection_feeds_the_sparse_decode_kernel_through_cache_tiles():
    """A page selection layer's sel_cache_tiles, read by a reuse layer in place of the
    block table, give the reference's sparse attention over the selected pages (block
    size 64: four 16-token pages per block, the table permuted)."""
    gen = torch.Generator().manual_seed(11)
    fmt = PageFormat(128, 4, 128, 64)
    lens = [4000, 33, 2100]
    cache, table = _fill_pages(lens, KV_HEADS, fmt, torch.bfloat16, True, gen)
    q = torch.randn(3, KV_HEADS * 4, 128, generator=gen).to(torch.bfloat16)
    sel, _, tiles = _run(q, cache, table, lens, fmt, True, 32, 64, False, unit=16,
                         return_tiles=True)
    assert sel.counts.tolist() == [32, rs.DENSE_ROW, 32]
    tokens = rs.pages_to_positions(sel, torch.tensor(lens), 16)
    expected = rs.sparse_attention(q, cache, table, torch.tensor(lens), tokens, SCALE, fmt, True)
    # the reuse layer reads the cache tiles, not the positions
    poisoned = torch.full_like(sel.positions, POISON)
    _assert_reuse_layer_matches(q, cache, table, lens, fmt, poisoned, sel.counts, expected,
                                unit=16, tiles=tiles)


BAD_SELECT = BAD_CALL_SETUP + """pos = torch.zeros(1, 2, 8, dtype=torch.int32, device="cuda")
count = torch.zeros(1, dtype=torch.int32, device="cuda")
keys = torch.zeros(64, dtype=torch.int32, device="cuda")
offs = torch.zeros(1, dtype=torch.long, device="cuda")
tiles = torch.zeros(1, 2, 8, dtype=torch.int32, device="cuda")
a = dict(pos=pos, count=count, keys=keys, offs=offs, shared=False, bits=4, min_len=1, unit=1,
         tiles=None)
a.update({kwargs})
o.decode_select(out, q, cache, table, lens, ws, ws, None, 0.1, a["bits"], 128, 16, 1, 8,
                a["pos"], a["count"], a["keys"], a["offs"], a["min_len"], a["shared"],
                a["unit"], a["tiles"])
torch.cuda.synchronize()
print("OK")
"""


BAD_SELECT_CASES = [
    ("", None),
    ("pos=pos[:, :1], shared=True", None),
    ("pos=pos.long()", "sel_positions must be a CUDA int32"),
    ("unit=16", None),  # page granularity
    ("unit=16, tiles=tiles", None),  # and the pages' places in the cache
    ("tiles=tiles", "pass them with selection_unit 16 only, got selection_unit 1"),
    ("unit=16, tiles=tiles[:, :1]", "sel_cache_tiles must be a CUDA int32 tensor of "
                                    "sel_positions' shape"),
    ("unit=16, tiles=tiles.long()", "sel_cache_tiles must be a CUDA int32 tensor"),
    ("unit=16, tiles=pos", "sel_positions shares memory with sel_cache_tiles"),
    ("unit=16, tiles=keys[:16].view(1, 2, 8)", "keys shares memory with sel_cache_tiles"),
    ("pos=pos[:, :1]", "sel_positions has 1 heads, expected 2"),
    ("pos=pos[:, :, :0]", "must hold a budget of 1 to 2147483632 positions"),
    ("pos=pos[:, :, :0], unit=16", "must hold a budget of 1 to 134217727 pages"),
    ("unit=4", "selection_unit must be 1 (tokens) or 16 (16-token pages), got 4"),
    ("count=count.long()", "sel_count must be a contiguous CUDA int32"),
    # the top-k writes each (sequence, KV head) row's list: rows must not share memory
    ("pos=pos[:, :1].expand(1, 2, 8)", "sel_positions has elements that share memory"),
    # the decode writes keys, the top-k reads them and writes the lists and counts
    ("keys=pos.view(-1)", "keys shares memory with sel_positions"),
    ("count=pos.view(-1)[:1]", "sel_positions shares memory with sel_count"),
    # nor may they share memory with what the decode reads or writes
    ("offs=keys[:2].view(torch.long)", "keys shares memory with key_offsets"),
    ("keys=out.view(-1).view(torch.int32)", "keys shares memory with out"),
    ("keys=keys[:63]", "keys must be a contiguous CUDA int32 workspace"),
    ("keys=keys.float()", "keys must be a contiguous CUDA int32 workspace"),
    ("offs=offs.int()", "key_offsets must be a contiguous CUDA int64"),
    ("min_len=-1", "min_seq_len must be in [0, 2^31 - 1]"),
    ("bits=3", "bits must be 4 or 2"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_SELECT_CASES)
def test_select_bad_arguments_raise_clear_errors(kwargs, message):
    expect_clear_error(BAD_SELECT.format(kwargs=kwargs), message,
                       [BAD_SELECT.format(kwargs=k) for k, _ in BAD_SELECT_CASES])
