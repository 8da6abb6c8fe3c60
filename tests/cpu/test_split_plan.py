"""The decode split planner: one wave of resident CTAs, never more."""

import pytest

from vllm_bitdecode.backend.metadata import (
    MAX_SPLITS,
    MIN_TILES_PER_SPLIT,
    plan_num_splits,
    plan_reuse_splits,
)


@pytest.mark.parametrize("num_sms", [132, 114, 78])
@pytest.mark.parametrize("ctas_per_sm", [2, 3, 4])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_grid_fits_one_wave_and_fills_it(num_sms, ctas_per_sm, kv_heads):
    slots = num_sms * ctas_per_sm
    for batch in range(1, 300):
        splits = plan_num_splits(batch, kv_heads, num_sms, ctas_per_sm)
        assert 1 <= splits <= MAX_SPLITS
        ctas = splits * batch * kv_heads
        if splits > 1:
            assert ctas <= slots, "a split that forces a second wave is never worth it"
        if splits < MAX_SPLITS and ctas <= slots:
            # one more split would overflow the wave
            assert (splits + 1) * batch * kv_heads > slots


def test_h100_llama_shapes():
    # 8 KV heads, 132 SMs, 4 CTAs per SM: 528 slots
    assert plan_num_splits(1, 8, 132, 4) == 64  # capped
    assert plan_num_splits(8, 8, 132, 4) == 8  # 512 CTAs
    assert plan_num_splits(64, 8, 132, 4) == 1
    assert plan_num_splits(0, 8, 132, 4) == 1


@pytest.mark.parametrize("num_sms", [132, 78])
@pytest.mark.parametrize("kv_heads", [1, 8])
@pytest.mark.parametrize("budget", [16, 256, 2048, 8192])
def test_reuse_splits_keep_tiles_per_split_and_stay_within_the_dense_plan(num_sms, kv_heads,
                                                                          budget):
    tiles = -(-budget // 16)
    for batch in range(1, 300):
        dense = plan_num_splits(batch, kv_heads, num_sms, 4)
        splits = plan_reuse_splits(batch, kv_heads, num_sms, budget, dense)
        assert 1 <= splits <= dense
        if splits > 1:
            # every split gets at least the minimum of tiles, and the grid stays within
            # about two CTAs per SM
            assert -(-tiles // splits) >= MIN_TILES_PER_SPLIT
            assert splits * batch * kv_heads <= 2 * num_sms


def test_reuse_splits_at_the_measured_llama_shapes():
    # H200 (132 SMs), 8 KV heads: the split counts bench_sparse --split-sweep found best
    # or within 8% of best at 128K (2026-11-30)
    assert plan_reuse_splits(1, 8, 132, 2048, 64) == 16
    assert plan_reuse_splits(8, 8, 132, 2048, 8) == 4
    assert plan_reuse_splits(1, 8, 132, 256, 64) == 2
    assert plan_reuse_splits(8, 8, 132, 256, 8) == 2
    assert plan_reuse_splits(64, 8, 132, 2048, 1) == 1
    assert plan_reuse_splits(0, 8, 132, 2048, 1) == 1
