"""Checks of the per-channel K reference (``vllm_bitdecode.reference_kc``, issue #7).

The quantizer is checked against error bounds derived from the rounding of the stored
parameters; the paged write against a one-shot write and an independent packing; the
decode reference against dense float64 softmax attention over K/V dequantized here; and
the lifetime rules of docs/per-channel-k-design.md (chunks ending mid-page, requests
missing from a step, reordered rows, residual slots and blocks reused after a request
finished or was preempted, prefix-cache hits, CUDA-graph padding) by driving the
reference through schedules and comparing every output with
``canonical_attention_kc``, which sees only the sequence's true K/V.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from tests.cpu.step_inputs import batch_lists
from vllm_bitdecode import reference as ref
from vllm_bitdecode import reference_kc as kc
from vllm_bitdecode.page_format import PageFormat

HEAD = 128
DTYPES = (torch.bfloat16, torch.float16)
PARAM_EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
SCALE = 1.0 / math.sqrt(HEAD)


def _layout(bits: int, block_size: int, group_size: int = 128,
            k_param_bits: int = 16) -> kc.KCPageLayout:
    return kc.KCPageLayout(PageFormat(HEAD, bits, group_size, block_size), k_param_bits)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _keys(shape, dtype, seed):
    """K-like data: every channel has its own spread and offset (what per-channel uses)."""
    g = _gen(seed)
    spread = 0.2 + 3 * torch.rand((1,) * (len(shape) - 1) + (shape[-1],), generator=g)
    offset = 2 * torch.randn((1,) * (len(shape) - 1) + (shape[-1],), generator=g)
    return (torch.randn(shape, generator=g) * spread + offset).to(dtype)


# ---- layout ------------------------------------------------------------------------------
# bytes per token and KV head at group 128 (V), quoted in docs/per-channel-k-design.md: the
# K params of a 16-token K group cost 32 B per token at every block size
DESIGN_BYTES = {(bits, bs): {4: 164, 2: 100}[bits] for bits in (4, 2) for bs in (16, 32, 64, 128)}


@pytest.mark.parametrize("bits,block_size", sorted(DESIGN_BYTES))
def test_layout_matches_the_design_numbers(bits, block_size):
    lay = _layout(bits, block_size)
    fmt = lay.fmt
    assert lay.bytes_per_token_head == DESIGN_BYTES[(bits, block_size)]
    # a head region is one tile per K group; inside a tile the regions are disjoint, in
    # order, and 16-byte aligned, and fill it (one bulk copy per tile)
    ends = [lay.k_rows_offset + 16 * fmt.row_bytes,
            lay.v_rows_offset + 16 * fmt.row_bytes,
            lay.v_params_offset + 16 * lay.v_param_bytes_per_token,
            lay.k_params_offset + lay.k_group_param_bytes]
    starts = [lay.k_rows_offset, lay.v_rows_offset, lay.v_params_offset, lay.k_params_offset]
    assert starts[1:] == ends[:-1] and ends[-1] == lay.tile_bytes
    assert lay.k_groups * lay.tile_bytes == lay.head_region_bytes
    assert all(s % 16 == 0 for s in starts) and lay.tile_bytes % 16 == 0
    # per-token V params are those of the per-token page, K params per 16-token K group
    assert lay.v_param_bytes_per_token == fmt.param_bytes_per_token // 2
    assert lay.k_groups == block_size // 16 and lay.k_param_bytes == 512 * lay.k_groups
    assert lay.page_bytes(8) == 8 * lay.head_region_bytes
    # the per-channel page costs 28 B per token and head more than the per-token page
    assert lay.head_region_bytes - fmt.head_region_bytes == 28 * block_size


def test_residual_size_for_the_llama3_8b_shape():
    """2 MiB per request at block 16 (32 layers x 8 KV heads x 16 K and 16 V rows x 256 B)."""
    for bs, mib in ((16, 2), (32, 4), (64, 8), (128, 16)):
        assert 32 * _layout(4, bs).residual_bytes_per_slot(8) == mib * 2**20


# ---- quantize per channel ----------------------------------------------------------------
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_within_half_a_step_per_channel(dtype, bits, block_size):
    """Each value dequantizes within half of *its channel's* step, plus what rounding the
    stored scale/zero to the model dtype costs (derivation: tests/cpu/test_reference.py,
    test_round_trip_error_bound, with the group being one channel over the page)."""
    levels = (1 << bits) - 1
    k = _keys((3, block_size, HEAD), dtype, seed=bits * 7 + block_size)
    codes, scale, zero = kc.quantize_channels(k, bits, dtype)
    assert codes.dtype == torch.int32 and codes.shape == k.shape
    assert scale.dtype == zero.dtype == dtype and scale.shape == zero.shape == (3, HEAD)
    assert int(codes.min()) >= 0 and int(codes.max()) <= levels
    # every (non-constant) channel uses its full code range over the page's tokens
    assert torch.all(codes.amin(-2) == 0) and torch.all(codes.amax(-2) == levels)

    deq = kc.dequantize_channels(codes, scale, zero)
    s = scale.float().unsqueeze(-2)
    z = zero.float().unsqueeze(-2)
    err = (k.float() - deq).abs()
    slack = 2.0**-20 * (z.abs() + levels * s + k.float().abs())
    bound = 0.5 * s + PARAM_EPS[dtype] * (z.abs() + levels * s) + slack
    assert torch.all(err <= bound), float((err - bound).max())
    assert float((err / s).max()) > 0.4  # the bound is not vacuous
    # the channel scales really differ: a per-page scalar step could not meet the bound
    assert float(scale.float().amax() / scale.float().amin()) > 3


def test_quantize_channels_is_the_per_token_quantizer_transposed():
    k = _keys((2, 32, HEAD), torch.bfloat16, seed=3)
    codes, scale, zero = kc.quantize_channels(k, 4, torch.bfloat16)
    fmt = PageFormat(HEAD, 4, 128, 16)
    for c in (0, 17, 127):
        # one channel over 32 tokens = one "token" of a 32-wide group: compare by hand
        x = k[:, :, c].float()
        lo, hi = x.amin(-1), x.amax(-1)
        s = ((hi - lo) / fmt.levels).to(torch.bfloat16)
        z = lo.to(torch.bfloat16)
        q = torch.clamp(torch.round((x - z.float()[:, None]) / s.float()[:, None]), 0, 15)
        assert torch.equal(scale[:, c], s) and torch.equal(zero[:, c], z)
        assert torch.equal(codes[:, :, c], q.to(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channel_is_exact(dtype):
    k = _keys((1, 16, HEAD), dtype, seed=5)
    k[..., 9] = 1.5
    codes, scale, zero = kc.quantize_channels(k, 2, dtype)
    assert float(scale[0, 9]) == 0.0 and torch.all(codes[0, :, 9] == 0)
    assert torch.all(kc.dequantize_channels(codes, scale, zero)[0, :, 9] == 1.5)


def test_k_param_order_is_a_permutation_with_each_k_step_in_16_bytes():
    idx = kc.k_param_index(HEAD)
    both = torch.cat((idx, idx + 4))
    assert torch.equal(both.sort().values, torch.arange(2 * HEAD))
    for ks in range(HEAD // 16):
        for t in range(4):  # lane quad position t: channels 16 ks + 2t (+1), (+8), (+9)
            chans = [16 * ks + 2 * t + d for d in (0, 1, 8, 9)]
            assert idx[chans].tolist() == list(range(32 * ks + 8 * t, 32 * ks + 8 * t + 4))
    scale, zc = torch.randn(3, HEAD).half(), torch.randn(3, HEAD).half()
    s2, z2 = kc.unpack_k_params(kc.pack_k_params(scale, zc))
    assert torch.equal(s2, scale) and torch.equal(z2, zc)


@pytest.mark.parametrize("bits", [4, 2])
def test_an_outlier_channel_costs_the_other_channels_nothing(bits):
    dtype = torch.bfloat16
    k = _keys((2, 64, HEAD), dtype, seed=11)
    loud = k.clone()
    loud[..., 5] = (loud[..., 5].float() * 60 + 40).to(dtype)
    others = [c for c in range(HEAD) if c != 5]
    deq = kc.fake_quant_page_k(k, bits)
    deq_loud = kc.fake_quant_page_k(loud, bits)
    assert torch.equal(deq[..., others], deq_loud[..., others])  # bit for bit
    # per token, the same outlier inflates every other channel's error (why KC exists)
    fmt = PageFormat(HEAD, bits, 128, 16)

    def per_token_err(x):
        c, s, z = ref.quantize(x, fmt, dtype)
        return (ref.dequantize(c, s, z, fmt) - x.float())[..., others].abs().mean()

    assert float(per_token_err(loud)) > 5 * float(per_token_err(k))
    channel_err = (deq_loud - loud.float())[..., others].abs().mean()
    assert float(channel_err) < float(per_token_err(loud)) / 5


# ---- a tiny engine: sequences, requests and steps ------------------------------------------
@dataclasses.dataclass
class Seq:
    """True per-position q, k, v of one sequence (model dtype)."""

    q: torch.Tensor  # [n, hq, D]
    k: torch.Tensor  # [n, hk, D]
    v: torch.Tensor

    @staticmethod
    def random(n: int, hq: int, hk: int, dtype: torch.dtype, seed: int) -> Seq:
        g = _gen(seed)
        q = torch.randn(n, hq, HEAD, generator=g).to(dtype)
        k = _keys((n, hk, HEAD), dtype, seed + 1)
        v = (torch.randn(n, hk, HEAD, generator=g) * 2).to(dtype)
        return Seq(q, k, v)

    @property
    def n(self) -> int:
        return self.q.shape[0]

    def canonical(self, layout) -> torch.Tensor:
        return kc.canonical_attention_kc(self.q, torch.arange(self.n), self.k, self.v,
                                         SCALE, layout)


@dataclasses.dataclass
class Req:
    seq: Seq
    blocks: list[int]  # page index -> block id
    slot: int  # residual slot
    done: int = 0  # positions computed so far
    outputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


class Engine:
    """One attention layer's cache and residual, driven one step at a time."""

    def __init__(self, layout, num_blocks, num_slots, hk, dtype, seed=0):
        self.layout = layout
        g = _gen(seed)
        # garbage everywhere: a read of something this run did not write shows up
        self.cache = torch.randint(0, 256, (num_blocks, hk, layout.head_region_bytes),
                                   generator=g, dtype=torch.uint8)
        self.residual = kc.new_residual(num_slots, hk, layout, dtype)

    def step(self, work: list[tuple[Req, int]], pad_rows: int = 0, pad_tokens: int = 0,
             decode_path: bool = False) -> None:
        """Run one step; ``work`` is (request, new tokens) in batch-row order."""
        seq0 = work[0][0].seq
        qs, ks, vs, slots, qsl, lens, table, rslot = batch_lists(
            work, self.layout.block_size, pad_rows, pad_slot=-1)
        for x, like in ((qs, seq0.q), (ks, seq0.k), (vs, seq0.v)):
            x.append(torch.zeros((pad_tokens,) + like.shape[1:], dtype=like.dtype))
        slots += [-1] * pad_tokens
        args = dict(cache=self.cache, residual=self.residual,
                    slot_mapping=torch.tensor(slots, dtype=torch.int64),
                    query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                    seq_lens=torch.tensor(lens, dtype=torch.int32),
                    row_slot=torch.tensor(rslot, dtype=torch.int32))
        q, key, value = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        block_table = torch.tensor(table, dtype=torch.int32)
        if decode_path:
            assert all(m == 1 for _, m in work) and pad_tokens == 0
            kc.write_tokens_kc(key=key, value=value, layout=self.layout, **args)
            nreq = len(work)
            out = kc.paged_decode_kc(q[:nreq], self.cache, self.residual, block_table[:nreq],
                                     args["seq_lens"][:nreq], args["row_slot"][:nreq],
                                     SCALE, self.layout)
        else:
            out = kc.forward_step_kc(q, key, value, block_table=block_table, scale=SCALE,
                                     layout=self.layout, **args)
        assert torch.all(out[qsl[-1]:] == 0)  # padding tokens produce nothing
        for i, (req, m) in enumerate(work):
            for j in range(m):
                req.outputs[req.done + j] = out[qsl[i] + j]
            req.done += m


