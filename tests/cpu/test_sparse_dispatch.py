"""Sparse mode's per-layer dispatch in BitDecodeAttentionImpl.forward, on the CPU.

The kernels are replaced by recorders: what is checked is which op each layer calls with
which buffers, from the layer plan (dense layers ``decode``; selection layers
``decode_select``, the dense decode that also writes the positions; reuse layers
``decode_sparse``), and that without a sparse section
every layer decodes densely. The kernels themselves are tested on the GPU
(test_sparse_kernels.py, test_selection_kernel.py, test_sparse_e2e.py).
"""

from __future__ import annotations

import types

import pytest
import torch

from vllm_bitdecode import config as bd_config
from vllm_bitdecode.backend.metadata import BitDecodeMetadata, SparseMetadata
from vllm_bitdecode.config import BitDecodeConfig

NUM_LAYERS, HEADS, KV_HEADS, D, BUDGET = 6, 8, 2, 128, 64


@pytest.fixture
def recorded(monkeypatch):
    """(impl module, list of (op name, args)) with the three decode ops recorded."""
    from vllm.v1.attention.backends import fa_utils

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", lambda **kw: None, raising=False)
    from vllm_bitdecode.backend import impl as impl_mod

    calls: list[tuple[str, tuple]] = []
    for name in ("decode", "decode_sparse", "decode_select"):
        monkeypatch.setattr(impl_mod.ops, name,
                            lambda *args, _n=name: calls.append((_n, args)))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the impl checks the model dtype
    yield impl_mod, calls
    torch.set_default_dtype(default)


def _metadata(cfg: BitDecodeConfig, sparse: bool) -> BitDecodeMetadata:
    fmt = cfg.page_format(D, 16)
    sp = None
    if sparse:
        sp = SparseMetadata(
            plan=cfg.sparse.layer_plan(NUM_LAYERS), token_budget=BUDGET,
            min_seq_len=cfg.sparse.dense_below, shared=cfg.sparse.shared_selection,
            selection_unit=cfg.sparse.selection_unit,
            sel_positions=torch.zeros(4, KV_HEADS, cfg.sparse.unit_budget, dtype=torch.int32),
            sel_count=torch.zeros(4, dtype=torch.int32),
            keys=torch.zeros(1024 * KV_HEADS, dtype=torch.int32),
            key_offsets=torch.zeros(2, dtype=torch.int64), reuse_splits=3,
            sel_cache_tiles=torch.zeros(4, KV_HEADS, cfg.sparse.unit_budget, dtype=torch.int32)
            if cfg.sparse.selection_unit > 1 else None)
    return BitDecodeMetadata(
        num_actual_tokens=2, slot_mapping=torch.zeros(2, dtype=torch.int64), num_decodes=2,
        decode_seq_lens=torch.tensor([300, 500], dtype=torch.int32),
        decode_block_table=torch.zeros(2, 32, dtype=torch.int32), num_splits=1,
        num_decode_tokens=2, prefill=None, page_format=fmt, rotation_signs=None,
        partial_out=torch.zeros(1), partial_lse=torch.zeros(1), sparse=sp)


def _run_layers(impl_mod, calls, cfg, sparse):
    bd_config.set_active(cfg)
    md = _metadata(cfg, sparse)
    per_layer = []
    for i in range(NUM_LAYERS):
        impl = impl_mod.BitDecodeAttentionImpl(HEADS, D, D**-0.5, KV_HEADS, None, None, "auto")
        layer = types.SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn")
        q = torch.zeros(2, HEADS, D, dtype=torch.bfloat16)
        calls.clear()
        for _ in range(2):  # the role is resolved once and kept
            impl.forward(layer, q, q, q, torch.zeros(1, KV_HEADS, 8, dtype=torch.uint8), md,
                         output=torch.empty_like(q))
        names = [name for name, _ in calls]
        half = len(names) // 2
        assert names[:half] == names[half:], f"layer {i}: the second step ran {names[half:]}"
        per_layer.append(names[:half])
    return per_layer, md


@pytest.mark.parametrize("shared", [False, True])
def test_each_layer_runs_the_op_of_its_role(recorded, shared):
    impl_mod, calls = recorded
    cfg = BitDecodeConfig.from_additional_config({"bitdecode": {"bits": 4, "sparse": {
        "enabled": True, "token_budget": BUDGET, "shared_selection": shared}}})
    per_layer, md = _run_layers(impl_mod, calls, cfg, sparse=True)
    assert per_layer == [["decode"], ["decode"], ["decode_select"],
                         ["decode_sparse"], ["decode_sparse"], ["decode_sparse"]]


@pytest.mark.parametrize("granularity", ["token", "page"])
def test_selection_and_reuse_share_the_step_buffers(recorded, granularity):
    impl_mod, calls = recorded
    cfg = BitDecodeConfig.from_additional_config({"bitdecode": {"bits": 4, "sparse": {
        "enabled": True, "token_budget": BUDGET, "granularity": granularity}}})
    bd_config.set_active(cfg)
    md = _metadata(cfg, sparse=True)
    q = torch.zeros(2, HEADS, D, dtype=torch.bfloat16)
    for i in (2, 3):
        impl = impl_mod.BitDecodeAttentionImpl(HEADS, D, D**-0.5, KV_HEADS, None, None, "auto")
        impl.forward(types.SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn"), q,
                     q, q, torch.zeros(1, KV_HEADS, 8, dtype=torch.uint8), md,
                     output=torch.empty_like(q))
    select = next(args for name, args in calls if name == "decode_select")
    sparse = next(args for name, args in calls if name == "decode_sparse")
    sp = md.sparse
    assert select[14] is sp.sel_positions and select[15] is sp.sel_count
    assert select[16] is sp.keys and select[17] is sp.key_offsets
    assert select[18] == cfg.sparse.dense_below == 2 * BUDGET and select[19] is False
    assert sparse[5] is sp.sel_positions and sparse[6] is sp.sel_count and sparse[16] is False
    # the reuse layer runs its own split plan, the selection layer the dense one
    assert sparse[14] == sp.reuse_splits == 3 and select[12] == md.num_splits == 1
    # both ops are told the unit; with pages the buffer holds the budget in pages
    unit = 16 if granularity == "page" else 1
    assert select[20] == sparse[17] == unit
    assert sp.sel_positions.shape[-1] == BUDGET // unit
    # with pages the selection layer also writes their places in the cache, which the
    # reuse layers read in place of the block table
    if granularity == "page":
        assert sp.sel_cache_tiles.shape == sp.sel_positions.shape
        assert select[21] is sp.sel_cache_tiles and sparse[18] is sp.sel_cache_tiles
    else:
        assert sp.sel_cache_tiles is None and select[21] is None and sparse[18] is None


def test_without_sparse_every_layer_decodes_densely(recorded):
    impl_mod, calls = recorded
    cfg = BitDecodeConfig.from_additional_config({"bitdecode": {"bits": 4}})
    per_layer, _ = _run_layers(impl_mod, calls, cfg, sparse=False)
    assert per_layer == [["decode"]] * NUM_LAYERS
