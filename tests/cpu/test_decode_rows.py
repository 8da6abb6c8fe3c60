"""Decode requests of several query tokens (speculative drafts under verification, short
prefill chunks) as one decode-kernel row per token, on the CPU.

With speculative decoding vLLM counts a request of up to 1 + num_speculative_tokens
query tokens as a decode. The builder gives each of its tokens a row of its own, whose
length stops at that token (causal) and whose block-table row is its request's, in
persistent buffers so that CUDA graphs replay on them. Here the decode kernel,
dequantize and FlashAttention are replaced by the reference; the kernels are tested on
the GPU.
"""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch

from tests.cpu.attention_stand_ins import (
    assert_layer_matches,
    dequantize_pages,
    flash_attn_varlen,
    random_pages,
)
from vllm_bitdecode import config as bd_config
from vllm_bitdecode import reference as ref
from vllm_bitdecode.backend.metadata import (
    MAX_DECODE_ROWS,
    BitDecodeMetadataBuilder,
    check_decode_rows,
    decode_rows,
    group_heads,
    packs_query_tokens,
    plan_num_splits,
)
from vllm_bitdecode.config import BitDecodeConfig
from vllm_bitdecode.page_format import rotation_signs

HEADS, KV_HEADS, D, BLOCK = 8, 2, 128, 16
SCALE = D**-0.5


def test_decode_rows_fit_one_launch_or_start_up_refuses():
    check_decode_rows(MAX_DECODE_ROWS, MAX_DECODE_ROWS, 1)
    with pytest.raises(bd_config.BitDecodeConfigError,
                       match=r"at most 65535 rows .* --max-num-seqs 20000 x 4 query tokens "
                             r"\(a decode row each\) allows 80000; lower"):
        check_decode_rows(80000, 20000, 4)
    with pytest.raises(bd_config.BitDecodeConfigError, match="--max-num-seqs 70000 allows"):
        check_decode_rows(70000, 70000, 1)


def test_the_plan_follows_the_builders_layers_not_the_first_layer():
    """DeciLM / Nemotron-NAS give each layer its own KV heads; vLLM's model-wide counts
    are the first layer's, and it makes a builder per KV-head count. A builder of 2-KV-head
    layers plans for 2 KV heads and 16 query heads each: then 4 query tokens do not fit
    beside the heads (16 rows at most), as they would at the model-wide 4."""
    layer = types.SimpleNamespace
    model = (32, 8)
    narrow = [layer(num_heads=32, num_kv_heads=2)] * 3
    assert group_heads(narrow, model) == (32, 2, 16)
    assert group_heads([], model) == (32, 8, 4)  # no layers found: the model-wide counts
    # layers of one KV-head count but different query heads: the most of each
    assert group_heads([layer(num_heads=32, num_kv_heads=8),
                        layer(num_heads=64, num_kv_heads=8)], model) == (64, 8, 8)
    cfg = BitDecodeConfig(bits=4)
    assert packs_query_tokens(4, group_heads([], model)[2], cfg)
    assert not packs_query_tokens(4, group_heads(narrow, model)[2], cfg)


def test_decode_rows_by_hand():
    # three requests of 1, 3 and 2 query tokens
    request, after = decode_rows([0, 1, 4, 6, 9], 3)
    assert request.tolist() == [0, 1, 1, 1, 2, 2]
    assert after.tolist() == [0, 2, 1, 0, 1, 0]
    assert request.dtype == after.dtype == np.int32
    empty = decode_rows([0, 0, 2], 1)  # a padding request of no tokens has no rows
    assert empty[0].tolist() == [] and empty[1].tolist() == []


@pytest.mark.parametrize("seed", range(10))
def test_decode_rows_are_the_query_tokens_in_order(seed):
    rng = random.Random(seed)
    counts = [rng.randint(0, 5) for _ in range(rng.randint(1, 12))]
    qsl = np.concatenate([[0], np.cumsum(counts)]).tolist()
    nd = rng.randint(0, len(counts))
    request, after = decode_rows(qsl, nd)
    assert len(request) == qsl[nd]
    for token in range(qsl[nd]):  # row = query token
        r = int(request[token])
        assert qsl[r] <= token < qsl[r + 1]
        assert after[token] == qsl[r + 1] - 1 - token


