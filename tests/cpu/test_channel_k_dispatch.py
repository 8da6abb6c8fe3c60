"""Per-channel K mode through BitDecodeAttentionImpl.forward, on the CPU.

The CUDA ops and FlashAttention are replaced by the reference (``reference_kc``) and by
plain PyTorch, so that what runs is the backend's own wiring: the builder's per-step
metadata (``_build_channel_k``), the worker's row-slot table, and the impl's order of
gather, write, decode and two-part prefill. Requests go through random steps of decodes
(first, as vLLM orders them) and prefill chunks, with unscheduled requests and shuffled
rows; every step's outputs must equal ``reference_kc.forward_step_kc`` on a cache of its
own. The kernels are tested on the GPU (test_kc_write_kernel.py, test_kc_read_kernels.py).
"""

from __future__ import annotations

import random
import types

import pytest
import torch

from tests.cpu.attention_stand_ins import flash_attn_varlen, merge_attn_states
from vllm_bitdecode import config as bd_config
from vllm_bitdecode import kc_prefill
from vllm_bitdecode import reference_kc as kc
from vllm_bitdecode.backend.metadata import (
    BitDecodeMetadata,
    BitDecodeMetadataBuilder,
    PrefillMetadata,
)
from vllm_bitdecode.config import BitDecodeConfig
from vllm_bitdecode.residual_slots import RowSlotTable

HEADS, KV_HEADS, D, MAX_SEQS = 8, 2, 128, 4
SCALE = D**-0.5


