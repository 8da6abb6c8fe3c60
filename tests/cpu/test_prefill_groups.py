"""Per-token prefill through the bounded workspace, on the CPU.

A step's prefill requests read their whole context back from the pages. The rows that
takes are the sum of their contexts, which prefix-cache hits make far larger than the
step's tokens, so the builder cuts the requests into groups that fit a workspace of
``prefill_workspace_rows`` rows and the impl runs one dequantize and one FlashAttention
call per group. A context longer than the workspace (which no longer grows with
max_model_len) is read in windows, one group each, merged by LSE. Here the CUDA ops,
FlashAttention and the merge are replaced by the reference and plain PyTorch; the
kernels are tested on the GPU.
"""

from __future__ import annotations

import random
import types

import pytest
import torch

from tests.cpu.attention_stand_ins import (
    assert_layer_matches,
    dequantize_pages,
    flash_attn_varlen,
    merge_attn_states,
    random_pages,
)
from vllm_bitdecode import config as bd_config
from vllm_bitdecode import reference as ref
from vllm_bitdecode.backend.metadata import (
    BitDecodeMetadata,
    BitDecodeMetadataBuilder,
    context_windows,
    group_prefills,
    prefill_workspace_rows,
)
from vllm_bitdecode.config import PREFILL_WINDOW_TOKENS, BitDecodeConfig
from vllm_bitdecode.page_format import rotation_signs

HEADS, KV_HEADS, D, BLOCK = 8, 2, 128, 16
SCALE = D**-0.5


@pytest.mark.parametrize("seed", range(20))
def test_groups_are_greedy_runs_within_the_capacity(seed):
    rng = random.Random(seed)
    capacity = rng.randint(1, 300)
    lens = [rng.randint(1, capacity) for _ in range(rng.randint(1, 30))]
    runs = group_prefills(lens, capacity)
    assert runs[0][0] == 0 and runs[-1][1] == len(lens)
    for (_, end), (begin, _) in zip(runs[:-1], runs[1:], strict=True):
        assert end == begin  # consecutive, in order, nothing left out
    for begin, end in runs:
        assert begin < end and sum(lens[begin:end]) <= capacity
        if end < len(lens):  # greedy: the next request would not have fitted
            assert sum(lens[begin : end + 1]) > capacity


def test_one_group_when_everything_fits_and_a_clear_error_past_the_capacity():
    assert group_prefills([5, 7, 3], 15) == [(0, 3)]
    assert group_prefills([5, 7, 3], 14) == [(0, 2), (2, 3)]
    with pytest.raises(ValueError, match="needs 9 workspace rows, more than the BITDECODE "
                                         "prefill workspace's 8"):
        group_prefills([3, 9], 8)
    # a context up to the window fits whole (and a step's tokens always do), a drafter's
    # too, which vLLM 0.20 lengthens past max_model_len by up to its speculative tokens ...
    assert prefill_workspace_rows(False, 8192, 2048, 16) == 8192 + 128
    assert prefill_workspace_rows(False, 1024, 4096, 16) == 4096
    # ... a longer one goes in windows: the workspace stops growing with max_model_len
    assert PREFILL_WINDOW_TOKENS == 16384
    for block_size in (16, 128):  # the same rows at every block size
        assert prefill_workspace_rows(False, 131072, 2048, block_size) == 16384
        assert prefill_workspace_rows(False, 1 << 20, 8192, block_size) == 16384
        # the last window holds a step's tokens from a page boundary: a page more
        assert prefill_workspace_rows(False, 131072, 16384, block_size) == 16384 + 128
        assert prefill_workspace_rows(False, 20000, 16384, block_size) == 16384 + 128
        assert prefill_workspace_rows(False, 131072, 20001, block_size) == 20224
        # the prefill_window setting
        assert prefill_workspace_rows(False, 131072, 2048, block_size, 4096) == 4096
        assert prefill_workspace_rows(False, 131072, 4096, block_size, 4096) == 4096 + 128
    # channel mode: the pages (8192 / 16) and a scratch page per page of a 2048-token chunk,
    # plus one (a chunk starting mid-page)
    assert prefill_workspace_rows(True, 8192, 2048, 16) == (512 + 128 + 1) * 16


