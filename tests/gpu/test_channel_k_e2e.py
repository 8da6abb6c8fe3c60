"""Per-channel K mode through vLLM (issue #7): the shipped model with
``bitdecode.k_mode = "channel"``, CUDA graphs on, pass-key prompts of about 6K tokens.

- the pass keys are found, as with per-token 4-bit pages, and at 2 bits in issue #5's
  configuration (V in groups of 32, 64-token pages: four K groups per page, the newest 64
  tokens exact);
- at 128-token pages (the recommended 2-bit setting), with the prefill workspace filled
  with NaN after start-up: FlashAttention-3 reads 128-token pages whole (TMA), so a row
  of a request's last scratch page that prefill does not write would reach the output;
- prefill cut into chunks that end mid-page (``max_num_batched_tokens`` 1000, not a
  multiple of the block size) gives the same greedy tokens as prefill in one piece, by
  vLLM's rule for engines whose arithmetic may differ: the own-page rule makes what a
  query sees independent of the schedule, and only FlashAttention's summation order
  changes with the chunking.
The other lifetime cases of the design's test plan run in tests/gpu/test_serving.py with
BITDECODE_SERVING_K_MODE=channel (and BITDECODE_SERVING_BLOCK=64 for 64-token pages):
preemption, prefix hits, chunks ending mid-page, CUDA graphs; and in
tests/gpu/test_channel_k_lifetime.py: requests finishing mid-page at different steps,
running but unscheduled under async scheduling, the persistent batch condensing, a
finished request's slot and blocks reused.
"""

from __future__ import annotations

import functools

import pytest

from vllm_bitdecode import stdlib_llama as data
from vllm_bitdecode.testing.comparisons import assert_greedy_close
from vllm_bitdecode.testing.engine import run_in_subprocess

pytestmark = pytest.mark.gpu

GEN = 16


@functools.cache
def _prompts() -> tuple[list[list[int]], list[str]]:
    return data.passkey_prompts(13, (0.1, 0.5, 0.9))


@functools.cache
def _run(bits: int = 4, group_size: int = 128, k_params: str = "fp16", **engine) -> dict:
    if not (data.MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped model is missing")
    prompts, _ = _prompts()
    return run_in_subprocess(dict(
        model=str(data.MODEL_DIR), load_format="auto", backend="BITDECODE",
        bitdecode={"bits": bits, "k_mode": "channel", "group_size": group_size,
                   "k_params": k_params},
        gpu_memory_utilization=0.3,
        max_model_len=data.MAX_CONTEXT, max_num_seqs=4, enforce_eager=False,
        jobs=[dict(name="gen", prompts=prompts, max_tokens=GEN, logprobs=5,
                   reset_prefix_cache=True, capture=False)], **engine), timeout=600)


def _right(res: dict) -> int:
    return data.count_right(res["jobs"]["gen"]["tokens"], _prompts()[1])


def test_channel_mode_finds_the_pass_keys():
    res = _run()
    assert _right(res) == len(_prompts()[1]), res["jobs"]["gen"]["tokens"]


def test_2bit_channel_mode_with_64_token_pages_finds_the_pass_keys():
    res = _run(bits=2, group_size=32, block_size=64)
    assert _right(res) == len(_prompts()[1]), res["jobs"]["gen"]["tokens"]


def test_2bit_channel_mode_at_128_token_pages_reads_no_stale_workspace_row():
    res = _run(bits=2, group_size=32, block_size=128, poison_prefill_workspace=True)
    assert res["workspaces_poisoned"] >= 1
    gen = res["jobs"]["gen"]
    assert all(lp == lp for steps in gen["logprobs"] for step in steps
               for lp in step.values()), "NaN logprobs: prefill read a stale workspace row"
    assert _right(res) == len(_prompts()[1]), gen["tokens"]


def test_fp8_k_params_find_the_pass_keys_and_chunking_changes_nothing():
    """K params in e4m3 at 64-token pages: the pass keys, and chunks ending mid-page give
    the same greedy tokens as prefill in one piece."""
    whole = _run(k_params="fp8", block_size=64)
    assert _right(whole) == len(_prompts()[1]), whole["jobs"]["gen"]["tokens"]
    chunked = _run(k_params="fp8", block_size=64, max_num_batched_tokens=1000,
                   enable_chunked_prefill=True)
    a, b = whole["jobs"]["gen"], chunked["jobs"]["gen"]
    assert_greedy_close(b["tokens"], b["logprobs"], a["tokens"], a["logprobs"], GEN,
                        "channel mode, fp8 params, chunks of 1000 vs one piece")


def test_chunked_prefill_ending_mid_page_gives_the_same_tokens():
    whole, chunked = _run(), _run(max_num_batched_tokens=1000, enable_chunked_prefill=True)
    a, b = whole["jobs"]["gen"], chunked["jobs"]["gen"]
    assert_greedy_close(b["tokens"], b["logprobs"], a["tokens"], a["logprobs"], GEN,
                        "channel mode, chunks of 1000 vs one piece")