def _check_against_canonical(req: Req, layout, positions=None, tol=2e-5) -> None:
    want = req.seq.canonical(layout)
    positions = sorted(req.outputs) if positions is None else positions
    assert positions, "nothing was computed"
    got = torch.stack([req.outputs[p] for p in positions])
    torch.testing.assert_close(got, want[positions], rtol=tol, atol=tol)


def _dense_attention_f64(q, k, v):
    """One query [hq, D] over k, v [n, hk, D] (float64, GQA by repetition)."""
    rep = q.shape[0] // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    s = torch.einsum("hd,khd->hk", q.double(), k) * SCALE
    return torch.einsum("hk,khd->hd", torch.softmax(s, dim=-1), v)


# ---- the page: partial pages stay exact, a page is quantized when its last slot is written --
@pytest.mark.parametrize("chunks", [[15], [1] * 15, [4, 9, 2]])
def test_partial_page_is_kept_exact_and_the_page_untouched(chunks):
    bs, dtype = 16, torch.bfloat16
    lay = _layout(2, bs)
    seq = Seq.random(bs, 4, 2, dtype, seed=21)
    eng = Engine(lay, num_blocks=4, num_slots=3, hk=2, dtype=dtype)
    eng.cache.fill_(0xAB)
    req = Req(seq, blocks=[2], slot=1)
    for m in chunks:
        eng.step([(req, m)])
    n = sum(chunks)
    page = eng.cache[2]
    k_region = page[:, : bs * lay.row_bytes]
    assert torch.all(k_region == 0xAB) and torch.all(
        page[:, lay.k_params_offset:] == 0xAB), "a partial page's K must not be written"
    # the residual holds the page's K and V exactly; the rest of the residual is untouched
    assert torch.equal(eng.residual[1, 0, :, :n], seq.k[:n].transpose(0, 1))
    assert torch.equal(eng.residual[1, 1, :, :n], seq.v[:n].transpose(0, 1))
    assert torch.isnan(eng.residual[1, :, :, n:]).all()
    assert torch.isnan(eng.residual[[0, 2]]).all()
    # V is stored per token as it arrives
    _, v = kc.read_pages_kc(eng.cache, torch.tensor([2]), lay, dtype)
    assert torch.equal(v[:n], kc.fake_quant_v(seq.v[:n], lay.fmt))
    _check_against_canonical(req, lay)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("bits", [4, 2])
