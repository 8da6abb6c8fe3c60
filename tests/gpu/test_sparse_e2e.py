"""Sparse decode through vLLM (issue #6): the shipped model with ``bitdecode.sparse`` on.

The shipped model has 6 layers, so the default plan is dense 0-1, selection 2 (the
correction layer would be layer 2 again), reuse 3-5. Each engine runs in its own process
with CUDA graphs on, on pass-key prompts of about 6K tokens (prefill stays dense; every
generated token decodes sparsely past ``min_seq_len``):

- with a token budget larger than every sequence, selection keeps every position and the
  reuse layers attend to all of them, so greedy output stays with dense BITDECODE's by
  vLLM's rule for engines whose arithmetic may differ (the gather path may round
  differently, and a 4-bit cache amplifies any difference: see test_tensor_parallel);
- with a budget of 512 tokens the pass keys are still found (TidalDecode's claim for
  retrieval at k >= 256), and the output stays close to dense decoding;
- both with single tokens (TidalDecode) and with 16-token pages (``granularity: "page"``);
- the engine log shows sparse mode's layer plan was used, not a silent dense fallback.
"""

from __future__ import annotations

import functools

import pytest

from vllm_bitdecode import stdlib_llama as data
from vllm_bitdecode.testing import assert_greedy_close, run_in_subprocess

pytestmark = pytest.mark.gpu

GEN = 16


@functools.cache
def _prompts() -> tuple[list[list[int]], list[str]]:
    return data.passkey_prompts(11, (0.1, 0.3, 0.5, 0.7, 0.9))


def _run(sparse: dict | None) -> dict:
    if not (data.MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped model is missing")
    prompts, _ = _prompts()
    bitdecode = {"bits": 4} | ({"sparse": sparse} if sparse else {})
    return run_in_subprocess(dict(
        model=str(data.MODEL_DIR), load_format="auto", backend="BITDECODE",
        bitdecode=bitdecode, gpu_memory_utilization=0.3, max_model_len=data.MAX_CONTEXT,
        max_num_seqs=8, enforce_eager=False,
        jobs=[dict(name="gen", prompts=prompts, max_tokens=GEN, logprobs=5,
                   reset_prefix_cache=True, capture=False)]), timeout=600)


@functools.cache
def _dense() -> dict:
    return _run(None)


def _answers_right(res: dict) -> int:
    return data.count_right(res["jobs"]["gen"]["tokens"], _prompts()[1])


@pytest.mark.parametrize("granularity", ["token", "page"])
def test_budget_above_every_length_equals_dense_decoding(granularity):
    res = _run({"enabled": True, "token_budget": 8192, "min_seq_len": 1,
                "granularity": granularity})
    assert "BITDECODE sparse decode: dense layers [0, 1], selection layers [2]" in res["log"]
    assert f"selection of {granularity}s" in res["log"]
    dense, gen = _dense()["jobs"]["gen"], res["jobs"]["gen"]
    assert_greedy_close(gen["tokens"], gen["logprobs"], dense["tokens"], dense["logprobs"],
                        GEN, f"sparse {granularity}s (budget 8192) vs dense")


@pytest.mark.parametrize("granularity", ["token", "page"])
def test_budget_512_still_retrieves_the_pass_keys(granularity):
    res = _run({"enabled": True, "token_budget": 512, "min_seq_len": 1024,
                "granularity": granularity})
    n = len(_prompts()[1])
    right, dense_right = _answers_right(res), _answers_right(_dense())
    print(f"pass keys right: sparse {granularity}s k=512 {right}/{n}, dense {dense_right}/{n}")
    assert dense_right == n
    assert right >= n - 1, f"sparse decoding at k=512 answered {right} of {n} pass keys"
