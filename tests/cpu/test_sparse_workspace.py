"""Sparse mode's score workspace on the CPU: its size (score_workspace_keys) and the rows'
places in it (key_offsets, one key per selection unit), against the kernels' rule for
which rows get keys (selection.cuh's selection_row_has_keys, mirrored by
backend.metadata.rows_with_score_keys). A row without keys decodes densely, which is
exact but forgoes the sparse speed-up, so the workspace must hold every row a step can
have where the KV cache bounds them, drafts' rows included.
"""

from __future__ import annotations

import types

import pytest
import torch

from vllm_bitdecode.backend import metadata
from vllm_bitdecode.backend.metadata import (
    MAX_SCORE_KEYS,
    BitDecodeMetadataBuilder,
    layer_ranges,
    rows_past_score_workspace,
    rows_with_score_keys,
    score_workspace_keys,
)
from vllm_bitdecode.config import BitDecodeConfig

BLOCK, KV_HEADS = 16, 8


def test_workspace_size_by_hand():
    # pages: one key per 16 tokens; no drafts; KV cache of 1M tokens; 32K rows
    assert score_workspace_keys(64, 32768, 16, 1, 1 << 20) == (1 << 16) + 32768
    # three drafts: four rows per request over the same pages
    assert score_workspace_keys(256, 32768, 16, 4, 1 << 20) == (1 << 18) + 32768
    # tokens, the rows' own bound below the cache's
    assert score_workspace_keys(2, 1000, 1, 1, 1 << 20) == 2 * 1000 + 1000
    # a worker that does not know the cache's size: the rows' bound, capped
    assert score_workspace_keys(64, 131072, 1, 1, 0) == MAX_SCORE_KEYS
    assert score_workspace_keys(8, 1001, 16, 1, 0) == 8 * 63 + 1001


def test_rows_with_score_keys_by_hand():
    """The kernels' rule: a row needs a token, min_seq_len tokens, and its first key
    plus its length in tokens within the capacity."""
    lens = torch.tensor([0, 5, 10, 10, 10, 10], dtype=torch.int32)
    offsets = torch.tensor([0, 0, 0, -1, 90, 91])
    assert rows_with_score_keys(lens, offsets, 8, 100).tolist() == \
        [False, False, True, False, True, False]


def _builder(granularity: str, drafts: int, max_seqs: int = 64, max_len: int = 32768,
             kv_blocks: int = 65536) -> BitDecodeMetadataBuilder:
    """The builder's sparse buffers as its constructor makes them, without vLLM's."""
    cfg = BitDecodeConfig.from_additional_config({"bitdecode": {"bits": 4, "sparse": {
        "enabled": True, "token_budget": 2048, "granularity": granularity}}})
    b = BitDecodeMetadataBuilder.__new__(BitDecodeMetadataBuilder)
    b.bitdecode, b.num_kv_heads, b.device = cfg, KV_HEADS, torch.device("cpu")
    b.kv_cache_spec = types.SimpleNamespace(block_size=BLOCK)
    b.reorder_batch_threshold, b.pack_queries = 1 + drafts, False
    b.num_sms, b.ctas_per_sm = 132, 4
    b.page_format, b.rotation_signs, b.head_size = cfg.page_format(128, BLOCK), None, 128
    b.partial_out = b.partial_lse = torch.zeros(1)
    b.row_slots = None
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(max_model_len=max_len,
                                           get_total_num_hidden_layers=lambda: 32),
        scheduler_config=types.SimpleNamespace(max_num_seqs=max_seqs,
                                               max_num_batched_tokens=8192),
        cache_config=types.SimpleNamespace(num_gpu_blocks=kv_blocks))
    max_rows = b._init_decode_rows(vllm_config, max_seqs, b.device)
    b.sparse = b._init_sparse(vllm_config, max_rows, b.device)
    b.reset_persistent_buffers()
    return b


