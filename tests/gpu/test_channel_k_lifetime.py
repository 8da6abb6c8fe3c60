"""Per-channel K mode: the residual's lifetime under what vLLM's persistent batch does
between steps (issue #7; docs/per-channel-k-design.md, section 11). The shipped model,
4 bits, V groups of 32, CUDA graphs on, six prompts of 211-1203 tokens whose requests stop
after 5-46 tokens, each in the middle of a page:

- in one batch with async scheduling: every request that reaches its max_tokens sits out
  the next step while still running (vLLM takes it out of the persistent batch and keeps
  its state), and the batch condenses and reorders as requests leave, at six different
  steps; decode batches of 6, 5, 4, 3 run padded to the CUDA-graph sizes;
- the same with async scheduling off;
- one request at a time (``max_num_seqs`` 1, so one residual slot, and few enough KV
  blocks that each request reuses blocks of the one before it, which finished mid-page):
  the reference, since there a request never shares a step with another.

The batched runs must give the reference's greedy tokens by vLLM's rule for engines whose
arithmetic differs (the split-K plan and so the summation order follow the batch), and
counters in the worker (``testing.engine_probes.install_batch_counter``) prove that requests were
running but unscheduled and that rows moved. Preemption, prefix-cache hits and chunked
prefill ending mid-page are in test_serving.py (BITDECODE_SERVING_K_MODE=channel) and
test_channel_k_e2e.py. About 3 engine starts, 2 minutes.
"""

from __future__ import annotations

import functools

import pytest

from vllm_bitdecode import stdlib_llama as data
from vllm_bitdecode.testing.comparisons import assert_greedy_close
from vllm_bitdecode.testing.engine import run_in_subprocess

pytestmark = pytest.mark.gpu

BLOCK = 16
PROMPT_LENS = (211, 397, 530, 777, 901, 1203)
GEN = [5, 13, 21, 30, 37, 46]  # each request stops at its own step, mid-page
MAX_MODEL_LEN = 2048
# every request ends mid-page, within the model length (the tests below rely on it)
assert all((n + g) % BLOCK for n, g in zip(PROMPT_LENS, GEN, strict=True))
assert all(n + g < MAX_MODEL_LEN for n, g in zip(PROMPT_LENS, GEN, strict=True))


@functools.cache
def _prompts() -> list[list[int]]:
    held = data.heldout_tokens(data.MODEL_DIR, data.load_tokenizer(data.MODEL_DIR))
    prompts, start = [], 0
    for n in PROMPT_LENS:
        prompts.append([int(t) for t in held[start : start + n]])
        start += n + 101
    return prompts


@functools.cache
def _run(**engine) -> dict:
    if not (data.MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped model is missing")
    return run_in_subprocess(dict(
        model=str(data.MODEL_DIR), load_format="auto", backend="BITDECODE",
        bitdecode={"bits": 4, "k_mode": "channel", "group_size": 32},
        gpu_memory_utilization=0.3, max_model_len=MAX_MODEL_LEN, enforce_eager=False,
        count_graph_replays=True,
        jobs=[dict(name="gen", prompts=_prompts(), max_tokens=GEN, logprobs=5,
                   reset_prefix_cache=True, capture=False, count_batch=True)], **engine),
        timeout=600)


def _one_at_a_time() -> dict:
    # the longest request needs 79 blocks of 16; 136 blocks make the second request take
    # 57 never-used blocks and then blocks the first one freed mid-page, and so on
    return _run(max_num_seqs=1, num_gpu_blocks_override=MAX_MODEL_LEN // BLOCK + 8,
                async_scheduling=True)


def _assert_matches_reference(res: dict, what: str) -> None:
    ref = _one_at_a_time()["jobs"]["gen"]
    got = res["jobs"]["gen"]
    assert [len(t) for t in got["tokens"]] == GEN, f"{what}: {got['finish_reasons']}"
    for i, n in enumerate(GEN):
        assert_greedy_close([got["tokens"][i]], [got["logprobs"][i]], [ref["tokens"][i]],
                            [ref["logprobs"][i]], n, f"{what}, request {i}")


def test_one_at_a_time_reuses_the_slot_and_blocks_of_finished_requests():
    res = _one_at_a_time()
    assert "BITDECODE KV cache: " in res["log"]  # the builder's start-up line
    assert "K per channel over 16-token groups" in res["log"]
    batch = res["jobs"]["gen"]["batch"]
    assert batch["moved"] == 0, batch  # one request per step: nothing to condense
    assert res["jobs"]["gen"]["graph_replays"] > 0


def test_staggered_finishes_with_async_scheduling_match_one_at_a_time():
    res = _run(max_num_seqs=8, async_scheduling=True)
    batch = res["jobs"]["gen"]["batch"]
    assert batch["unscheduled"] > 0, f"no running request sat out a step: {batch}"
    assert batch["moved"] > 0, f"the persistent batch never moved a row: {batch}"
    assert res["jobs"]["gen"]["graph_replays"] > 0
    _assert_matches_reference(res, "async scheduling, 6 requests in one batch")


def test_staggered_finishes_without_async_scheduling_match_one_at_a_time():
    res = _run(max_num_seqs=8, async_scheduling=False)
    batch = res["jobs"]["gen"]["batch"]
    assert batch["moved"] > 0, f"the persistent batch never moved a row: {batch}"
    _assert_matches_reference(res, "synchronous scheduling, 6 requests in one batch")
