"""Per-channel K mode's reads (issue #7): ``ops.decode_kc`` against
``reference_kc.paged_decode_kc`` (float32, CPU), and ``ops.dequantize_pages_kc`` (the
prefill's closed pages) against ``reference_kc.read_pages_kc`` bit for bit.

For both, the pages and residuals are written by the reference (``write_tokens_kc``, each sequence
prefilled in one step), so every page before a sequence's own page is quantized per
channel, and the own page's K and V sit in the sequence's residual slot while the page's
K rows still hold garbage (partial page) or the quantized copy (a page filled by the
query's own token). The residual rows are then negated: both the reference and the
kernel must take the own page's keys and values from the residual, so a kernel that reads
either from the page fails by far, for the just-filled page too. Outputs are poisoned, blocks
and residual slots permuted, a padding row (seq_len 0) must come out as zeros.
"""

from __future__ import annotations

import pytest
import torch

from tests.clear_errors import expect_table_case
from tests.gpu.test_kernels import (
    DEV,
    WRITE_THEN_DECODE_SEQ_LENS,
    _graph_buffers,
    _ops,
    _rel_err,
    check_decode_right_after_the_write,
    last_token_slots,
)
from vllm_bitdecode import reference_kc as kc
from vllm_bitdecode.backend.metadata import MIN_TILES_PER_SPLIT, plan_num_splits
from vllm_bitdecode.page_format import PageFormat

pytestmark = pytest.mark.gpu

KV_HEADS, SCALE = 2, 128**-0.5


def _keys(n: int, dtype: torch.dtype, gen: torch.Generator, offset: float = 3.0) -> torch.Tensor:
    """A token-independent part and an outlier channel, as real models' keys have."""
    base = torch.randn(KV_HEADS, 128, generator=gen) * offset
    k = torch.randn(n, KV_HEADS, 128, generator=gen) + base
    k[:, :, 7] *= 20
    return k.to(dtype)


