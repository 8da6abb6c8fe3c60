"""The metadata builder's per-step host-to-device copies leave the host free while the GPU
is busy, as async scheduling needs: vLLM prepares step N + 1 on the host while step N
runs, and a builder that waited for the stream would serialise the two.

Each case queues about 100 ms of GPU work (``torch.cuda._sleep``), times the builder
function on the host, then checks that the stream was still busy when the function
returned (so the timing means something) and that the device tensors hold what the
same function builds on the CPU.

The copies are ``non_blocking`` from pageable host tensors, which CUDA's notes allow to
synchronise with the stream. Measured on an H200 (driver 580.159.04, 2026-12-01) with
a variant that pinned each tensor first (``pin_memory()``): the pageable copy of 4 KB
returned in 0.05 ms behind the busy stream, the pinned one in 0.31 ms (the builder
functions in 0.18-0.60 ms, none waiting); pinning bought nothing and cost host time, so
the builder keeps pageable copies and this test guards that they, and anything added
to the builder later, do not wait. In this form (pageable) it has not yet run on a GPU.
"""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch

from vllm_bitdecode import kc_prefill
from vllm_bitdecode.backend.metadata import BitDecodeMetadataBuilder, build_prefill_groups

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
BLOCK = 16
BUSY_CYCLES = 200_000_000  # about 100 ms on an H100 / H200
HOST_LIMIT_S = 0.02  # a builder call that waits for the stream takes the whole 100 ms


def _behind_busy_stream(fn):
    """(fn's result, host seconds of the call, seconds the stream was still busy after)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return out, t1 - t0, time.perf_counter() - t1


def _assert_host_free(fn, what: str):
    fn()  # warm: lazy CUDA state, first allocations
    torch.cuda.synchronize()
    out, host_s, busy_after_s = _behind_busy_stream(fn)
    # the stream outlived the call, else the timing says nothing
    assert busy_after_s > 2 * HOST_LIMIT_S, (what, busy_after_s)
    assert host_s < HOST_LIMIT_S, f"{what} waited {host_s * 1e3:.1f} ms for the GPU"
    print(f"{what}: host {host_s * 1e3:.2f} ms, stream busy {busy_after_s * 1e3:.0f} ms after")
    return out


def test_pageable_copy_of_a_step_tensor_does_not_wait():
    """The driver behaviour the builder relies on: a small non_blocking copy from
    pageable memory is staged and queued, not run after a stream sync."""
    host = torch.arange(1000, dtype=torch.int32)
    dev = _assert_host_free(lambda: host.to(DEV, non_blocking=True), "pageable copy")
    host.fill_(-1)  # staged when the call returned: the copy does not see this
    assert torch.equal(dev.cpu(), torch.arange(1000, dtype=torch.int32))


def test_prefill_groups_do_not_wait():
    # three prefills that share the workspace, then one longer than it (windows)
    qlens, lens, capacity = [40, 7, 300, 96], [200, 30, 900, 5000], 2048
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(qlens)]), dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    table = torch.arange(len(lens) * 320, dtype=torch.int32).reshape(len(lens), 320)
    seq_dev, table_dev = seq_lens.to(DEV), table.to(DEV)
    groups = _assert_host_free(
        lambda: build_prefill_groups(qsl, seq_lens, seq_dev, table_dev, capacity, DEV, BLOCK),
        "build_prefill_groups")
    expected = build_prefill_groups(qsl, seq_lens, seq_lens, table, capacity,
                                    torch.device("cpu"), BLOCK)
    assert len(groups) == len(expected) > 2
    for g, e in zip(groups, expected, strict=True):
        assert g.query_start_loc.device.type == "cuda"
        assert torch.equal(g.query_start_loc.cpu(), e.query_start_loc)
        assert torch.equal(g.kv_start_loc.cpu(), e.kv_start_loc)
        assert torch.equal(g.seq_lens.cpu(), e.seq_lens)


def test_decode_rows_do_not_wait():
    qsl = [0, 1, 5, 8, 8]  # requests of 1, 4 and 3 query tokens, then graph padding
    lens = torch.tensor([50, 700, 33, 0], dtype=torch.int32)
    table = torch.randint(0, 1000, (4, 64), dtype=torch.int32)

    def builder(device):
        return types.SimpleNamespace(
            device=device, kv_cache_spec=types.SimpleNamespace(block_size=BLOCK),
            _row_seq_lens=torch.full((16,), -7, dtype=torch.int32, device=device),
            _row_block_table=torch.full((16, 64), -7, dtype=torch.int32, device=device))

    def cam(device):
        return types.SimpleNamespace(
            query_start_loc_cpu=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=lens.to(device), block_table_tensor=table.to(device), max_seq_len=700)

    expand = BitDecodeMetadataBuilder._expand_decode_rows
    b, c = builder(DEV), cam(DEV)
    seq, rows = _assert_host_free(lambda: expand(b, c, 4, 10), "_expand_decode_rows")
    e_seq, e_rows = expand(builder(torch.device("cpu")), cam(torch.device("cpu")), 4, 10)
    assert torch.equal(seq.cpu(), e_seq) and torch.equal(rows.cpu(), e_rows)


def test_channel_k_prefill_plan_does_not_wait():
    qsl, lens = [0, 37, 40, 140], [80, 19, 100]
    plan = kc_prefill.plan_kc_prefill(qsl, lens, [0, 1, 2], BLOCK)

    def on_device():
        plan._on_device.clear()  # on() copies once per step and device
        return plan.on(DEV), kc_prefill.workspace_starts(plan).to(DEV, non_blocking=True)

    tensors, starts = _assert_host_free(on_device, "KCPrefillPlan.on")
    for name, t in tensors.items():
        assert torch.equal(t.cpu(), getattr(plan, name)), name
    assert torch.equal(starts.cpu(), kc_prefill.workspace_starts(plan))