def _builder(cfg: BitDecodeConfig, max_rows: int, max_blocks: int, poison: int = -7,
             drafts: int = 3, pack: bool = False):
    """A builder without vLLM's constructor: the fields build() reads; decodes of up to
    1 + ``drafts`` query tokens, as vLLM sets it up with that many speculative tokens,
    as rows (one per token) or with ``pack`` as requests whose tokens the kernel reads
    beside the heads."""
    b = BitDecodeMetadataBuilder.__new__(BitDecodeMetadataBuilder)
    b.bitdecode = cfg
    b.pack_queries = pack
    b.page_format = cfg.page_format(D, BLOCK)
    b.kv_cache_spec = types.SimpleNamespace(block_size=BLOCK)
    b.device = torch.device("cpu")
    b.reorder_batch_threshold = 1 + drafts
    b.num_kv_heads, b.num_sms, b.ctas_per_sm = KV_HEADS, 132, 4
    b.rotation_signs = rotation_signs(D) if cfg.rotate_k else None
    b.partial_out, b.partial_lse = torch.zeros(1), torch.zeros(1)
    b.sparse = b.row_slots = None
    b.prefill_workspace_rows = 4096
    b._row_seq_lens = torch.full((max_rows,), poison, dtype=torch.int32)
    b._row_block_table = torch.full((max_rows, max_blocks), poison, dtype=torch.int32)
    return b


def _step(cfg: BitDecodeConfig, seed: int):
    """A step of decode requests of 1-4 query tokens, then prefills, over random permuted
    pages: the cache, the batch's metadata fields as vLLM passes them, and the reference
    output (every query token attending causally to its request's pages)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    fmt = cfg.page_format(D, BLOCK)
    num_decodes, num_prefills = rng.randint(1, 6), rng.randint(0, 2)
    qlens = [rng.randint(1, 4) for _ in range(num_decodes)]
    qlens += [rng.randint(5, 40) for _ in range(num_prefills)]
    lens = [q + rng.randint(0, 300) for q in qlens]
    # a table wider than any context: columns the kernel must not read
    cache, table = random_pages(fmt, cfg.rotate_k, lens, KV_HEADS, gen, spare_blocks=2)
    qsl = torch.tensor([0, *np.cumsum(qlens).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), HEADS, D, generator=gen).to(torch.bfloat16)
    cam = types.SimpleNamespace(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens,
        seq_lens_cpu_upper_bound=seq_lens, num_reqs=len(lens), num_actual_tokens=q.shape[0],
        max_query_len=max(qlens), max_seq_len=max(lens), block_table_tensor=table,
        slot_mapping=torch.zeros(q.shape[0], dtype=torch.int64), is_prefilling=None)
    want = ref.paged_attention(q, cache, table, seq_lens, qsl, SCALE, fmt, cfg.rotate_k)
    return q, cache, cam, want, qlens, num_decodes


@pytest.mark.parametrize("seed", range(6))
def test_builder_gives_each_decode_token_a_row(seed):
    cfg = BitDecodeConfig(bits=4)
    bd_config.set_active(cfg)
    q, cache, cam, _, qlens, num_decodes = _step(cfg, seed)
    builder = _builder(cfg, max_rows=64, max_blocks=cam.block_table_tensor.shape[1] + 3)
    md = builder.build(0, cam)
    rows = sum(qlens[:num_decodes])
    assert md.num_decodes == rows and md.num_decode_tokens == rows
    assert md.num_splits == plan_num_splits(rows, KV_HEADS, 132, 4)
    token = 0
    for r in range(num_decodes):
        n = int(cam.seq_lens[r])
        for t in range(qlens[r]):
            assert int(md.decode_seq_lens[token]) == n - (qlens[r] - 1 - t)
            used = -(-int(md.decode_seq_lens[token]) // BLOCK)
            assert torch.equal(md.decode_block_table[token, :used],
                               cam.block_table_tensor[r, :used])
            token += 1
    # the rows live in the persistent buffers that graphs capture
    assert md.decode_seq_lens.data_ptr() == builder._row_seq_lens.data_ptr()
    assert md.decode_block_table.data_ptr() == builder._row_block_table.data_ptr()
    assert (md.prefill is None) == (len(qlens) == num_decodes)


def _decode_batch(qsl: list[int], seq_lens: list[int],
                  num_tokens: int | None = None) -> types.SimpleNamespace:
    """vLLM's metadata fields for a batch of decodes only (4 pages per request);
    ``num_tokens`` past ``qsl[-1]`` are a CUDA-graph batch's padding."""
    n = len(seq_lens)
    num_tokens = num_tokens or qsl[-1]
    return types.SimpleNamespace(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        query_start_loc_cpu=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=n,
        num_actual_tokens=num_tokens, max_query_len=max(np.diff(qsl)),
        max_seq_len=max(seq_lens),
        block_table_tensor=torch.arange(4 * n, dtype=torch.int32).view(n, 4),
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64))


