"""Sparse decode kernel (reuse layers, issue #6) against the CPU oracle.

``ops.decode_sparse`` must match ``reference_sparse.sparse_attention`` over the dequantized
pages within rounding, row by row; rows marked ``DENSE_ROW`` must give what the dense
kernel gives, bit for bit, and count-0 (padding) rows exact zeros. Outputs and split-K
workspaces are poisoned (NaN) before every launch; position slots past a row's count
hold other valid positions of the sequence, so reading them would show.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.clear_errors import expect_table_case
from tests.gpu.test_kernels import (
    BAD_CALL_SETUP,
    DEV,
    PerTokenPages,
    _captured,
    _fill_pages,
    _graph_buffers,
    _ops,
    _rel_err,
    _run_decode,
    check_decode_right_after_the_write,
)
from vllm_bitdecode import reference_sparse as rs
from vllm_bitdecode.backend.metadata import MIN_TILES_PER_SPLIT, plan_num_splits
from vllm_bitdecode.page_format import PageFormat, rotation_signs

pytestmark = pytest.mark.gpu

DENSE_ROW = rs.DENSE_ROW
SCALE = 128**-0.5
NO_PAGE = 10**8  # block-table entry of rows that must read no page: reading it faults


def _selection(seq_lens, counts, sel_heads, budget, gen, sort):
    """Random distinct positions per row and selection head, sorted or in random order.
    Slots past the count get other positions of the same sequence (DENSE_ROW and padding
    rows: NO_PAGE-sized garbage), so a kernel that reads past the count goes wrong."""
    rows = len(seq_lens)
    positions = torch.full((rows, sel_heads, budget), NO_PAGE, dtype=torch.int32)
    for i, (n, c) in enumerate(zip(seq_lens, counts, strict=True)):
        if c < 0 or n == 0:
            continue
        for h in range(sel_heads):
            positions[i, h] = torch.randint(0, n, (budget,), generator=gen)
            m = min(c, budget)
            chosen = torch.randperm(n, generator=gen)[:m]
            positions[i, h, :m] = chosen.sort().values if sort else chosen
    return rs.Selection(positions, torch.tensor(counts, dtype=torch.int32))


def _page_selection(seq_lens, counts, sel_heads, budget, gen):
    """Page granularity: per row and selection head, count - 1 random older 16-token pages
    and the row's own page last, ascending; slots past the count hold other pages of the
    sequence (padding and DENSE_ROW rows: garbage)."""
    rows = len(seq_lens)
    pages = torch.full((rows, sel_heads, budget), NO_PAGE, dtype=torch.int32)
    for i, (n, c) in enumerate(zip(seq_lens, counts, strict=True)):
        if c < 0 or n == 0:
            continue
        own = (n - 1) // 16
        for h in range(sel_heads):
            pages[i, h] = torch.randint(0, own + 1, (budget,), generator=gen)
            m = min(c, budget, own + 1)
            older = torch.randperm(own, generator=gen)[: m - 1].sort().values
            pages[i, h, :m] = torch.cat((older, torch.tensor([own]))).to(torch.int32)
    counts = [min(c, budget, (n - 1) // 16 + 1) if c > 0 and n > 0 else c
              for n, c in zip(seq_lens, counts, strict=True)]
    return rs.Selection(pages, torch.tensor(counts, dtype=torch.int32))


def _run_sparse(q, cache, table, seq_lens, sel, fmt, rotate, num_splits, shared,
                min_tiles=MIN_TILES_PER_SPLIT, scale=SCALE, unit=1):
    b, hq, d = q.shape
    out = torch.full((b, hq, d), float("nan"), dtype=q.dtype, device=DEV)  # poisoned
    partial_out = torch.full((num_splits * b * hq * d,), float("nan"), device=DEV)
    partial_lse = torch.full((num_splits * b * hq,), float("nan"), device=DEV)
    signs = rotation_signs(d).to(DEV) if rotate else None

    def run(positions, tiles):
        _ops().decode_sparse(
            out, q.to(DEV), cache.to(DEV), table.to(DEV),
            torch.tensor(seq_lens, dtype=torch.int32, device=DEV), positions.to(DEV),
            sel.counts.to(DEV), partial_out, partial_lse, signs, scale, fmt.bits,
            fmt.group_size, fmt.block_size, num_splits, min_tiles, shared, unit, tiles,
        )
        torch.cuda.synchronize()
        return out.cpu()

    got = run(sel.positions, None)
    if unit > 1:  # the pages as places in the cache (decode_select's sel_cache_tiles),
        # read in place of the positions, which are poisoned for it
        out.fill_(float("nan"))
        tiles = rs.cache_tiles(sel, table, fmt.block_size).to(DEV)
        poisoned = torch.full_like(sel.positions, NO_PAGE)
        assert torch.equal(run(poisoned, tiles), got), (
            "the cache tiles read other pages than the table")
    return got


def _reference(q, cache, table, seq_lens, sel, fmt, rotate, scale=SCALE):
    return rs.sparse_attention(q, cache, table, torch.tensor(seq_lens), sel, scale, fmt, rotate)


def _assert_rows_close(got, expected, what):
    assert torch.isfinite(got).all(), f"{what}: unwritten or NaN output"
    for i in range(got.shape[0]):
        if expected[i].abs().sum() == 0:  # padding row
            assert torch.equal(got[i], torch.zeros_like(got[i])), f"{what}: row {i} not zero"
            continue
        err = _rel_err(got[i], expected[i])
        assert err <= 1e-2, f"{what}: row {i} relative error {err:.2e}"


def _batch(seq_lens, kv_heads, gqa, fmt, dtype, rotate, gen):
    cache, table = _fill_pages(seq_lens, kv_heads, fmt, dtype, rotate, gen)
    for i, n in enumerate(seq_lens):
        if n == 0:
            table[i] = NO_PAGE
    q = torch.randn(len(seq_lens), kv_heads * gqa, 128, generator=gen).to(dtype)
    return q, cache, table


# ---- against the oracle -----------------------------------------------------------------
COUNTS = (1, 15, 16, 17, 255, 2048)
COUNT_SEQ_LENS = (1, 33, 16, 1000, 3001, 2049)  # a sequence per count: all, some, nearly all


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("shared", [False, True])
def test_sparse_matches_reference(dtype, bits, gqa, shared):
    gen = torch.Generator().manual_seed(100 * bits + 10 * gqa + shared)
    kv_heads, fmt, rotate = 2, PageFormat(128, bits, 128, 16), True
    # every count twice: positions in ascending order, then in random order
    seq_lens = list(COUNT_SEQ_LENS) * 2
    counts = list(COUNTS) * 2
    q, cache, table = _batch(seq_lens, kv_heads, gqa, fmt, dtype, rotate, gen)
    sel_heads, budget = (1 if shared else kv_heads), 2048 + 5
    half = len(COUNTS)
    sorted_sel = _selection(seq_lens[:half], counts[:half], sel_heads, budget, gen, True)
    random_sel = _selection(seq_lens[half:], counts[half:], sel_heads, budget, gen, False)
    sel = rs.Selection(torch.cat((sorted_sel.positions, random_sel.positions)),
                       torch.cat((sorted_sel.counts, random_sel.counts)))
    expected = _reference(q, cache, table, seq_lens, sel, fmt, rotate)
    for num_splits in (1, plan_num_splits(len(seq_lens), kv_heads, 132, 4), 64):
        got = _run_sparse(q, cache, table, seq_lens, sel, fmt, rotate, num_splits, shared)
        _assert_rows_close(got, expected, f"num_splits={num_splits}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("gqa", [6, 16])
def test_sparse_group_sizes_and_wide_gqa(dtype, bits, group_size, gqa):
    """Groups 32 and 64 gather 32 and 16 parameter bytes per token (8 at group 128); more
    than 8 query heads per KV head take the second MMA head tile, 6 leaves columns empty."""
    gen = torch.Generator().manual_seed(7 * gqa + bits + group_size)
    fmt, rotate = PageFormat(128, bits, group_size, 32), False
    seq_lens, counts = [20, 4000, 300], [17, 300, 64]
    q, cache, table = _batch(seq_lens, 2, gqa, fmt, dtype, rotate, gen)
    sel = _selection(seq_lens, counts, 2, 300, gen, False)
    expected = _reference(q, cache, table, seq_lens, sel, fmt, rotate)
    for num_splits in (1, 7):
        got = _run_sparse(q, cache, table, seq_lens, sel, fmt, rotate, num_splits, False)
        _assert_rows_close(got, expected, f"num_splits={num_splits}")


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_sparse_block_sizes(bits, block_size):
    """page = block_table[pos >> shift], slot = pos & (block_size - 1) for every page size."""
    gen = torch.Generator().manual_seed(block_size + bits)
    fmt, rotate = PageFormat(128, bits, 128, block_size), True
    seq_lens, counts = [40, 5000, 300], [33, 400, 300]
    q, cache, table = _batch(seq_lens, 2, 4, fmt, torch.bfloat16, rotate, gen)
    sel = _selection(seq_lens, counts, 2, 512, gen, False)
    expected = _reference(q, cache, table, seq_lens, sel, fmt, rotate)
    for num_splits in (1, 16):
        got = _run_sparse(q, cache, table, seq_lens, sel, fmt, rotate, num_splits, False)
        _assert_rows_close(got, expected, f"num_splits={num_splits}")


# ---- page granularity (selection_unit=16) -----------------------------------------------
@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_pages_match_reference(dtype, bits, gqa, shared, block_size):
    """Lists of 16-token pages (tiles), each read whole with one bulk copy, the own page
    last and partial, at every block size and GQA 1 / 4 / 8: the attention over their
    tokens below the length (reference_sparse.pages_to_positions)."""
    gen = torch.Generator().manual_seed(block_size + 10 * bits + shared + 100 * gqa)
    kv_heads, fmt, rotate = 2, PageFormat(128, bits, 128, block_size), True
    seq_lens = [0, 1, 16, 17, 300, 4001, 2049, 700]
    counts = [0, 1, 1, 2, 7, 128, DENSE_ROW, 44]
    q, cache, table = _batch(seq_lens, kv_heads, gqa, fmt, dtype, rotate, gen)
    sel_heads, budget = (1 if shared else kv_heads), 131
    pages = _page_selection(seq_lens, counts, sel_heads, budget, gen)
    tokens = rs.pages_to_positions(pages, torch.tensor(seq_lens), 16)
    expected = _reference(q, cache, table, seq_lens, tokens, fmt, rotate)
    for num_splits in (1, 5, 64):
        got = _run_sparse(q, cache, table, seq_lens, pages, fmt, rotate, num_splits, shared,
                          unit=16)
        _assert_rows_close(got, expected, f"num_splits={num_splits}")


@pytest.mark.parametrize("block_size", [16, 64])
def test_every_page_selected_is_the_dense_decode_bit_for_bit(block_size):
    """Every page in order is the dense kernel's walk over the same tiles."""
    gen = torch.Generator().manual_seed(block_size)
    fmt, rotate = PageFormat(128, 4, 128, block_size), True
    seq_lens = [37, 1000, 4096]
    q, cache, table = _batch(seq_lens, 2, 4, fmt, torch.bfloat16, rotate, gen)
    budget = 256
    pages = torch.full((3, 2, budget), -1, dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        pages[i, :, : (n + 15) // 16] = torch.arange((n + 15) // 16, dtype=torch.int32)
    sel = rs.Selection(pages, torch.tensor([(n + 15) // 16 for n in seq_lens],
                                           dtype=torch.int32))
    for num_splits in (1, 8):
        got = _run_sparse(q, cache, table, seq_lens, sel, fmt, rotate, num_splits, False,
                          unit=16)
        dense = _run_decode(q, cache, table, seq_lens, fmt, rotate, num_splits, SCALE)
        assert torch.equal(got, dense), f"num_splits={num_splits}"


@pytest.mark.parametrize("block_size", [16, 64])
def test_long_page_lists_refill_their_windows(block_size):
    """More than 64 tiles per warp in one split: a warp holds the places of its next 64
    listed tiles, in two windows of 32, and loads the window after as its copies reach
    the second (decode_kernel.cuh, `issue`), from the block table or from the cache
    places; _run_sparse reads both, which must agree bit for bit. Row 0 lists fewer
    pages than the budget, row 1 the whole budget (its first windows loaded beside the
    count); 100 and 150 tiles per warp in one split, 50 and 75 in two."""
    gen = torch.Generator().manual_seed(20 + block_size)
    fmt, rotate = PageFormat(128, 4, 128, block_size), True
    seq_lens, counts, budget = [8001, 12000], [400, 600], 600
    q, cache, table = _batch(seq_lens, 2, 4, fmt, torch.bfloat16, rotate, gen)
    pages = _page_selection(seq_lens, counts, 2, budget, gen)
    assert pages.counts.tolist() == counts
    tokens = rs.pages_to_positions(pages, torch.tensor(seq_lens), 16)
    expected = _reference(q, cache, table, seq_lens, tokens, fmt, rotate)
    for num_splits in (1, 2):
        got = _run_sparse(q, cache, table, seq_lens, pages, fmt, rotate, num_splits, False,
                          unit=16)
        _assert_rows_close(got, expected, f"num_splits={num_splits}")


# ---- dense rows, padding rows, counts out of range --------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_dense_rows_equal_the_dense_kernel_and_padding_rows_are_zero(dtype, bits, shared):
    gen = torch.Generator().manual_seed(31 * bits + shared)
    kv_heads, fmt, rotate = 2, PageFormat(128, bits, 128, 16), True
    # rows: sparse, dense, padding (CUDA-graph style: seq_len 0), dense of one token,
    # sparse, and a count-0 row of a real sequence whose pages must not be read either
    seq_lens = [5000, 700, 0, 1, 17, 50]
    counts = [300, DENSE_ROW, 0, DENSE_ROW, 17, 0]
    q, cache, table = _batch(seq_lens, kv_heads, 4, fmt, dtype, rotate, gen)
    sel = _selection(seq_lens, counts, 1 if shared else kv_heads, 512, gen, True)
    table_sparse = table.clone()
    table_sparse[5] = NO_PAGE
    expected = _reference(q, cache, table, seq_lens, sel, fmt, rotate)
    dense_rows = [i for i, c in enumerate(counts) if c == DENSE_ROW]
    for num_splits in (1, 7, 64):
        got = _run_sparse(q, cache, table_sparse, seq_lens, sel, fmt, rotate, num_splits,
                          shared)
        _assert_rows_close(got, expected, f"num_splits={num_splits}")
        for i, c in enumerate(counts):
            if c == 0:
                assert torch.equal(got[i], torch.zeros_like(got[i])), f"row {i} not zero"
        dense = _run_decode(q[dense_rows], cache, table[dense_rows],
                            [seq_lens[i] for i in dense_rows], fmt, rotate, num_splits, SCALE)
        same = torch.equal(got[dense_rows], dense)
        assert same, f"num_splits={num_splits}: DENSE_ROW rows differ from the dense kernel"


def test_counts_out_of_range_are_clamped():
    """Counts stay on the device, unchecked: above the budget reads the budget's positions,
    a negative count other than DENSE_ROW writes zeros."""
    gen = torch.Generator().manual_seed(4)
    fmt, rotate = PageFormat(128, 4, 128, 16), False
    seq_lens = [500, 500, 500]
    q, cache, table = _batch(seq_lens, 2, 4, fmt, torch.bfloat16, rotate, gen)
    budget = 40
    sel = _selection(seq_lens, [budget] * 3, 2, budget, gen, False)
    wild = rs.Selection(sel.positions, torch.tensor([budget + 100, 2**31 - 1, -7],
                                                    dtype=torch.int32))
    expected = _reference(q, cache, table, seq_lens, sel, fmt, rotate)
    expected[2] = 0
    for num_splits in (1, 5):
        got = _run_sparse(q, cache, table, seq_lens, wild, fmt, rotate, num_splits, False)
        _assert_rows_close(got, expected, f"num_splits={num_splits}")


# ---- splits -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 2])
def test_one_row_split_across_many_ctas(bits):
    """A 2048-position row over 132 splits: with min_tiles_per_split 1 every CTA gathers one
    tile (three of its four warps idle) and 4 CTAs are empty; next to a 1- and a 0-count row."""
    gen = torch.Generator().manual_seed(bits)
    fmt, rotate = PageFormat(128, bits, 128, 16), True
    seq_lens, counts = [20000, 3, 0], [2048, 1, 0]
    q, cache, table = _batch(seq_lens, 2, 4, fmt, torch.bfloat16, rotate, gen)
    sel = _selection(seq_lens, counts, 2, 2048, gen, False)
    expected = _reference(q, cache, table, seq_lens, sel, fmt, rotate)
    for min_tiles in (1, MIN_TILES_PER_SPLIT):
        got = _run_sparse(q, cache, table, seq_lens, sel, fmt, rotate, 132, False,
                          min_tiles=min_tiles)
        _assert_rows_close(got, expected, f"min_tiles_per_split={min_tiles}")


def test_sparse_under_cuda_graph_replay():
    """Captured with every row padding, replayed after positions, counts, lengths and
    queries were written in place (as a selection layer does between replays)."""
    gen = torch.Generator().manual_seed(5)
    fmt, rotate = PageFormat(128, 4, 128, 16), True
    seq_lens, counts = [700, 1500, 33], [64, DENSE_ROW, 20]
    cache, table = _fill_pages(seq_lens, 8, fmt, torch.bfloat16, rotate, gen)
    b, hq, budget = 3, 32, 64
    sel = _selection(seq_lens, counts, 8, budget, gen, True)
    splits = plan_num_splits(b, 8, 132, 4)
    cache_d, table_d = cache.to(DEV), table.to(DEV)
    q = torch.zeros(b, hq, 128, dtype=torch.bfloat16, device=DEV)
    lens = torch.zeros(b, dtype=torch.int32, device=DEV)
    positions = torch.zeros(b, 8, budget, dtype=torch.int32, device=DEV)
    count = torch.zeros(b, dtype=torch.int32, device=DEV)
    out, po, pl, signs = _graph_buffers(b, hq, splits)
    ops = _ops()

    def step():
        ops.decode_sparse(out, q, cache_d, table_d, lens, positions, count, po, pl, signs,
                          SCALE, 4, 128, 16, splits, MIN_TILES_PER_SPLIT, False)

    graph = _captured(step)
    q_new = torch.randn(b, hq, 128, generator=gen).to(torch.bfloat16)
    q.copy_(q_new)
    lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    positions.copy_(sel.positions)
    count.copy_(sel.counts)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = _reference(q_new, cache, table, seq_lens, sel, fmt, rotate)
    _assert_rows_close(out.cpu(), expected, "graph replay")


def _tokens_with_the_newest(seq_lens, sel_heads, budget, gen):
    """Per row and selection head, min(length, budget) ascending positions, the newest
    among them; slots past the count hold other positions of the sequence."""
    rows = len(seq_lens)
    positions = torch.zeros(rows, sel_heads, budget, dtype=torch.int32)
    counts = [min(n, budget) for n in seq_lens]
    for i, (n, m) in enumerate(zip(seq_lens, counts, strict=True)):
        for h in range(sel_heads):
            older = torch.randperm(n - 1, generator=gen)[: m - 1]
            chosen = torch.cat((older, torch.tensor([n - 1]))).sort().values
            positions[i, h] = torch.randint(0, n, (budget,), generator=gen)
            positions[i, h, :m] = chosen.to(torch.int32)
    return rs.Selection(positions, torch.tensor(counts, dtype=torch.int32))


@pytest.mark.parametrize("unit", [1, 16], ids=["tokens", "pages"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_sparse_decode_right_after_the_write_sees_the_written_token(unit, graph):
    """A reuse layer is a programmatic dependent of the step's KV-cache write too: its
    selections hold the newest token, which the write puts in place right before it
    (tests.gpu.test_kernels.check_decode_right_after_the_write)."""
    gen = torch.Generator().manual_seed(31 + unit)
    pages = PerTokenPages(8, 8, 4, gen)
    seq_lens, budget = pages.seq_lens, 64
    if unit == 1:
        sels = [_tokens_with_the_newest(seq_lens, pages.kv_heads, budget, gen)
                for _ in range(pages.layers)]
        tokens = sels
    else:  # the own page last
        sels = [_page_selection(seq_lens, [budget] * len(seq_lens), pages.kv_heads, budget, gen)
                for _ in range(pages.layers)]
        tokens = [rs.pages_to_positions(x, torch.tensor(seq_lens), 16) for x in sels]
    on_device = [(x.positions.to(DEV), x.counts.to(DEV)) for x in sels]

    def decode(layer, out, q):
        positions, counts = on_device[layer]
        _ops().decode_sparse(out, q, pages.caches[layer], pages.tables[layer], pages.lens,
                             positions, counts, pages.partial_out, pages.partial_lse,
                             pages.signs, SCALE, 4, 128, 16, pages.splits, MIN_TILES_PER_SPLIT,
                             False, unit)

    def reference(layer, q, state):
        cache, table = state
        return _reference(q, cache, table, seq_lens, tokens[layer], pages.fmt, True)

    check_decode_right_after_the_write(pages, decode, reference, graph, gen)


# ---- the op's arguments -----------------------------------------------------------------
def test_wrapper_matches_the_op_schema():
    ops = _ops()
    schema = torch.ops.bitdecode.decode_sparse.default._schema
    names = [a.name for a in schema.arguments]
    assert names == list(inspect.signature(ops.decode_sparse).parameters)


BAD_SPARSE_CALL = BAD_CALL_SETUP + """
pos = torch.arange(16, dtype=torch.int32, device="cuda").view(1, 1, 16).repeat(1, 2, 1)
count = torch.tensor([5], dtype=torch.int32, device="cuda")
tiles = torch.zeros_like(pos)
a = dict(pos=pos, count=count, shared=False, group=128, unit=1, tiles=None)
a.update({kwargs})
o.decode_sparse(out, q, cache, table, lens, a["pos"], a["count"], ws, ws, None, 0.1, 4,
                a["group"], 16, 1, 8, a["shared"], a["unit"], a["tiles"])
torch.cuda.synchronize()
print("OK")
"""


BAD_SPARSE_CASES = [
    ("", None),  # the valid call works
    ("pos=pos[:, :1], shared=True", None),  # one shared set
    ("pos=pos.long()", "sel_positions must be a CUDA int32"),
    ("pos=pos.cpu()", "sel_positions must be a CUDA int32"),
    ("pos=pos[0]", "sel_positions must be a CUDA int32"),
    ("pos=pos[:0]", "sel_positions has 0 rows for 1 sequences"),
    ("shared=True", "sel_positions has 2 heads, expected 1"),
    ("pos=pos[:, :1]", "sel_positions has 1 heads, expected 2"),
    ("pos=pos[:, :, :0]", "budget of 1 to 2147483632 positions"),
    # a row's tokens are counted in int32: (budget - 1) * 16 + 16 must stay below 2^31
    ("pos=torch.zeros(1, 1, 2**27, dtype=torch.int32, device='cuda'), shared=True, "
     "unit=16", "budget of 1 to 134217727 pages, got 134217728"),
    # the decode writes out, and must not write what it reads
    ("count=out.view(-1)[:2].view(torch.int32)", "out shares memory with sel_count"),
    ("count=count.clamp(max=1), unit=16", None),  # one 16-token page, read whole
    ("count=count.clamp(max=1), unit=16, tiles=tiles", None),  # its place in the cache given
    ("tiles=tiles", "pass them with selection_unit 16 only, got selection_unit 1"),
    ("unit=16, tiles=tiles[:, :1]", "sel_cache_tiles must be a CUDA int32 tensor of "
                                    "sel_positions' shape"),
    ("unit=16, tiles=tiles.cpu()", "sel_cache_tiles must be a CUDA int32 tensor"),
    ("unit=16, tiles=out.view(-1)[:64].view(torch.int32).view(1, 2, 16)",
     "out shares memory with sel_cache_tiles"),
    ("pos=pos.transpose(1, 2).contiguous().transpose(1, 2)", "contiguous in its last dimension"),
    ("count=count.long()", "sel_count must be a contiguous CUDA int32"),
    ("count=count[:0]", "sel_count must be a contiguous CUDA int32"),
    ("count=count.cpu()", "sel_count must be a contiguous CUDA int32"),
    ("group=48", "group_size must be 32, 64 or 128"),
    ("unit=0", "selection_unit must be 1 (tokens) or 16 (16-token pages), got 0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_SPARSE_CASES)
def test_sparse_bad_arguments_raise_clear_errors(kwargs, message):
    expect_table_case(BAD_SPARSE_CALL, kwargs, message, BAD_SPARSE_CASES)