def _cam(lens: list[int], tokens_per_request: int = 1,
         prefilling: list[bool] | None = None) -> types.SimpleNamespace:
    """vLLM's CommonAttentionMetadata for a decode step of these lengths; ``prefilling``:
    its is_prefilling flags, None where vLLM gives none."""
    n = len(lens)
    qsl = torch.arange(0, tokens_per_request * n + 1, tokens_per_request, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return types.SimpleNamespace(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens,
        seq_lens_cpu_upper_bound=seq_lens, num_reqs=n, num_actual_tokens=int(qsl[-1]),
        max_query_len=tokens_per_request, max_seq_len=max(lens),
        block_table_tensor=torch.zeros(n, -(-max(lens) // BLOCK), dtype=torch.int32),
        slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64),
        is_prefilling=None if prefilling is None else torch.tensor(prefilling))


def _decode_step(b: BitDecodeMetadataBuilder, lens: list[int], tokens_per_request: int,
                 prefilling: list[bool] | None = None):
    """A decode step; no request prefilling unless ``prefilling`` says so."""
    flags = [False] * len(lens) if prefilling is None else prefilling
    return b.build(0, _cam(lens, tokens_per_request, flags))


@pytest.mark.parametrize("granularity,unit", [("page", 16), ("token", 1)])
@pytest.mark.parametrize("drafts", [0, 3])
def test_a_full_cache_of_rows_keeps_every_row_sparse(granularity, unit, drafts):
    """32 requests of 24K tokens (3/4 of a 1M-token cache), each 1 + drafts rows: every
    row gets keys, in ranges of one key per unit that do not overlap."""
    b = _builder(granularity, drafts)
    md = _decode_step(b, [24576 - 3 * i for i in range(32)], 1 + drafts)
    sp = md.sparse
    capacity = sp.keys.numel() // KV_HEADS
    assert sp.key_capacity == capacity
    lens = md.decode_seq_lens.tolist()
    offsets = sp.key_offsets.tolist()
    assert len(lens) == len(offsets) == 32 * (1 + drafts)
    end = 0
    for seq_len, row0 in zip(lens, offsets, strict=True):
        assert row0 == end  # packed: the exclusive sum of the rows' keys
        end += -(-seq_len // unit)
    assert end <= capacity
    fits = rows_with_score_keys(md.decode_seq_lens, sp.key_offsets, sp.min_seq_len, capacity)
    assert fits.all(), (offsets[fits.tolist().index(False)], capacity)


@pytest.mark.parametrize("drafts", [0, 3])
def test_prompt_chunks_on_the_decode_path_stay_dense(drafts):
    """A prompt's chunk no longer than a decode's query reaches the decode path (the token
    a prefix-cache hit leaves, a chunked prefill's last piece); prefill stays dense, so its
    rows get no score keys, whatever their length, and the other rows keep theirs."""
    b = _builder("page", drafts)
    prefilling = [False, True, False, True]
    md = _decode_step(b, [9000, 8193, 12000, 30000], 1 + drafts, prefilling)
    sp = md.sparse
    capacity = sp.keys.numel() // KV_HEADS
    fits = rows_with_score_keys(md.decode_seq_lens, sp.key_offsets, sp.min_seq_len, capacity)
    assert fits.tolist() == [not p for p in prefilling for _ in range(1 + drafts)]
    # the next step, every request decoding: the buffer's rows are written again
    md = _decode_step(b, [9001, 8194, 12001, 30001], 1 + drafts, [False] * 4)
    fits = rows_with_score_keys(md.decode_seq_lens, md.sparse.key_offsets,
                                md.sparse.min_seq_len, capacity)
    assert fits.all()


def test_prompt_rows_take_no_room_in_the_workspace():
    """A prompt row's keys are not counted: the next row starts where it would without
    it, so prompt tails never push later rows past the workspace."""
    b = _builder("token", 0)
    md = _decode_step(b, [9000, 8193, 12000], 1, [False, True, False])
    assert md.sparse.key_offsets.tolist() == [0, -1, 9000]


def test_missing_prefill_flags_are_announced_once(monkeypatch):
    """vLLM leaves is_prefilling out under dual-batch overlap and its V2 runner: the rows
    then decode as before (sparse where long enough), and the log says so once."""
    from vllm import logger as vllm_logger

    seen = _warnings(monkeypatch)
    vllm_logger._print_warning_once.cache_clear()  # once per process: from here
    b = _builder("token", 0)
    _decode_step(b, [9000, 8193], 1)  # flags given: nothing to say
    assert not [m for m, _ in seen if "is_prefilling" in m]
    for _ in range(2):
        md = b.build(0, _cam([9000, 8193]))
    assert len([m for m, _ in seen if "is_prefilling" in m]) == 1
    sp = md.sparse
    assert rows_with_score_keys(md.decode_seq_lens, sp.key_offsets, sp.min_seq_len,
                                sp.key_capacity).all()


def test_page_workspace_is_a_sixteenth_of_the_token_one():
    page, token = (_builder(g, 0).sparse.keys.numel() for g in ("page", "token"))
    slack = 32768 * KV_HEADS  # one row's tokens
    assert (page - slack) * 16 == token - slack


def test_rows_past_the_workspace_still_decode_densely():
    """Rows sharing prefix pages can hold more than the cache: those past the workspace
    get no keys (dense, exact), and no row's keys reach past it."""
    b = _builder("token", 0, kv_blocks=4096)  # a 64K-token cache
    md = _decode_step(b, [30000] * 8, 1)
    sp = md.sparse
    capacity = sp.keys.numel() // KV_HEADS
    fits = rows_with_score_keys(md.decode_seq_lens, sp.key_offsets, sp.min_seq_len,
                                capacity).tolist()
    assert fits[:3] == [True] * 3 and not any(fits[3:])


def test_rows_past_score_workspace_by_hand():
    """Keys packed in batch order (offsets 0, 0, 5, 15, 25 here): of the three rows long
    enough for sparse decoding, the last one's 25 + 10 tokens pass a capacity of 25."""
    lens = torch.tensor([0, 5, 10, 10, 10], dtype=torch.int32)
    assert rows_past_score_workspace(lens, 1, 8, 25) == (3, 1)
    assert rows_past_score_workspace(lens, 1, 8, 35) == (3, 0)
    assert rows_past_score_workspace(lens, 16, 8, 12) == (3, 1)  # keys 0, 1, 1, 1, 1


def _warnings(monkeypatch) -> list[tuple]:
    """The builder's log warnings, as (format, args) (vLLM's loggers do not propagate
    to pytest's caplog)."""
    seen: list[tuple] = []
    monkeypatch.setattr(metadata.logger, "warning",
                        lambda msg, *a, **kw: seen.append((msg, a)))  # kw: warning_once's
    return seen


@pytest.mark.parametrize("drafts", [0, 3])
def test_rows_past_the_workspace_are_logged_once(monkeypatch, drafts):
    """Rows that decode densely for want of keys are counted as the kernels' rule says
    and logged once per builder; a step that fits logs nothing."""
    seen = _warnings(monkeypatch)
    b = _builder("token", drafts, kv_blocks=4096)  # a 64K-token cache
    _decode_step(b, [1000] * 4, 1 + drafts)
    assert seen == []
    md = _decode_step(b, [30000] * 8, 1 + drafts)
    sp = md.sparse
    capacity = sp.keys.numel() // KV_HEADS
    fits = rows_with_score_keys(md.decode_seq_lens, sp.key_offsets, sp.min_seq_len,
                                capacity)
    assert len(seen) == 1
    dense, eligible, logged_capacity = seen[0][1]
    assert (dense, eligible) == (int((~fits).sum()), 8 * (1 + drafts)) and dense > 0
    assert logged_capacity == capacity
    _decode_step(b, [30000] * 8, 1 + drafts)
    assert len(seen) == 1


def test_a_full_cache_of_rows_logs_nothing(monkeypatch):
    seen = _warnings(monkeypatch)
    _decode_step(_builder("page", 3), [24576 - 3 * i for i in range(32)], 4)
    assert seen == []


def test_layer_ranges():
    assert layer_ranges([3, 4, 5, 7]) == "3-5, 7"
    assert layer_ranges(list(range(3, 13)) + list(range(14, 32))) == "3-12, 14-31"
    assert layer_ranges([]) == "none"
    assert layer_ranges([2]) == "2"


def test_engine_counter_of_sparse_rows_uses_the_kernels_rule(monkeypatch):
    """engine_probes.SparseRowCounter (the GPU tests' per-step hook): rows, rows long enough to
    decode sparsely, and those of them with keys, as rows_with_score_keys says."""
    from vllm_bitdecode.testing import engine_probes

    # the hook wraps the builder class; monkeypatch puts the original back afterwards
    monkeypatch.setattr(BitDecodeMetadataBuilder, "build", BitDecodeMetadataBuilder.build)
    counter = engine_probes.SparseRowCounter()
    _decode_step(_builder("page", 3), [24576 - 3 * i for i in range(32)], 4)
    assert counter.counts["rows"] == counter.counts["with_keys"] == 128
    b = _builder("token", 0, kv_blocks=4096)
    _decode_step(b, [30000] * 8, 1)
    _decode_step(b, [100] * 4, 1)  # shorter than min_seq_len: dense by design, not counted
    _decode_step(b, [9000, 9000], 1, [True, False])  # a prompt's chunk: dense by design
    assert counter.counts == {"steps": 4, "rows": 128 + 8 + 4 + 2, "eligible": 128 + 8 + 1,
                              "with_keys": 128 + 3 + 1, "prompt": 1,
                              "capacity": b.sparse.keys.numel() // KV_HEADS}


def _persistent(b: BitDecodeMetadataBuilder) -> dict[str, torch.Tensor]:
    sp = b.sparse
    return {"rotation_signs": b.rotation_signs, "row_seq_lens": b._row_seq_lens,
            "row_block_table": b._row_block_table, "sel_positions": sp.sel_positions,
            "sel_cache_tiles": sp.sel_cache_tiles,
            "sel_count": sp.sel_count, "keys": sp.keys, "key_offsets": sp.key_offsets,
            "row_slot": b.row_slots.device_row_slot}


def test_wake_up_writes_the_persistent_buffers_again(monkeypatch):
    """vLLM's sleep mode returns the builders' buffers uninitialized (they live in the KV
    cache's memory pool): the hook on the worker's wake_up writes their starting values
    again (rotation signs, zeros, -1 for selected positions, every row of the channel-K
    row-slot table to the scratch slot) once the KV cache is back, and not for a wake-up
    of the weights alone, nor for another engine's wake-up in the same process."""
    from vllm_bitdecode.page_format import rotation_signs
    from vllm_bitdecode.residual_slots import RowSlotTable

    monkeypatch.setattr(metadata, "_BUILDERS", metadata.weakref.WeakSet())
    b = _builder("page", drafts=3)
    b.rotation_signs = torch.empty(128)  # as with rotate_k
    b.row_slots = RowSlotTable(4, "cpu")  # (channel mode, which sparse mode is not: the
    b.vllm_config = types.SimpleNamespace()  # reset covers both in one builder here)
    b.reset_persistent_buffers()
    start = {name: t.clone() for name, t in _persistent(b).items()}
    assert torch.equal(start["rotation_signs"], rotation_signs(128))
    assert (start["sel_positions"] == -1).all() and not start["row_block_table"].any()
    assert (start["sel_cache_tiles"] == -1).all()  # page granularity
    assert (start["row_slot"] == 4).all()
    metadata._BUILDERS.add(b)

    class Worker:  # vLLM's gpu_worker.Worker, as far as the hook sees it
        def __init__(self, vllm_config):
            self.vllm_config = vllm_config

        def wake_up(self, tags=None):
            self.woken = tags

    metadata.install_wake_up_hook(Worker)
    metadata.install_wake_up_hook(Worker)  # idempotent: one wrapper
    assert not getattr(Worker.wake_up.__wrapped__, "_bitdecode", False)
    for t in _persistent(b).values():
        t.fill_(7)  # what a sleep may leave
    worker = Worker(b.vllm_config)
    worker.wake_up(["weights"])
    assert worker.woken == ["weights"]
    assert all((t == 7).all() for t in _persistent(b).values())
    Worker(types.SimpleNamespace()).wake_up(None)  # another engine's worker
    assert all((t == 7).all() for t in _persistent(b).values())
    for tags in (["kv_cache"], None):
        for t in _persistent(b).values():
            t.fill_(7)
        worker.wake_up(tags)
        for name, t in _persistent(b).items():
            assert torch.equal(t, start[name]), name


@pytest.mark.parametrize(("max_len", "warned"), [(2**23 - 4096, False), (2**23 + 16, True)])
def test_rows_past_the_capped_workspace_are_announced(monkeypatch, max_len, warned):
    """The workspace is capped at MAX_SCORE_KEYS keys and the kernels' fit test counts a
    row's tokens: with --max-model-len past the cap, start-up says that the longest rows
    decode densely."""
    from vllm_bitdecode.backend import metadata

    lines: list[str] = []
    monkeypatch.setattr(metadata.logger, "warning", lambda msg, *a: lines.append(msg % a))
    _builder("page", 0, max_seqs=1, max_len=max_len, kv_blocks=4)
    said = [line for line in lines if "capped at" in line]
    assert bool(said) == warned, lines
    if warned:
        assert f"{metadata.MAX_SCORE_KEYS} keys" in said[0] and str(max_len) in said[0]


@pytest.mark.parametrize("granularity,max_seqs,warned", [
    ("token", 1024, True),  # 1024 rows x 8 heads x 2048 tokens x 4 B: 64 MiB
    ("page", 1024, False), ("token", 64, False)])  # 4 MiB each
def test_a_large_selection_buffer_is_announced(monkeypatch, granularity, max_seqs, warned):
    """The selected positions' buffer is made outside vLLM's KV budget: start-up warns
    when it passes SELECTION_WARN_BYTES, with its size, and says what lowers it."""
    seen = _warnings(monkeypatch)
    monkeypatch.setattr(metadata, "SELECTION_WARN_BYTES", 32 << 20)
    b = _builder(granularity, 0, max_seqs=max_seqs)
    tiles = b.sparse.sel_cache_tiles  # pages: their places in the cache, as many
    size = (b.sparse.sel_positions.numel() + (0 if tiles is None else tiles.numel())) * 4
    notes = [m % a for m, a in seen if "selected positions" in m]
    assert bool(notes) == warned == (size >= 32 << 20), (size, notes)
    if warned:
        assert f"{size / 2**30:.2f} GiB" in notes[0] and "page granularity" in notes[0]