def test_without_drafts_decodes_keep_vllms_tensors():
    builder = _builder(BitDecodeConfig(bits=4), max_rows=8, max_blocks=4, drafts=0)
    cam = _decode_batch([0, 1, 2, 3], [5, 17, 40])
    md = builder.build(0, cam)
    assert md.num_decodes == 3 and md.decode_seq_lens.data_ptr() == cam.seq_lens.data_ptr()
    assert md.decode_block_table.data_ptr() == cam.block_table_tensor.data_ptr()
    assert (builder._row_seq_lens == -7).all()  # untouched


def test_with_drafts_one_token_decodes_use_the_row_buffers():
    """With speculative decoding a step whose requests got no drafts still goes through
    the row buffers, the same ones every step."""
    builder = _builder(BitDecodeConfig(bits=4), max_rows=8, max_blocks=4)
    cam = _decode_batch([0, 1, 2, 3], [5, 17, 40])
    md = builder.build(0, cam)
    assert md.decode_seq_lens.tolist() == [5, 17, 40]
    assert md.decode_seq_lens.data_ptr() == builder._row_seq_lens.data_ptr()
    assert torch.equal(md.decode_block_table[:, :3], cam.block_table_tensor[:, :3])


def test_padding_of_a_captured_batch_gets_empty_rows():
    """vLLM pads a CUDA-graph batch of 1 + 2 drafts per request to a captured size with
    requests of no query tokens (query_start_loc stays flat) and seq_len 0: the rows go
    on to the padded token count, the padding's with length 0 (the buffers held other
    values before)."""
    builder = _builder(BitDecodeConfig(bits=4), max_rows=16, max_blocks=4, drafts=2)
    md = builder.build(0, _decode_batch([0, 3, 3, 3], [20, 0, 0], num_tokens=9))
    assert md.num_decodes == 9 and md.num_decode_tokens == 9
    assert md.decode_seq_lens.tolist() == [18, 19, 20, 0, 0, 0, 0, 0, 0]


@pytest.fixture
def impl_mod(monkeypatch):
    """The impl module with the decode kernel, dequantize_pages and FlashAttention
    replaced by the reference."""
    from vllm.v1.attention.backends import fa_utils

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", flash_attn_varlen, raising=False)
    from vllm_bitdecode.backend import impl as mod

    def decode(out, q, cache, table, seq_lens, partial_out, partial_lse, signs, scale, bits,
               group_size, block_size, num_splits, min_tiles, query_start_loc=None,
               max_query_len=1):
        fmt = bd_config.get_active().page_format(D, block_size)
        assert out.shape[0] == q.shape[0] and seq_lens.shape[0] == table.shape[0]
        qsl = query_start_loc
        if qsl is None:  # one query token per sequence
            assert max_query_len == 1 and q.shape[0] == seq_lens.shape[0]
            qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        assert qsl.shape[0] == seq_lens.shape[0] + 1 and int(qsl.diff().max()) <= max_query_len
        got = ref.paged_attention(q, cache, table, seq_lens, qsl, scale, fmt, signs is not None)
        real = int(qsl[-1])  # rows past the requests' tokens (padding) are not written
        out[:real].copy_(got[:real].to(out.dtype))

    monkeypatch.setattr(mod.ops, "decode", decode)
    monkeypatch.setattr(mod.ops, "dequantize_pages", dequantize_pages)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the impl checks the model dtype
    yield mod
    torch.set_default_dtype(default)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("rotate_k", [True, False])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pack", [False, True], ids=["rows", "tokens"])