def test_each_k_group_is_quantized_exactly_when_its_last_slot_is_written(bits, block_size):
    bs, dtype = block_size, torch.float16
    lay = _layout(bits, bs)
    seq = Seq.random(bs + 3, 8, 2, dtype, seed=bits + bs)
    # one shot: the whole page (and 3 more tokens) in one step
    one = Engine(lay, num_blocks=3, num_slots=1, hk=2, dtype=dtype)
    one.cache.fill_(0)
    r_one = Req(seq, blocks=[1, 2], slot=0)
    one.step([(r_one, bs + 3)])
    # token by token, checking each 16-token K group before and after its last slot
    tok = Engine(lay, num_blocks=3, num_slots=1, hk=2, dtype=dtype)
    tok.cache.fill_(0)
    r_tok = Req(seq, blocks=[1, 2], slot=0)
    rb, gb = lay.row_bytes, lay.k_group_param_bytes

    def group_bytes(page: torch.Tensor, grp: int) -> torch.Tensor:
        """K rows and K params of K group grp of a page (one head region per KV head):
        the group is tile grp, K rows first, K params last."""
        tile = grp * lay.tile_bytes
        params = tile + lay.k_params_offset
        return torch.cat((page[:, tile : tile + 16 * rb], page[:, params : params + gb]), -1)

    for i in range(bs + 3):
        before = tok.cache[1].clone()
        tok.step([(r_tok, 1)], decode_path=(i % 2 == 0))
        for grp in range(bs // 16):
            k_part = group_bytes(tok.cache[1], grp)
            if i < 16 * grp + 15:
                assert torch.all(k_part == 0), f"K group {grp} written at token {i}"
            elif i == 16 * grp + 15:
                assert not torch.equal(k_part, torch.zeros_like(k_part))
                assert torch.equal(k_part, group_bytes(one.cache[1], grp))
        if i == bs - 1:
            assert not torch.equal(tok.cache[1], before)
            assert torch.equal(tok.cache[1], one.cache[1])  # bit for bit, V included
    assert torch.equal(tok.cache, one.cache)
    # and the page is the independently packed per-channel quantization of the true K,
    # one (scale, zero) per channel and K group of 16 tokens
    groups = seq.k[:bs].transpose(0, 1).unflatten(1, (bs // 16, 16))  # [heads, groups, 16, D]
    codes, scale, zero = kc.quantize_channels(groups, bits, kc.K_PARAM_DTYPE)
    rows = ref.pack_rows(codes, lay.fmt.k_channel_of_slot(), bits)  # [heads, groups, 16, rb]
    zc = kc.centred_zero(scale, zero, bits)  # stored in fp16 as zero + 2^(bits-1) * scale
    params = kc.pack_k_params(scale, zc).view(torch.uint8)  # [heads, groups, gb]
    for grp in range(bs // 16):
        assert torch.equal(group_bytes(one.cache[1], grp),
                           torch.cat((rows[:, grp].flatten(-2), params[:, grp]), -1))
    # the residual then holds the partial second page, and its first rows are exact
    assert torch.equal(tok.residual[0, 0, :, :3], seq.k[bs:].transpose(0, 1))
    assert torch.equal(tok.residual[0, 1, :, :3], seq.v[bs:].transpose(0, 1))
    _check_against_canonical(r_tok, lay)
    _check_against_canonical(r_one, lay)


@pytest.mark.parametrize("split", [[5, 11], [3, 20, 9], [16, 16], [31, 1]])
def test_any_chunking_writes_the_same_pages(split):
    """A chunk that fills one page and ends in the next overwrites residual rows that the
    page's quantization reads: the phase order (A before B) is what keeps this right."""
    bs, dtype = 16, torch.bfloat16
    lay = _layout(2, bs)
    seq = Seq.random(sum(split), 4, 1, dtype, seed=sum(split))
    engines = []
    for chunks in ([sum(split)], split):
        eng = Engine(lay, num_blocks=4, num_slots=2, hk=1, dtype=dtype)
        eng.cache.fill_(0)
        req = Req(seq, blocks=[3, 1], slot=1)
        for m in chunks:
            eng.step([(req, m)])
        _check_against_canonical(req, lay)
        engines.append(eng)
    full = sum(split) // bs
    for b in [3, 1][:full]:
        assert torch.equal(engines[0].cache[b], engines[1].cache[b])


# ---- decode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_is_softmax_over_the_dequantized_cache(block_size, bits, gqa):
    """Odd lengths (a page just filled, one token into a page, less than a page), block
    tables in random order, residual slots that are not the row numbers, padding rows."""
    bs, dtype = block_size, torch.bfloat16
    hk = 2 if gqa < 8 else 1
    hq = hk * gqa
    lay = _layout(bits, bs)
    lens = [1, bs - 1, bs, bs + 1, 2 * bs + 5, 3 * bs, 3 * bs + bs // 2 + 1]
    rng = random.Random(bs * 100 + bits * 10 + gqa)
    npages = [(n + bs - 1) // bs for n in lens]
    ids = list(range(1, sum(npages) + 1))
    rng.shuffle(ids)
    slots = list(range(len(lens)))
    rng.shuffle(slots)
    eng = Engine(lay, num_blocks=len(ids) + 1, num_slots=len(lens), hk=hk, dtype=dtype)
    reqs = []
    for i, n in enumerate(lens):
        blocks = [ids.pop() for _ in range(npages[i])]
        reqs.append(Req(Seq.random(n, hq, hk, dtype, seed=1000 + i), blocks, slots[i]))
    prefill = [(r, r.seq.n - 1) for r in reqs if r.seq.n > 1]
    eng.step(prefill)
    eng.step([(r, 1) for r in reqs], pad_rows=3, decode_path=True)
    for r in reqs:
        n, seq = r.seq.n, r.seq
        own = (n - 1) // bs
        # expected keys and values, built here: per-channel K and per-token V pages
        # before the query's page, its own page exact
        k_groups = seq.k[: own * bs].unflatten(0, (own * bs // 16, 16)).transpose(1, 2)
        codes, scale, zero = kc.quantize_channels(k_groups, bits, kc.K_PARAM_DTYPE)
        zc = kc.centred_zero(scale, zero, bits)
        k_deq = kc.dequantize_stored_k(codes, scale, zc, bits).transpose(1, 2).flatten(0, 1)
        keys = torch.cat((k_deq, seq.k[own * bs :].float()))
        vc, vs, vz = ref.quantize(seq.v[: own * bs], lay.fmt, dtype)
        vals = torch.cat((ref.dequantize(vc, vs, vz, lay.fmt), seq.v[own * bs :].float()))
        want = _dense_attention_f64(seq.q[n - 1], keys, vals)
        torch.testing.assert_close(r.outputs[n - 1].double(), want, rtol=2e-5, atol=2e-5)
    # the decode path and the general step agree, and both meet the specification
    for r in reqs:
        _check_against_canonical(r, lay)


def test_decode_of_a_just_filled_page_reads_its_keys_exactly():
    """At n % bs == 0 the page was quantized in this very step; the query still sees its
    own page's keys and values exactly (what makes decode and recomputation agree)."""
    bs, dtype = 16, torch.bfloat16
    lay = _layout(2, bs)
    seq = Seq.random(bs, 4, 1, dtype, seed=77)
    eng = Engine(lay, num_blocks=2, num_slots=1, hk=1, dtype=dtype)
    req = Req(seq, blocks=[1], slot=0)
    eng.step([(req, bs - 1)])
    eng.step([(req, 1)], decode_path=True)
    exact = _dense_attention_f64(seq.q[bs - 1], seq.k.float(), seq.v.float())
    torch.testing.assert_close(req.outputs[bs - 1].double(), exact, rtol=2e-5, atol=2e-5)
    quantized = _dense_attention_f64(seq.q[bs - 1],
                                     *kc.read_pages_kc(eng.cache, torch.tensor([1]), lay, dtype))
    assert float((quantized - exact).abs().max()) > 1e-3  # the two views really differ


# ---- lifetimes -------------------------------------------------------------------------------
def _random_schedule_run(seqs, prompts, layout, dtype, hk, seed):
    """Chunks of random length (mostly ending mid-page), requests left out of steps,
    rows shuffled every step, padding rows and tokens, slots and blocks shuffled."""
    rng = random.Random(seed)
    bs = layout.block_size
    npages = [(s.n + bs - 1) // bs for s in seqs]
    ids = list(range(1, sum(npages) + 1))
    rng.shuffle(ids)
    slots = list(range(len(seqs) + 2))
    rng.shuffle(slots)
    reqs = [Req(s, [ids.pop() for _ in range(npages[i])], slots[i])
            for i, s in enumerate(seqs)]
    eng = Engine(layout, sum(npages) + 1, len(slots), hk, dtype, seed=seed)
    skipped = 0
    while any(r.done < r.seq.n for r in reqs):
        work = []
        for r, p in zip(reqs, prompts, strict=True):
            if r.done >= r.seq.n:
                continue
            if rng.random() < 0.3:  # running, but not scheduled in this step
                skipped += 1
                continue
            m = rng.randint(1, p - r.done) if r.done < p else 1
            work.append((r, m))
        if not work:
            continue
        rng.shuffle(work)
        eng.step(work, pad_rows=rng.choice([0, 0, 2]), pad_tokens=rng.choice([0, 3]))
    assert skipped > 0
    return reqs


@pytest.mark.parametrize("k_param_bits", [16, 8])
@pytest.mark.parametrize("bits", [4, 2])
def test_outputs_do_not_depend_on_the_schedule(bits, k_param_bits):
    """Chunked prefill ending mid-page, requests not scheduled in some steps, reordered
    rows, padding: every query still sees exactly what the specification says."""
    bs, dtype, hk = 16, torch.bfloat16, 2
    lay = _layout(bits, bs, k_param_bits=k_param_bits)
    seqs = [Seq.random(n, 8, hk, dtype, seed=300 + n) for n in (70, 45, 33, 16)]
    prompts = [40, 20, 17, 9]
    # a plain schedule: each prompt in one step, then lockstep decodes on the decode path
    plain_eng = Engine(lay, 20, 4, hk, dtype, seed=1)
    plain, next_block = [], 1
    for i, s in enumerate(seqs):
        k = (s.n + bs - 1) // bs
        plain.append(Req(s, list(range(next_block, next_block + k)), i))
        next_block += k
    plain_eng.step([(r, p) for r, p in zip(plain, prompts, strict=True)])
    while any(r.done < r.seq.n for r in plain):
        plain_eng.step([(r, 1) for r in plain if r.done < r.seq.n], decode_path=True)
    mixed = _random_schedule_run(seqs, prompts, lay, dtype, hk, seed=bits)
    for a, b in zip(plain, mixed, strict=True):
        _check_against_canonical(a, lay)
        _check_against_canonical(b, lay)
        for p in range(a.seq.n):
            torch.testing.assert_close(a.outputs[p], b.outputs[p], rtol=1e-6, atol=1e-6)


def test_finished_request_mid_page_leaves_nothing_behind():
    """A request stops mid-page; the next request gets its residual slot and its blocks,
    the partial one included, with their stale bytes, and computes the same as alone."""
    bs, dtype, hk = 16, torch.bfloat16, 1
    lay = _layout(2, bs)
    a = Seq.random(37, 4, hk, dtype, seed=5)
    b = Seq.random(50, 4, hk, dtype, seed=6)
    eng = Engine(lay, 8, 2, hk, dtype)
    ra = Req(a, blocks=[4, 2, 6], slot=1)
    eng.step([(ra, 30)])
    for _ in range(7):
        eng.step([(ra, 1)])  # ends at 37: page 2 holds 5 tokens, the residual 5 rows
    # finished: vLLM frees the blocks (the partial one goes back unhashed), the worker
    # frees the slot; nothing is cleaned. The next request reuses both.
    rb = Req(b, blocks=[6, 4, 2, 7], slot=1)
    eng.step([(rb, 3)])  # fewer rows than the stale residual holds
    eng.step([(rb, 20)])
    while rb.done < b.n:
        eng.step([(rb, 1)], decode_path=True)
    _check_against_canonical(rb, lay)
    alone = Engine(lay, 8, 2, hk, dtype, seed=9)
    rb2 = Req(b, blocks=[1, 3, 5, 0], slot=0)
    alone.step([(rb2, b.n)])
    for p in range(b.n):
        torch.testing.assert_close(rb.outputs[p], rb2.outputs[p], rtol=1e-6, atol=1e-6)


def test_preemption_and_recomputation_give_the_same_outputs():
    """Preempted mid-page: blocks and slot go to another request, which overwrites them;
    the request comes back with a new slot, a prefix-cache hit on its first full page and
    new blocks, recomputes the rest in one prefill and keeps decoding."""
    bs, dtype, hk = 16, torch.bfloat16, 2
    lay = _layout(4, bs)
    a = Seq.random(60, 8, hk, dtype, seed=41)
    c = Seq.random(40, 8, hk, dtype, seed=42)
    eng = Engine(lay, 10, 3, hk, dtype)
    ra = Req(a, blocks=[5, 3, 8, 1], slot=0)
    eng.step([(ra, 20)])
    for _ in range(20):
        eng.step([(ra, 1)], decode_path=True)  # up to 40: page 2 partial (8 tokens)
    first = dict(ra.outputs)
    page0 = eng.cache[5].clone()
    # preempted: page 0 stays in the prefix cache (full, hashed); pages 1, 2 are freed and
    # reused by C, which also takes A's residual slot
    rc = Req(c, blocks=[8, 3, 9], slot=0)
    eng.step([(rc, 25)])
    eng.step([(rc, 15)])
    # resumed: hit on page 0 (block 5), new blocks, a different slot; recompute 16..47
    ra2 = Req(a, blocks=[5, 2, 4, 6], slot=2, done=bs)
    eng.step([(ra2, 32)])
    while ra2.done < a.n:
        eng.step([(ra2, 1)], decode_path=True)
    assert torch.equal(eng.cache[5], page0), "a shared full page must never be rewritten"
    _check_against_canonical(ra2, lay)
    _check_against_canonical(rc, lay)
    for p in range(bs, 40):
        torch.testing.assert_close(ra2.outputs[p], first[p], rtol=1e-6, atol=1e-6)


def test_prefix_hit_shares_full_pages_only():
    """B hits A's two full pages; A's third page is partial, so B recomputes those
    positions into its own block. Neither request disturbs the other."""
    bs, dtype, hk = 16, torch.bfloat16, 1
    lay = _layout(2, bs)
    a = Seq.random(2 * bs + 9, 4, hk, dtype, seed=51)
    b_own = Seq.random(3 * bs + 2, 4, hk, dtype, seed=52)
    shared = 2 * bs + 5  # B's prompt agrees with A's on 37 tokens: only 2 pages are full
    b = Seq(torch.cat((a.q[:shared], b_own.q[shared:])),
            torch.cat((a.k[:shared], b_own.k[shared:])),
            torch.cat((a.v[:shared], b_own.v[shared:])))
    eng = Engine(lay, 10, 2, hk, dtype)
    ra = Req(a, blocks=[7, 2, 9], slot=1)
    eng.step([(ra, shared)])
    full_pages = eng.cache[[7, 2]].clone()
    rb = Req(b, blocks=[7, 2, 4, 5], slot=0, done=2 * bs)  # hit: 2 full pages
    eng.step([(rb, 10), (ra, 1)])
    eng.step([(ra, 1), (rb, 1)], decode_path=True)
    eng.step([(rb, b.n - rb.done), (ra, 1)])
    while ra.done < a.n:
        eng.step([(ra, 1)], decode_path=True)
    assert torch.equal(eng.cache[[7, 2]], full_pages)
    _check_against_canonical(ra, lay)
    _check_against_canonical(rb, lay)


def test_padding_changes_nothing():
    bs, dtype, hk = 16, torch.bfloat16, 2
    lay = _layout(4, bs)
    seq = Seq.random(20, 4, hk, dtype, seed=61)
    eng = Engine(lay, 4, 3, hk, dtype)
    req = Req(seq, blocks=[3, 1], slot=2)
    eng.step([(req, 19)])
    cache, res = eng.cache.clone(), eng.residual.view(torch.int16).clone()
    # a step of only padding: zero-length rows with slot -1 tokens beyond the last request
    pad = torch.zeros(4, hk, HEAD, dtype=dtype)
    kc.write_tokens_kc(eng.cache, eng.residual, pad, pad, torch.full((4,), -1),
                       torch.zeros(3, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                       torch.tensor([-1, -1], dtype=torch.int32), lay)
    assert torch.equal(eng.cache, cache) and torch.equal(eng.residual.view(torch.int16), res)
    out = kc.paged_decode_kc(torch.zeros(2, 4, HEAD, dtype=dtype), eng.cache, eng.residual,
                             torch.zeros(2, 2, dtype=torch.int32),
                             torch.zeros(2, dtype=torch.int32),
                             torch.tensor([-1, -1], dtype=torch.int32), SCALE, lay)
    assert torch.all(out == 0)
    eng.step([(req, 1)], pad_rows=2, pad_tokens=5, decode_path=False)
    _check_against_canonical(req, lay)


def test_token_requests_and_bad_slot_mappings():
    row, pos = kc.token_requests(torch.tensor([0, 3, 3, 5]), torch.tensor([10, 0, 2]), 7)
    assert row.tolist() == [0, 0, 0, 2, 2, -1, -1]
    assert pos.tolist() == [7, 8, 9, 0, 1, -1, -1]
    lay = _layout(4, 16)
    eng = Engine(lay, 2, 1, 1, torch.bfloat16)
    x = torch.zeros(2, 1, HEAD, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="disagree"):  # position 0 written to offset 1
        kc.write_tokens_kc(eng.cache, eng.residual, x, x, torch.tensor([17, 18]),
                           torch.tensor([0, 2]), torch.tensor([2]), torch.tensor([0]), lay)
    with pytest.raises(ValueError, match="outside every request"):
        kc.write_tokens_kc(eng.cache, eng.residual, x, x, torch.tensor([16, 17]),
                           torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0]), lay)


# ---- K params in fp8 e4m3 (k_params="fp8") -------------------------------------------------
@pytest.mark.parametrize("bits,block_size", sorted(DESIGN_BYTES))
def test_fp8_params_halve_the_k_param_block(bits, block_size):
    lay16, lay8 = _layout(bits, block_size), _layout(bits, block_size, k_param_bits=8)
    assert lay8.k_group_param_bytes == 256 and lay8.k_params_offset == lay16.k_params_offset
    assert lay8.tile_bytes == lay16.tile_bytes - 256 and lay8.tile_bytes % 16 == 0
    # 16 B per token and head less: 148 / 84 B at V group 128 against 136 / 72 per token
    assert lay8.bytes_per_token_head == DESIGN_BYTES[(bits, block_size)] - 16
    with pytest.raises(ValueError, match="k_param_bits=12"):
        _layout(bits, block_size, k_param_bits=12)


@pytest.mark.parametrize("bits", [4, 2])
def test_fp8_params_keep_every_key_within_half_a_stored_step(bits):
    """zc first, then the scale: for channels centred anywhere in +-400 with spreads from
    0.001 to 30, every key is within half a stored step of its value, the params are
    e4m3 values, and the step is at most one e4m3 step above what the range needs."""
    g = _gen(40 + bits)
    offset = (torch.rand(HEAD, generator=g) * 800 - 400)
    spread = torch.logspace(-3, 1.5, HEAD)[torch.randperm(HEAD, generator=g)]
    k = (torch.randn(3, 4, 16, HEAD, generator=g) * spread + offset).to(torch.bfloat16)
    codes, scale, zc = kc.quantize_channels_fp8(k, bits)
    for x in (scale, zc):  # stored exactly
        assert torch.equal(x.to(kc.K_PARAM_FP8).float(), x)
    levels, centre = (1 << bits) - 1, 1 << (bits - 1)
    assert codes.min() >= 0 and codes.max() <= levels
    deq = kc.dequantize_stored_k(codes.unsqueeze(-3), scale.unsqueeze(-2), zc.unsqueeze(-2),
                                 bits).squeeze(-3)
    err = (deq - k.float()).abs().amax(-2)
    assert (err <= 0.5 * scale * (1 + 1e-6)).all()
    lo, hi = k.float().amin(-2), k.float().amax(-2)
    need = torch.maximum((zc - lo) / centre, (hi - zc) / (levels - centre))
    assert (scale >= need).all() and (scale <= need * 1.125 + 2.0**-9).all()  # subnormals
    # the same keys through fake_quant_page_k (what the specification uses)
    got = kc.fake_quant_page_k(k.flatten(-3, -2), bits, k_param_bits=8)
    torch.testing.assert_close(got, deq.flatten(-3, -2), rtol=0, atol=0)


def test_fp8_params_are_written_byte_for_byte():
    """A page filled in one step holds, per K group, the packed codes and the e4m3 bytes
    of (scale, zc) in k_param_index order, computed here independently of the writer."""
    bs, dtype, bits = 32, torch.bfloat16, 4
    lay = _layout(bits, bs, k_param_bits=8)
    seq = Seq.random(bs + 5, 8, 2, dtype, seed=77)
    eng = Engine(lay, num_blocks=3, num_slots=1, hk=2, dtype=dtype)
    r = Req(seq, blocks=[1, 2], slot=0)
    eng.step([(r, bs + 5)])
    groups = seq.k[:bs].transpose(0, 1).unflatten(1, (bs // 16, 16))  # [heads, groups, 16, D]
    codes, scale, zc = kc.quantize_channels_fp8(groups, bits)
    rows = ref.pack_rows(codes, lay.fmt.k_channel_of_slot(), bits)
    idx = kc.k_param_index(HEAD)
    for grp in range(bs // 16):
        tile = eng.cache[1, :, grp * lay.tile_bytes : (grp + 1) * lay.tile_bytes]
        assert torch.equal(tile[:, : 16 * lay.row_bytes], rows[:, grp].flatten(-2))
        params = tile[:, lay.k_params_offset : lay.k_params_offset + 256]
        assert torch.equal(params[:, idx], scale[:, grp].to(kc.K_PARAM_FP8).view(torch.uint8))
        assert torch.equal(params[:, idx + 4], zc[:, grp].to(kc.K_PARAM_FP8).view(torch.uint8))
    _check_against_canonical(r, lay)


@pytest.mark.parametrize("bits", [4, 2])
def test_keys_at_the_edge_of_fp16_read_back_finite(bits):
    """fp16 K parameters: where rounding the stored zero point (zero + 2^(bits-1) scale)
    to fp16 would carry an end code's read-back past 65504 (-65504 beside -57376 at 4
    bits read back as -inf before 2026-12-05), zc moves one fp16 step inward: every key
    in [-65504, 65504] reads back finite, within half a scale and one step of zc; groups
    away from the edge keep the plainly rounded zc."""
    g = _gen(50 + bits)
    top = 65504.0
    other = -top + torch.rand(8192, generator=g) * 2 * top  # the group's other end
    edge = torch.stack([torch.full_like(other, -top), other], -1)  # [groups, 2]
    overflowed = 0
    for pair in (edge, -edge, top - torch.rand(4096, 2, generator=g) * 600):
        k = pair.repeat(1, 8).to(torch.float16).unsqueeze(-1)  # [groups, 16 tokens, 1]
        codes, scale, zero = kc.quantize_channels(k, bits, torch.float16)
        zc = kc.centred_zero(scale, zero, bits)
        back = kc.dequantize_stored_k(codes, scale, zc, bits).to(torch.float16)
        assert torch.isfinite(back).all()
        plain = (float(1 << (bits - 1)) * scale.double() + zero.double()).float().half()
        step = (kc._fp16_step(plain, True).float() - plain.float()).abs()
        err = (back.float() - k.float()).abs().amax(-2)
        assert (err <= scale.float() / 2 + 2 * step + 1e-3).all()  # [groups, 1] each
        before = kc.dequantize_stored_k(codes, scale, plain, bits).to(torch.float16)
        overflowed += int((~torch.isfinite(before)).any(-2).sum())
    assert overflowed > 0  # the plainly rounded zc read some of these back as inf
    ordinary = _keys((64, 2, HEAD), torch.float16, 51).transpose(0, 1).unflatten(1, (4, 16))
    codes, scale, zero = kc.quantize_channels(ordinary, bits, torch.float16)
    plain = (float(1 << (bits - 1)) * scale.double() + zero.double()).float().half()
    assert torch.equal(kc.centred_zero(scale, zero, bits), plain)
