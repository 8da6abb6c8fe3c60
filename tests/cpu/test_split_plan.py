"""The decode split planner: one wave of resident CTAs, never more."""

import pytest

from vllm_bitdecode.backend.metadata import MAX_SPLITS, plan_num_splits


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