@pytest.fixture
def impl_mod(monkeypatch):
    """The impl module with every CUDA op replaced by its reference."""
    from vllm.v1.attention.backends import fa_utils

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", flash_attn_varlen, raising=False)
    from vllm_bitdecode.backend import impl as mod

    def layout_of(bits, group_size, block_size, k_param_bits):
        return kc.KCPageLayout(bd_config.BitDecodeConfig(bits=bits, group_size=group_size,
                                                         rotate_k=False).page_format(
                                                             D, block_size), k_param_bits)

    def write(key, value, slot_mapping, qsl, seq_lens, row_slot, cache, residual, bits,
              group_size, block_size, k_param_bits):
        kc.write_tokens_kc(cache, residual, key, value, slot_mapping, qsl, seq_lens,
                           row_slot[: seq_lens.shape[0]],
                           layout_of(bits, group_size, block_size, k_param_bits))

    def decode(out, q, cache, residual, table, seq_lens, row_slot, po, pl, scale, bits,
               group_size, block_size, num_splits, min_tiles, k_param_bits):
        n = q.shape[0]
        out.copy_(kc.paged_decode_kc(q, cache, residual, table[:n], seq_lens[:n], row_slot[:n],
                                     scale, layout_of(bits, group_size, block_size,
                                                      k_param_bits)))

    def dequantize(cache, table, seq_lens, out_start, k_out, v_out, bits, group_size,
                   block_size, max_tokens, k_param_bits):
        layout = layout_of(bits, group_size, block_size, k_param_bits)
        for i, n in enumerate(seq_lens.tolist()):
            k, v = kc.read_pages_kc(cache, table[i, : -(-n // block_size)], layout, k_out.dtype)
            w = int(out_start[i])
            k_out[w : w + n], v_out[w : w + n] = k[:n], v[:n]

    monkeypatch.setattr(mod.ops, "write_tokens_kc", write)
    monkeypatch.setattr(mod.ops, "decode_kc", decode)
    monkeypatch.setattr(mod.ops, "dequantize_pages_kc", dequantize)
    monkeypatch.setattr(mod, "_merge_attn_states", merge_attn_states)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the impl checks the model dtype
    yield mod
    torch.set_default_dtype(default)


def _metadata(cfg, table, rows, qlens, lens, block_table, slot_mapping, block_size,
              workspace_rows):
    """What the builder makes for this step (its channel part through _build_channel_k)."""
    num_reqs = len(rows)
    nd = next((i for i, m in enumerate(qlens) if m > 1), num_reqs)  # decodes come first
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cam = types.SimpleNamespace(query_start_loc=qsl, query_start_loc_cpu=qsl,
                                seq_lens=seq_lens, seq_lens_cpu_upper_bound=seq_lens,
                                num_reqs=num_reqs)
    builder = types.SimpleNamespace(row_slots=table, device=torch.device("cpu"),
                                    kv_cache_spec=types.SimpleNamespace(block_size=block_size),
                                    prefill_workspace_rows=workspace_rows)
    channel = BitDecodeMetadataBuilder._build_channel_k(builder, cam, nd)
    prefill = None
    if nd < num_reqs:
        prefill = PrefillMetadata(seq_lens=seq_lens[nd:], block_table=block_table[nd:],
                                  max_seq_len=max(lens[nd:]))
    return BitDecodeMetadata(
        num_actual_tokens=int(qsl[-1]), slot_mapping=slot_mapping, num_decodes=nd,
        decode_seq_lens=seq_lens[:nd], decode_block_table=block_table[:nd], num_splits=1,
        num_decode_tokens=int(qsl[nd]), prefill=prefill,
        page_format=cfg.page_format(D, block_size), rotation_signs=None,
        partial_out=torch.zeros(1), partial_lse=torch.zeros(1), channel_k=channel)


@pytest.mark.parametrize(("bits", "tight", "k_params"),
                         [(4, False, "fp16"), (2, False, "fp16"), (4, True, "fp16"),
                          (2, True, "fp16"), (4, False, "fp8"), (2, True, "fp8")])
def test_channel_mode_forward_matches_the_reference_step_by_step(impl_mod, bits, tight,
                                                                 k_params):
    """``tight``: a prefill workspace that holds one request at a time (the longest,
    in its largest chunk), so that steps run their prefills in several groups."""
    bs = 16
    cfg = BitDecodeConfig.from_additional_config({"bitdecode": {
        "bits": bits, "k_mode": "channel", "k_params": k_params}})
    assert cfg.rotate_k is False
    bd_config.set_active(cfg)
    layout = kc.KCPageLayout(cfg.page_format(D, bs), cfg.k_param_bits)
    gen = torch.Generator().manual_seed(bits)
    rng = random.Random(bits)
    impl = impl_mod.BitDecodeAttentionImpl(HEADS, D, SCALE, KV_HEADS, None, None, "auto")
    lengths = {"a": 3 * bs + 7, "b": 2 * bs, "c": bs + 3, "d": 5 * bs - 2}
    blocks = sum(-(-n // bs) for n in lengths.values()) + 2
    perm = torch.randperm(blocks, generator=gen).tolist()
    reqs = {}
    for rid, n in lengths.items():
        nb = -(-n // bs)
        reqs[rid] = dict(n=n, done=0, blocks=perm[:nb],
                         k=(torch.randn(n, KV_HEADS, D, generator=gen) * 2).to(torch.bfloat16),
                         v=torch.randn(n, KV_HEADS, D, generator=gen).to(torch.bfloat16))
        perm = perm[nb:]
    cache = torch.randint(0, 256, (blocks, KV_HEADS, layout.head_region_bytes),
                          dtype=torch.uint8, generator=gen)
    impl.residual = kc.new_residual(MAX_SEQS + 1, KV_HEADS, layout, torch.bfloat16)
    max_len, max_chunk = max(lengths.values()), 2 * bs + 5
    ws_rows = kc_prefill.workspace_rows(max_len, max_chunk, bs) if tight else 1 << 20
    if tight:  # the engine's shared workspace, poisoned
        impl.prefill_workspace = torch.full((2, ws_rows, KV_HEADS, D), float("nan"),
                                            dtype=torch.bfloat16)
    multi_group_steps = 0
    cache_ref = cache.clone()
    residual_ref = impl.residual.clone()
    table = RowSlotTable(MAX_SEQS, "cpu")
    steps = kinds = 0
    finished: list[str] = []
    while any(r["done"] < r["n"] for r in reqs.values()):
        live = [rid for rid, r in reqs.items() if r["done"] < r["n"]]
        work = [rid for rid in live if rng.random() > 0.15]
        if not work:
            continue
        sizes = {}
        for rid in work:
            r = reqs[rid]
            left = r["n"] - r["done"]
            sizes[rid] = 1 if r["done"] and rng.random() < 0.6 else min(
                left, rng.choice([2, bs - 3, bs, 2 * bs + 5]))
        decodes = [rid for rid in work if sizes[rid] == 1]
        rng.shuffle(decodes)
        rows = decodes + [rid for rid in work if sizes[rid] > 1]
        table.step(finished, None, rows)
        finished = []
        qlens = [sizes[rid] for rid in rows]
        lens = [reqs[rid]["done"] + sizes[rid] for rid in rows]
        keys, values, slots = [], [], []
        for rid, m in zip(rows, qlens, strict=True):
            r = reqs[rid]
            keys.append(r["k"][r["done"] : r["done"] + m])
            values.append(r["v"][r["done"] : r["done"] + m])
            slots += [r["blocks"][p // bs] * bs + p % bs for p in range(r["done"], r["done"] + m)]
        key, value = torch.cat(keys), torch.cat(values)
        q = torch.randn(key.shape[0], HEADS, D, generator=gen).to(torch.bfloat16)
        block_table = torch.zeros(len(rows), 8, dtype=torch.int32)
        for i, rid in enumerate(rows):
            block_table[i, : len(reqs[rid]["blocks"])] = torch.tensor(reqs[rid]["blocks"])
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        md = _metadata(cfg, table, rows, qlens, lens, block_table, slot_mapping, bs, ws_rows)
        multi_group_steps += len(md.channel_k.prefill_groups) > 1
        qsl = md.channel_k.query_start_loc
        expected = kc.forward_step_kc(q, key, value, cache_ref, residual_ref, slot_mapping, qsl,
                                      torch.tensor(lens, dtype=torch.int32),
                                      table.device_row_slot[: len(rows)], block_table, SCALE,
                                      layout)
        out = torch.full_like(q, float("nan"))
        layer = types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
        impl.do_kv_cache_update(layer, key, value, cache, slot_mapping)  # no-op here
        impl.forward(layer, q, key, value, cache, md, output=out)
        err = float((out.float() - expected).norm() / expected.norm())
        assert err < 1e-2, f"step {steps} (rows {rows}, lengths {qlens}): error {err:.2e}"
        assert torch.equal(cache, cache_ref), f"step {steps}: pages differ"
        kinds |= (1 if md.num_decodes else 0) | (2 if md.prefill is not None else 0)
        for rid, m in zip(rows, qlens, strict=True):
            reqs[rid]["done"] += m
            if reqs[rid]["done"] == reqs[rid]["n"]:
                finished.append(rid)
        steps += 1
    assert steps >= 5 and kinds == 3, (steps, kinds)
    assert (multi_group_steps > 0) == tight, multi_group_steps


def test_channel_mode_config():
    cfg = BitDecodeConfig.from_additional_config({"bitdecode": {"k_mode": "channel"}})
    assert cfg.channel_k and not cfg.rotate_k
    assert cfg.head_region_bytes(128, 16) == 2624 and cfg.block_size_of(128, 2624) == 16
    assert BitDecodeConfig().head_region_bytes(128, 16) == 2176
    with pytest.raises(bd_config.BitDecodeConfigError, match="rotate_k=true"):
        BitDecodeConfig.from_additional_config({"bitdecode": {"k_mode": "channel",
                                                              "rotate_k": True}})
    with pytest.raises(bd_config.BitDecodeConfigError, match="k_mode"):
        BitDecodeConfig.from_additional_config({"bitdecode": {"k_mode": "per-channel"}})
    with pytest.raises(bd_config.BitDecodeConfigError, match="sparse"):
        BitDecodeConfig.from_additional_config({"bitdecode": {
            "k_mode": "channel", "sparse": {"enabled": True}}})
    # K params in e4m3: 256 bytes less per 16-token tile, channel mode only
    fp8 = BitDecodeConfig.from_additional_config({"bitdecode": {"k_mode": "channel",
                                                                "k_params": "fp8"}})
    assert fp8.k_param_bits == 8 and cfg.k_param_bits == 16
    assert fp8.head_region_bytes(128, 64) == 4 * 2368 and fp8.block_size_of(128, 4 * 2368) == 64
    with pytest.raises(bd_config.BitDecodeConfigError, match="k_params='fp8' applies to "
                       "k_mode='channel' only"):
        BitDecodeConfig.from_additional_config({"bitdecode": {"k_params": "fp8"}})
    with pytest.raises(bd_config.BitDecodeConfigError, match="k_params='e4m3'.*'fp16', 'fp8'"):
        BitDecodeConfig.from_additional_config({"bitdecode": {"k_mode": "channel",
                                                              "k_params": "e4m3"}})


def test_channel_mode_spec_reports_the_channel_page():
    from vllm_bitdecode.backend.spec import BitDecodeAttentionSpec

    kw = dict(block_size=16, num_kv_heads=8, head_size=128, head_size_v=128,
              dtype=torch.uint8, bits=4, group_size=128)
    token = BitDecodeAttentionSpec(**kw)
    channel = BitDecodeAttentionSpec(**kw, k_mode="channel")
    fp8 = BitDecodeAttentionSpec(**kw, k_mode="channel", k_param_bits=8)
    assert (token.real_page_size_bytes, channel.real_page_size_bytes,
            fp8.real_page_size_bytes) == (8 * 2176, 8 * 2624, 8 * 2368)
    for other in (channel, fp8):
        with pytest.raises(ValueError, match="one page format"):
            BitDecodeAttentionSpec.merge([token if other is channel else channel, other])


def _engine(**overrides):
    parallel = types.SimpleNamespace(decode_context_parallel_size=1,
                                     prefill_context_parallel_size=1, enable_dbo=False)
    cache = types.SimpleNamespace(block_size=16)
    vc = types.SimpleNamespace(speculative_config=None, parallel_config=parallel,
                               cache_config=cache)
    for key, value in overrides.items():
        target, _, attr = key.rpartition("__")
        setattr(getattr(vc, target) if target else vc, attr, value)
    return vc


@pytest.mark.parametrize(("overrides", "words"), [
    ({"speculative_config": object()}, ["speculative decoding"]),
    ({"parallel_config__enable_dbo": True}, ["--enable-dbo"]),
    ({"cache_config__block_size": 256}, ["--block-size 256", "at most 128"]),
])
def test_channel_mode_refuses_what_it_cannot_serve(overrides, words):
    with pytest.raises(bd_config.BitDecodeConfigError) as info:
        bd_config.check_channel_k(_engine(**overrides))
    msg = str(info.value)
    assert "k_mode='channel'" in msg and all(w in msg for w in words), msg
    bd_config.check_channel_k(_engine())  # the defaults pass


def test_channel_mode_refuses_the_v2_model_runner(monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(bd_config.BitDecodeConfigError, match="V2_MODEL_RUNNER"):
        bd_config.check_channel_k(_engine())


@pytest.mark.parametrize(("value", "refused"), [("0", False), ("00", False), ("", False),
                                                ("1", True), ("2", True)])
def test_the_v2_runner_flag_is_read_as_vllm_reads_it(monkeypatch, value, refused):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
    if refused:
        with pytest.raises(bd_config.BitDecodeConfigError, match="V2_MODEL_RUNNER"):
            bd_config.check_channel_k(_engine())
    else:
        bd_config.check_channel_k(_engine())