@pytest.fixture
def impl_mod(monkeypatch):
    """The impl module with dequantize_pages and FlashAttention replaced by references;
    records each dequantize call's workspace rows."""
    from vllm.v1.attention.backends import fa_utils

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", flash_attn_varlen, raising=False)
    from vllm_bitdecode.backend import impl as mod

    calls: list[int] = []

    def dequantize(*args):
        calls.append(args[4].shape[0])  # k_out: the workspace rows the call was given
        dequantize_pages(*args)

    monkeypatch.setattr(mod.ops, "dequantize_pages", dequantize)
    monkeypatch.setattr(mod, "_merge_attn_states", merge_attn_states)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the impl checks the model dtype
    yield mod, calls
    torch.set_default_dtype(default)


def _step(cfg: BitDecodeConfig, capacity: int, seed: int, max_len: int | None = None):
    """A prefill-only step over random pages (contexts up to ``max_len``, by default the
    workspace's ``capacity``), its metadata from the builder's _build_prefill, and the
    reference output."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    fmt = cfg.page_format(D, BLOCK)
    lens = [rng.randint(1, max_len or capacity) for _ in range(rng.randint(2, 7))]
    # chunks ending at the context's end; a long context's chunk leaves its last window
    # a page (prefill_workspace_rows keeps that room)
    qlens = [rng.randint(1, n if n <= capacity else capacity - BLOCK) for n in lens]
    cache, table = random_pages(fmt, cfg.rotate_k, lens, KV_HEADS, gen)  # permuted pages
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), HEADS, D, generator=gen).to(torch.bfloat16)
    cam = types.SimpleNamespace(query_start_loc_cpu=qsl, seq_lens=seq_lens,
                                seq_lens_cpu_upper_bound=seq_lens, num_reqs=len(lens),
                                block_table_tensor=table)
    builder = types.SimpleNamespace(bitdecode=cfg, prefill_workspace_rows=capacity,
                                    device=torch.device("cpu"), page_format=fmt)
    prefill = BitDecodeMetadataBuilder._build_prefill(builder, cam, 0, 0)
    md = BitDecodeMetadata(
        num_actual_tokens=q.shape[0], slot_mapping=torch.zeros(0, dtype=torch.int64),
        num_decodes=0, decode_seq_lens=seq_lens[:0], decode_block_table=table[:0],
        num_splits=1, num_decode_tokens=0, prefill=prefill, page_format=fmt,
        rotation_signs=rotation_signs(D) if cfg.rotate_k else None,
        partial_out=torch.zeros(1), partial_lse=torch.zeros(1))
    want = ref.paged_attention(q, cache, table, seq_lens, qsl, SCALE, fmt, cfg.rotate_k)
    return q, cache, md, want, lens


def _prefill_matches_the_reference(mod, bits: int, rotate_k: bool, capacity: int, seed: int,
                                   max_len: int | None = None):
    """Runs a random prefill step (``_step``) through the impl with the workspace and
    the output poisoned (a row read before any dequantize wrote it, or never written,
    shows as NaN), checks the output against the reference, and returns the step's
    metadata and context lengths."""
    cfg = BitDecodeConfig(bits=bits, rotate_k=rotate_k)
    bd_config.set_active(cfg)
    q, cache, md, want, lens = _step(cfg, capacity, seed, max_len)
    impl = mod.BitDecodeAttentionImpl(HEADS, D, SCALE, KV_HEADS, None, None, "auto")
    impl.prefill_workspace = torch.full((2, capacity, KV_HEADS, D), float("nan"),
                                        dtype=torch.bfloat16)
    assert_layer_matches(impl, q, cache, md, want)
    return md, lens


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("rotate_k", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_grouped_prefill_matches_the_reference(impl_mod, bits, rotate_k, seed):
    mod, calls = impl_mod
    capacity = 160
    md, lens = _prefill_matches_the_reference(mod, bits, rotate_k, capacity, seed)
    groups = md.prefill.groups
    assert len(groups) == len(group_prefills(lens, capacity)) and len(groups) == len(calls)
    assert sum(lens) <= capacity or len(groups) > 1
    assert all(rows <= capacity for rows in calls)


@pytest.mark.parametrize("seed", range(30))
def test_context_windows_cover_the_context_in_pages(seed):
    rng = random.Random(seed)
    bs = rng.choice([16, 32, 64, 128])
    capacity = bs * rng.randint(2, 12)
    seq_len = rng.randint(1, 5 * capacity)
    query_len = rng.randint(1, min(seq_len, capacity - bs))
    wins = context_windows(seq_len, query_len, capacity, bs)
    assert wins[0][0] == 0 and wins[-1][1] == seq_len
    for (_, end), (begin, _) in zip(wins[:-1], wins[1:], strict=True):
        assert end == begin  # every key once, in order
    assert all(0 < e - b <= capacity and b % bs == 0 for b, e in wins)
    assert wins[-1][0] <= seq_len - query_len  # the queries' own keys in the causal one
    assert (len(wins) == 1) == (seq_len <= capacity)
    assert len(wins) <= -(-seq_len // capacity) + 1


def test_context_windows_refuse_what_they_cannot_place():
    assert context_windows(100, 100, 100, 16) == [(0, 100)]  # fits whole: no page rule
    assert context_windows(100, 20, 64, 16) == [(0, 48), (48, 100)]
    with pytest.raises(ValueError, match="60 rows are not whole 16-token pages"):
        context_windows(100, 20, 60, 16)
    with pytest.raises(ValueError, match="chunk of 60 tokens does not fit a window"):
        context_windows(100, 60, 64, 16)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("rotate_k", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_long_contexts_read_in_windows_match_the_reference(impl_mod, bits, rotate_k, seed):
    """Contexts up to about 5 workspaces long: each is read in windows of its own (the
    causal one last), the rest grouped as before, and the LSE merges give the reference's
    attention."""
    mod, calls = impl_mod
    capacity = 64
    md, lens = _prefill_matches_the_reference(mod, bits, rotate_k, capacity, 100 + seed,
                                              max_len=5 * capacity)
    groups = md.prefill.groups
    windowed = [g for g in groups if g.windows > 1]
    assert windowed and sum(n > capacity for n in lens) == sum(g.window == 0 for g in windowed)
    for g in windowed:  # a context's windows in order, from a page each, end to end
        if g.window == 0:
            end = 0
        assert g.kv_begin == end and end % BLOCK == 0 and g.max_seq_len <= capacity
        end += g.max_seq_len
        assert g.window < g.windows - 1 or end in lens
    assert all(rows <= capacity for rows in calls) and len(calls) == len(groups)


def test_a_group_larger_than_the_workspace_is_refused(impl_mod):
    mod, _ = impl_mod
    cfg = BitDecodeConfig(bits=4)
    bd_config.set_active(cfg)
    q, cache, md, _, _ = _step(cfg, 160, 0)
    impl = mod.BitDecodeAttentionImpl(HEADS, D, SCALE, KV_HEADS, None, None, "auto")
    impl.prefill_workspace = torch.zeros((2, 8, KV_HEADS, D), dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="workspace rows, the workspace has 8"):
        impl.forward(types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn"), q, q,
                     q, cache, md, output=torch.empty_like(q))


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("seed", range(10))
def test_channel_mode_rows_per_request_are_the_plans(block_size, seed):
    """The grouping's count of pool rows is what plan_kc_prefill lays out, request by
    request and for every run of them."""
    from vllm_bitdecode import kc_prefill

    rng = random.Random(seed)
    lens = [rng.randint(1, 900) for _ in range(rng.randint(1, 8))]
    qlens = [rng.randint(1, n) for n in lens]
    qsl = [0, *torch.tensor(qlens).cumsum(0).tolist()]
    rows = list(range(len(lens)))
    need = kc_prefill.pool_rows_per_request(qsl, lens, rows, block_size)
    for i in rows:
        assert need[i] == kc_prefill.plan_kc_prefill(qsl, lens, [i], block_size).pool_rows
    b = rng.randrange(len(rows))
    e = rng.randint(b + 1, len(rows))
    plan = kc_prefill.plan_kc_prefill(qsl, lens, rows[b:e], block_size)
    assert sum(need[b:e]) == plan.pool_rows


@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_channel_mode_workspace_holds_any_one_request(block_size):
    """Every context up to max_model_len with every chunk up to max_num_batched_tokens
    (and every start in the page) fits ``workspace_rows``, and the bound is reached."""
    from vllm_bitdecode import kc_prefill

    max_len, max_chunk = 300, 70
    bound = kc_prefill.workspace_rows(max_len, max_chunk, block_size)
    worst = 0
    for n in range(1, max_len + 1):
        for m in range(1, min(n, max_chunk) + 1):
            worst = max(worst, kc_prefill.pool_rows_per_request([0, m], [n], [0], block_size)[0])
    assert worst <= bound and worst > bound - block_size, (worst, bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_q_rotation_is_exact_in_the_model_dtype(impl_mod, dtype):
    """The prefill's Q rotation: the signed Hadamard matrix over 16 (exact in bf16 and
    fp16), whose product times the softmax-scale gain is Q times the orthonormal K
    rotation up to one rounding, and never larger than it (no new overflow in fp16)."""
    mod, _ = impl_mod
    bd_config.set_active(BitDecodeConfig())
    impl = mod.BitDecodeAttentionImpl(HEADS, D, SCALE, KV_HEADS, None, None, "auto")
    q = (torch.randn(50, HEADS, D, generator=torch.Generator().manual_seed(3)) * 30).to(dtype)
    rotation = impl._prefill_rotation(q)
    exact = ref.rotation_matrix(D).double()
    assert rotation.dtype == dtype
    assert torch.equal(rotation.double(), exact.sign() / 16)  # nothing rounded
    want = q.double() @ exact
    got = (q @ rotation).double()
    assert impl._prefill_rotation_gain == pytest.approx(16 / D**0.5)
    err = float((got * impl._prefill_rotation_gain - want).norm() / want.norm())
    assert 0 < err < 4e-3  # one rounding in the model dtype
    assert got.abs().max() <= want.abs().max()


def test_a_draft_models_workspace_holds_what_the_targets_builder_plans():
    """A draft model's layers are built under the draft's config, whose max_model_len
    may be below the target's (a short-context draft, or the speculative config's
    max_model_len), while the runner's builder plans their prefill groups with the
    target's: the impl's workspace is the larger (review: 8195 rows against 16384)."""
    from vllm_bitdecode.backend.metadata import workspace_rows

    def vllm_config(max_model_len, spec=None):
        return types.SimpleNamespace(
            model_config=types.SimpleNamespace(max_model_len=max_model_len),
            scheduler_config=types.SimpleNamespace(max_num_batched_tokens=8192),
            cache_config=types.SimpleNamespace(block_size=16), speculative_config=spec)

    cfg = BitDecodeConfig()
    target = vllm_config(32768)
    spec = types.SimpleNamespace(method="draft_model", num_speculative_tokens=3,
                                 target_model_config=target.model_config)
    target.speculative_config = spec
    builder_rows = prefill_workspace_rows(False, 32768, 8192, 16, cfg.prefill_window, 3)
    assert workspace_rows(target, cfg, 16) == builder_rows
    assert workspace_rows(vllm_config(2048, spec), cfg, 16) == builder_rows
    assert prefill_workspace_rows(False, 2048, 8192, 16, cfg.prefill_window, 3) < builder_rows