def _build(seq_lens, layout, dtype, gen, num_slots, offset=3.0):
    """Channel-mode pages and residual for sequences prefilled in one step each."""
    bs = layout.block_size
    blocks_per_seq = [max(1, -(-n // bs)) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    cache = torch.randint(0, 256, (num_blocks, KV_HEADS, layout.head_region_bytes),
                          dtype=torch.uint8, generator=gen)
    residual = kc.new_residual(num_slots, KV_HEADS, layout, dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    row_slot = torch.randperm(num_slots, generator=gen)[: len(seq_lens)].to(torch.int32)
    nxt = 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        table[i, :nb] = perm[nxt : nxt + nb].to(torch.int32)
        nxt += nb
        if n == 0:
            continue
        k = _keys(n, dtype, gen, offset)
        v = (torch.randn(n, KV_HEADS, 128, generator=gen) * 2).to(dtype)
        pos = torch.arange(n)
        slots = table[i, pos // bs].long() * bs + pos % bs
        kc.write_tokens_kc(cache, residual, k, v, slots, torch.tensor([0, n], dtype=torch.int32),
                           torch.tensor([n], dtype=torch.int32), row_slot[i : i + 1], layout)
    return cache, -residual, table, row_slot


def _run(q, cache, residual, table, seq_lens, row_slot, fmt, num_splits, k_param_bits=16):
    b, hq, d = q.shape
    out = torch.full((b, hq, d), float("nan"), dtype=q.dtype, device=DEV)  # poisoned
    partial_out = torch.full((num_splits * b * hq * d,), float("nan"), device=DEV)
    partial_lse = torch.full((num_splits * b * hq,), float("nan"), device=DEV)
    _ops().decode_kc(out, q.to(DEV), cache.to(DEV), residual.to(DEV), table.to(DEV),
                     seq_lens.to(DEV), row_slot.to(DEV), partial_out, partial_lse, SCALE,
                     fmt.bits, fmt.group_size, fmt.block_size, num_splits, MIN_TILES_PER_SPLIT,
                     k_param_bits)
    torch.cuda.synchronize()
    return out.cpu()


@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("gqa", [1, 4, 8, 12])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_kc_matches_reference(dtype, bits, group_size, gqa, block_size):
    _check_decode(dtype, bits, group_size, gqa, block_size, 16)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("gqa", [1, 8, 12])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_kc_with_fp8_params_matches_reference(dtype, bits, gqa, block_size):
    """K params in e4m3, keys with channels centred up to about +-90 (where rounding zc
    after the scale would have missed by several steps)."""
    _check_decode(dtype, bits, 128, gqa, block_size, 8, offset=30.0)


def _check_decode(dtype, bits, group_size, gqa, block_size, k_param_bits, offset=3.0):
    gen = torch.Generator().manual_seed(1000 * bits + 10 * gqa + group_size + block_size)
    bs = block_size
    fmt = PageFormat(128, bits, group_size, bs)
    layout = kc.KCPageLayout(fmt, k_param_bits)
    # one token; inside the first page; exactly one page (its own token filled it); one
    # past; a long odd one; pages just filled further on; a padding row
    seq_lens = torch.tensor([1, bs // 2 + 3, bs, bs + 1, 1999, 4 * bs, 0], dtype=torch.int32)
    cache, residual, table, row_slot = _build(seq_lens.tolist(), layout, dtype, gen, 11, offset)
    q = torch.randn(len(seq_lens), KV_HEADS * gqa, 128, generator=gen).to(dtype)
    expected = kc.paged_decode_kc(q, cache, residual, table, seq_lens, row_slot, SCALE, layout)
    live = seq_lens > 0
    for num_splits in (1, plan_num_splits(len(seq_lens), KV_HEADS, 132, 4), 64):
        got = _run(q, cache, residual, table, seq_lens, row_slot, fmt, num_splits, k_param_bits)
        assert torch.isfinite(got).all(), f"unwritten or NaN output, num_splits={num_splits}"
        assert (got[~live] == 0).all(), f"padding row not zero, num_splits={num_splits}"
        errs = [_rel_err(got[i], expected[i]) for i in range(len(seq_lens)) if live[i]]
        assert max(errs) <= 1e-2, (
            f"num_splits={num_splits}: relative error per sequence "
            f"{dict(zip(seq_lens[live].tolist(), (f'{e:.1e}' for e in errs), strict=True))}")


@pytest.mark.parametrize("k_param_bits", [16, 8], ids=["fp16-params", "fp8-params"])
@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dequantize_kc_matches_reference_bit_for_bit(dtype, bits, group_size, block_size,
                                                     k_param_bits):
    """V of every token and K of every full page; a partial page's K rows are garbage
    (its keys live in the residual) and are not compared."""
    gen = torch.Generator().manual_seed(7 * bits + group_size + block_size)
    bs = block_size
    layout = kc.KCPageLayout(PageFormat(128, bits, group_size, bs), k_param_bits)
    seq_lens = [1, bs, 3 * bs + 5, 333, 0]
    cache, _, table, _ = _build(seq_lens, layout, dtype, gen, 6)
    out_start = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32)
    total = int(out_start[-1])
    k_out = torch.full((total + 2, KV_HEADS, 128), float("nan"), dtype=dtype, device=DEV)
    v_out = torch.full_like(k_out, float("nan"))
    _ops().dequantize_pages_kc(cache.to(DEV), table.to(DEV),
                               torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
                               out_start.to(DEV), k_out, v_out, bits, group_size, bs,
                               max(seq_lens), k_param_bits)
    torch.cuda.synchronize()
    k_out, v_out = k_out.cpu(), v_out.cpu()
    assert k_out[total:].isnan().all() and v_out[total:].isnan().all(), "wrote past the end"
    for i, n in enumerate(seq_lens):
        if n == 0:
            continue
        k, v = kc.read_pages_kc(cache, table[i, : -(-n // bs)], layout, dtype)
        rows = slice(int(out_start[i]), int(out_start[i]) + n)
        full = n // bs * bs
        assert torch.equal(v_out[rows].view(torch.int16), v[:n].to(dtype).view(torch.int16)), \
            f"sequence {i} (n={n}): V differs"
        assert torch.equal(k_out[rows][:full].view(torch.int16),
                           k[:full].to(dtype).view(torch.int16)), \
            f"sequence {i} (n={n}): K of full pages differs"


class ChannelKPages:
    """check_decode_right_after_the_write's cache in channel mode (4 bits, V group 128,
    pages of 16, fp16 K params): per layer, pages and residual slots that the reference
    wrote for WRITE_THEN_DECODE_SEQ_LENS tokens (_build). The step's write
    (``ops.write_tokens_kc``, three kernels) puts a new token in place of each sequence's
    last: its V into the page, its K and V rows into the residual, which is where the
    decode reads the own page from, and a page whose last slot it fills quantized again."""

    fmt = PageFormat(128, 4, 128, 16)

    def __init__(self, layers: int, gqa: int, gen: torch.Generator):
        self.seq_lens = list(WRITE_THEN_DECODE_SEQ_LENS)
        self.layers, self.kv_heads, self.gqa = layers, KV_HEADS, gqa
        self.layout = kc.KCPageLayout(self.fmt, 16)
        b = len(self.seq_lens)
        self.caches, self.residuals, self.tables, self.row_slots, self.slots = [], [], [], [], []
        for _ in range(layers):
            cache, residual, table, row_slot = _build(self.seq_lens, self.layout, torch.bfloat16,
                                                      gen, b + 3)
            self.caches.append(cache.to(DEV))
            self.residuals.append(residual.to(DEV))
            self.tables.append(table.to(DEV))
            self.row_slots.append(row_slot.to(DEV))
            self.slots.append(last_token_slots(table, self.seq_lens))
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=DEV)
        self.lens = torch.tensor(self.seq_lens, dtype=torch.int32, device=DEV)
        self.splits = plan_num_splits(b, KV_HEADS, 132, 4)
        _, self.partial_out, self.partial_lse, _ = _graph_buffers(b, KV_HEADS * gqa,
                                                                  self.splits)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        _ops().write_tokens_kc(key, value, self.slots[layer], self.query_start_loc, self.lens,
                               self.row_slots[layer], self.caches[layer], self.residuals[layer],
                               4, 128, 16, 16)

    def state(self, layer: int) -> tuple[torch.Tensor, ...]:
        return (self.caches[layer].to("cpu", copy=True),
                self.residuals[layer].to("cpu", copy=True), self.tables[layer].cpu(),
                self.row_slots[layer].cpu())


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_decode_kc_right_after_the_write_sees_the_written_token(graph):
    """The channel-mode decode is a programmatic dependent of the write's last kernel
    (kc_value_residual_kernel), which lets it start at once: it must wait before it reads the
    residual rows that kernel writes (tests.gpu.test_kernels.
    check_decode_right_after_the_write)."""
    gen = torch.Generator().manual_seed(61)
    pages = ChannelKPages(8, 4, gen)
    lens_cpu = torch.tensor(pages.seq_lens, dtype=torch.int32)

    def decode(layer, out, q):
        _ops().decode_kc(out, q, pages.caches[layer], pages.residuals[layer], pages.tables[layer],
                         pages.lens, pages.row_slots[layer], pages.partial_out,
                         pages.partial_lse, SCALE, 4, 128, 16, pages.splits,
                         MIN_TILES_PER_SPLIT, 16)

    def reference(layer, q, state):
        cache, residual, table, row_slot = state
        return kc.paged_decode_kc(q, cache, residual, table, lens_cpu, row_slot, SCALE,
                                  pages.layout)

    check_decode_right_after_the_write(pages, decode, reference, graph, gen)


BAD_KC_CALL = """
import torch, vllm_bitdecode.ops as o
from vllm_bitdecode.page_format import PageFormat
from vllm_bitdecode.reference_kc import KCPageLayout
layout = KCPageLayout(PageFormat(128, 4, 128, 16))
cache = torch.zeros(4, 2, layout.head_region_bytes, dtype=torch.uint8, device="cuda")
q = torch.randn(1, 8, 128, dtype=torch.bfloat16, device="cuda")
out = torch.empty_like(q)
table = torch.zeros(1, 4, dtype=torch.int32, device="cuda")
lens = torch.tensor([20], dtype=torch.int32, device="cuda")
ws = torch.empty(1024 * 128, device="cuda")
a = dict(cache=cache, residual=torch.zeros(3, 2, 2, 16, 128, dtype=torch.bfloat16,
                                                   device="cuda"),
         row_slot=torch.zeros(1, dtype=torch.int32, device="cuda"), block_size=16,
         k_param_bits=16)
a.update({kwargs})
o.decode_kc(out, q, a["cache"], a["residual"], table, lens, a["row_slot"], ws, ws, 0.1, 4, 128,
            a["block_size"], 1, 8, a["k_param_bits"])
torch.cuda.synchronize()
print("OK")
"""


BAD_KC_CASES = [
    ("", None),  # the valid call works
    ("residual=a['residual'].half()", "residual must be a contiguous CUDA tensor"),
    ("residual=a['residual'][:, :1]", "residual must be a contiguous CUDA tensor"),
    ("residual=torch.zeros(3 * 2 * 2 * 16 * 128 + 8, dtype=torch.bfloat16, device='cuda')"
     "[1:3 * 2 * 2 * 16 * 128 + 1].view(3, 2, 2, 16, 128)", "residual must start 16-byte aligned"),
    ("row_slot=a['row_slot'].long()", "row_slot must be a contiguous CUDA int32"),
    # the decode writes out, and must not write what it reads
    ("row_slot=out.view(-1)[:2].view(torch.int32)", "out shares memory with row_slot"),
    ("cache=torch.zeros(4, 2, 2176, dtype=torch.uint8, device='cuda')", "channel-mode page"),
    ("block_size=256", "block size"),
    ("k_param_bits=12", "k_param_bits must be 16 (fp16 K params) or 8 (e4m3), got 12"),
    ("k_param_bits=8", "channel-mode page format needs 2368"),  # fp16-param pages
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_KC_CASES)
def test_decode_kc_bad_arguments_raise_clear_errors(kwargs, message):
    expect_table_case(BAD_KC_CALL, kwargs, message, BAD_KC_CASES)