def test_multi_token_decodes_match_causal_attention(impl_mod, bits, rotate_k, seed, pack):
    """Every query token of a step with multi-token decodes and prefills, through the
    builder and the impl with the output poisoned, against the reference: as a row per
    token, and as requests whose tokens the kernel reads beside the heads."""
    cfg = BitDecodeConfig(bits=bits, rotate_k=rotate_k)
    bd_config.set_active(cfg)
    q, cache, cam, want, qlens, num_decodes = _step(cfg, seed)
    md = _builder(cfg, 64, cam.block_table_tensor.shape[1], pack=pack).build(0, cam)
    assert (md.decode_query_start is not None) == pack
    impl = impl_mod.BitDecodeAttentionImpl(HEADS, D, SCALE, KV_HEADS, None, None, "auto")
    assert_layer_matches(impl, q, cache, md, want)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("extend", [1, 2])
def test_drafter_prefill_rows_see_the_lengths_vllm_extended(impl_mod, seed, extend):
    """vLLM 0.20's drafters (a draft model's first pass: N = 1; parallel drafting: N =
    k - 1) lengthen every query and context by N with its extend_all_queries_by_N, which
    leaves seq_lens_cpu_upper_bound N short. Rows pushed past the decode threshold then
    go through the prefill path, whose host plan must use the true lengths: through
    build_for_drafting each query token attends exactly to its request's pages. (With
    the stale bound each context is N rows longer than its plan, which the stand-in
    read-back refuses; the kernel would write them over the next request's rows.)"""
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.spec_decode.utils import extend_all_queries_by_N

    cfg = BitDecodeConfig(bits=4)
    bd_config.set_active(cfg)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    fmt = cfg.page_format(D, BLOCK)
    # the target's step: decode requests of up to 1 + 3 drafts (the first with all
    # three), then prefill chunks
    qlens = [4] + [rng.randint(1, 4) for _ in range(rng.randint(0, 4))]
    qlens += [rng.randint(5, 40) for _ in range(rng.randint(0, 2))]
    lens = [q + rng.randint(0, 200) for q in qlens]
    ext_lens = [n + extend for n in lens]  # what the drafter's pass attends to
    cache, table = random_pages(fmt, cfg.rotate_k, ext_lens, KV_HEADS, gen, spare_blocks=2)
    qsl = torch.tensor([0, *np.cumsum(qlens).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    n_tok = int(qsl[-1])
    cam = CommonAttentionMetadata(
        query_start_loc=qsl.clone(), query_start_loc_cpu=qsl.clone(), seq_lens=seq_lens.clone(),
        num_reqs=len(lens), num_actual_tokens=n_tok, max_query_len=max(qlens),
        max_seq_len=max(lens), block_table_tensor=table,
        slot_mapping=torch.zeros(n_tok, dtype=torch.int64),
        seq_lens_cpu_upper_bound=seq_lens.clone())
    cam = extend_all_queries_by_N(
        cam, N=extend, arange=torch.arange(len(lens) + 1, dtype=torch.int32),
        new_slot_mapping=torch.zeros(n_tok + extend * len(lens), dtype=torch.int64))
    assert cam.seq_lens.tolist() == ext_lens and cam.seq_lens_cpu_upper_bound.tolist() == lens
    q = torch.randn(cam.num_actual_tokens, HEADS, D, generator=gen).to(torch.bfloat16)
    want = ref.paged_attention(q, cache, table, cam.seq_lens, cam.query_start_loc_cpu, SCALE,
                               fmt, cfg.rotate_k)
    builder = _builder(cfg, 64, table.shape[1], drafts=3)
    md = builder.build_for_drafting(cam, draft_index=0)
    assert md.prefill is not None  # some row went past 1 + 3 query tokens
    impl = impl_mod.BitDecodeAttentionImpl(HEADS, D, SCALE, KV_HEADS, None, None, "auto")
    assert_layer_matches(impl, q, cache, md, want)


def _vllm_config(num_speculative_tokens: int | None, max_num_seqs: int = 8,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 1000):
    spec = None if num_speculative_tokens is None else types.SimpleNamespace(
        num_speculative_tokens=num_speculative_tokens, parallel_drafting=False)
    return types.SimpleNamespace(
        speculative_config=spec,
        parallel_config=types.SimpleNamespace(decode_context_parallel_size=1),
        scheduler_config=types.SimpleNamespace(max_num_seqs=max_num_seqs,
                                               max_num_batched_tokens=max_num_batched_tokens),
        model_config=types.SimpleNamespace(max_model_len=max_model_len))


@pytest.mark.parametrize("drafts, rows, buffers", [(None, 8, False), (3, 32, True),
                                                   (7, 40, True)])
def test_decode_rows_per_step_follow_the_drafts(drafts, rows, buffers):
    """vLLM 0.20 counts requests of up to 1 + num_speculative_tokens query tokens as
    decodes once the builder says it verifies drafts as decodes; the persistent row
    buffers hold the most rows a step can have (max_num_seqs of them each, at most
    max_num_batched_tokens), and exist only with speculative decoding."""
    b = BitDecodeMetadataBuilder.__new__(BitDecodeMetadataBuilder)
    b.pack_queries = False  # rows: sparse mode, or more drafts than the kernel's rows hold
    b.vllm_config = _vllm_config(drafts, max_num_batched_tokens=40)
    b.kv_cache_spec = types.SimpleNamespace(block_size=BLOCK)
    b._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
    assert b.reorder_batch_threshold == 1 + (drafts or 0)
    assert b._init_decode_rows(b.vllm_config, 8, torch.device("cpu")) == rows
    if buffers:
        assert b._row_seq_lens.shape == (rows,)
        assert b._row_block_table.shape == (rows, -(-1000 // BLOCK))
    else:
        assert b._row_seq_lens is None and b._row_block_table is None


def test_packed_requests_keep_vllms_tensors():
    """Packed, a step's decode requests go to the kernel as they are: vLLM's lengths,
    block table and query starts (its persistent buffers, which graphs capture), the
    split plan over the requests; a graph batch's padding requests have no tokens."""
    builder = _builder(BitDecodeConfig(bits=4), max_rows=16, max_blocks=4, drafts=2,
                       pack=True)
    cam = _decode_batch([0, 3, 4, 4, 4], [20, 9, 0, 0], num_tokens=9)
    md = builder.build(0, cam)
    assert md.num_decodes == 4 and md.num_decode_tokens == 9
    assert md.decode_max_query_len == 3
    assert md.decode_seq_lens.data_ptr() == cam.seq_lens.data_ptr()
    assert md.decode_block_table.data_ptr() == cam.block_table_tensor.data_ptr()
    assert md.decode_query_start.data_ptr() == cam.query_start_loc.data_ptr()
    assert md.decode_query_start.tolist() == [0, 3, 4, 4, 4]
    assert md.num_splits == plan_num_splits(4, KV_HEADS, 132, 4)
    assert (builder._row_seq_lens == -7).all()  # the row buffers untouched


@pytest.mark.parametrize(("drafts", "gqa", "sparse", "channel_k", "packs"), [
    (0, 4, False, False, False),  # no drafts: one token per request, nothing to pack
    (3, 4, False, False, True),   # Llama-3-8B's 32 / 8 heads, 3 drafts: 16 rows
    (1, 8, False, False, True),
    (3, 8, False, False, False),  # 32 rows: more than the kernel's 16
    (15, 1, False, False, True),
    (3, 4, True, False, False),   # sparse mode keeps the rows
    (3, 4, False, True, False),   # channel mode (refuses drafts anyway)
])
def test_which_configurations_pack_query_tokens(drafts, gqa, sparse, channel_k, packs):
    cfg = types.SimpleNamespace(sparse=types.SimpleNamespace(enabled=sparse),
                                channel_k=channel_k)
    assert packs_query_tokens(1 + drafts, gqa, cfg) is packs


def _mixed_step(cfg: BitDecodeConfig):
    """:func:`_step` with a decode of several query tokens and a prefill."""
    for seed in range(8):
        step = _step(cfg, seed)
        qlens, num_decodes = step[4], step[5]
        if max(qlens[:num_decodes]) > 1 and len(qlens) > num_decodes:
            return step
    raise AssertionError("no seed gave a mixed step")


def _leaky_decode(out, q, cache, table, seq_lens, partial_out, partial_lse, signs, scale,
                  bits, group_size, block_size, num_splits, min_tiles,
                  query_start_loc=None, max_query_len=1):
    """A decode kernel whose query tokens see all of their request's tokens, those after
    their own too (no causal mask)."""
    fmt = bd_config.get_active().page_format(D, block_size)
    qsl = query_start_loc
    if qsl is None:  # a row per token: each sees its request's last row's length
        qsl = torch.arange(q.shape[0] + 1)
        seq_lens = seq_lens.clone()
        for i in range(seq_lens.shape[0] - 2, -1, -1):
            if torch.equal(table[i], table[i + 1]):
                seq_lens[i] = seq_lens[i + 1]
    for i in range(seq_lens.shape[0]):
        start, end, n = int(qsl[i]), int(qsl[i + 1]), int(seq_lens[i])
        k, v = ref.read_blocks(cache, table[i, : -(-n // block_size)], n, fmt, q.dtype)
        qf = ref.rotate(q[start:end]) if signs is not None else q[start:end].float()
        out[start:end] = ref.attention(qf, k, v, scale, causal=False).to(out.dtype)


@pytest.mark.parametrize("leak", [False, True], ids=["causal", "leaky"])
@pytest.mark.parametrize("pack", [False, True], ids=["rows", "tokens"])
def test_engine_kernel_check_judges_rows_against_their_own_pages(impl_mod, monkeypatch,
                                                                 pack, leak):
    """engine_probes.KernelCheck, which the GPU tests install in eager engines: every row of
    a layer's forward against the reference on that layer's own pages. It passes the
    impl's output (decodes and prefills, every row counted), and flags a decode kernel
    whose query tokens see the tokens after their own."""
    from vllm_bitdecode.testing import engine_probes

    # the check wraps the builder class; monkeypatch puts the original back afterwards
    monkeypatch.setattr(BitDecodeMetadataBuilder, "build", BitDecodeMetadataBuilder.build)
    if leak:
        monkeypatch.setattr(impl_mod.ops, "decode", _leaky_decode)
    cfg = BitDecodeConfig(bits=4, rotate_k=True)
    bd_config.set_active(cfg)
    check = engine_probes.KernelCheck()
    q, cache, cam, _, qlens, num_decodes = _mixed_step(cfg)
    md = _builder(cfg, 64, cam.block_table_tensor.shape[1], pack=pack).build(0, cam)
    impl = impl_mod.BitDecodeAttentionImpl(HEADS, D, SCALE, KV_HEADS, None, None, "auto")
    check.install(impl, 5)
    check.on = True
    out = torch.full_like(q, float("nan"))
    impl.forward(types.SimpleNamespace(layer_name="model.layers.5.self_attn.attn"), q, q, q,
                 cache, md, output=out)
    (record,) = check.records
    assert record["layer"] == 5
    assert record["decode_rows"] == sum(qlens[:num_decodes])
    assert record["prefill_rows"] == sum(qlens[num_decodes:])
    assert record["longest_decode"] == max(qlens[:num_decodes])
    assert 0 < record["decode_recent_share"] <= 1
    assert record["prefill_err"] < 1e-2 and record["prefill_worst_row"] < 2e-2
    if leak:
        assert record["decode_worst_row"] > 0.1, record
    else:
        assert record["decode_err"] < 1e-2 and record["decode_worst_row"] < 2e-2, record


@pytest.mark.parametrize("pack", [False, True], ids=["rows", "tokens"])
def test_engine_counters_and_check_all_see_each_built_step(monkeypatch, pack):
    """The GPU tests' per-step hooks on the metadata builder (engine_probes._after_build), all
    installed at once as an engine may have them: the prefill-group counter, the
    decode-row counter (rows and packed steps) and the kernel check's copy of the batch."""
    from vllm_bitdecode.testing import engine_probes

    # the hooks wrap the builder class; monkeypatch puts the originals back afterwards
    monkeypatch.setattr(BitDecodeMetadataBuilder, "build", BitDecodeMetadataBuilder.build)
    monkeypatch.setattr(BitDecodeMetadataBuilder, "_expand_decode_rows",
                        BitDecodeMetadataBuilder._expand_decode_rows)
    cfg = BitDecodeConfig(bits=4)
    bd_config.set_active(cfg)
    groups, rows = engine_probes.PrefillGroupCounter(), engine_probes.DecodeRowCounter()
    engine_probes.KernelCheck()  # keeps each step's batch on the metadata
    _, _, cam, _, qlens, num_decodes = _mixed_step(cfg)
    md = _builder(cfg, 64, cam.block_table_tensor.shape[1], pack=pack).build(0, cam)
    assert rows.counts == {"steps": 1, "rows": sum(qlens[:num_decodes]),
                           "requests": num_decodes, "packed": int(pack)}
    assert groups.counts["steps"] == 1 and groups.counts["groups"] == len(md.prefill.groups)
    qsl, seq_lens, table = md.check_batch
    assert qsl.tolist() == cam.query_start_loc_cpu.tolist()
    assert torch.equal(seq_lens, cam.seq_lens) and torch.equal(table, cam.block_table_tensor)
