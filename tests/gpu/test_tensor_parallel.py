"""Tensor parallel with BITDECODE: TP=2 through multiprocessing and through Ray equals TP=1.

Dummy weights are drawn per rank, so a TP=2 dummy model is not the TP=1 model: these
tests use the shipped model (models/stdlib-llama-18m, 4 query heads over 1 KV head), whose
single KV head every rank keeps a copy of while the query heads are split 2 + 2. Each
engine runs in its own process (vllm_bitdecode.testing) on the same prompts: held-out
stdlib text and pass-key prompts, greedy, 24 tokens, 4-bit pages.

Compared: greedy tokens, request by request, with the tie rule of
``vllm_bitdecode.testing.assert_greedy_equal_up_to_ties`` (the all-reduce of TP=2 sums in
another order, so two log-probabilities within 0.02 may swap once per request, after which
that request is not compared further), the pass-key
answers (right in every engine), and the KV-cache size each engine reports (a rank holds
the same KV head, so the same tokens).

Needs two GPUs (skipped otherwise); the Ray case also needs Ray (the device kit built
with WITH_RAY=1). About 3 engine starts, 2-3 minutes.
"""

from __future__ import annotations

import functools
import importlib.util
import random

import pytest
import torch

from vllm_bitdecode import stdlib_llama as data
from vllm_bitdecode.testing import assert_greedy_equal_up_to_ties, run_in_subprocess

pytestmark = pytest.mark.gpu

GEN = 24
TOP = 2


def _needs_two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"tensor parallel needs 2 GPUs; {torch.cuda.device_count()} present")
    if not (data.MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped model is missing")


@functools.cache
def _prompts() -> tuple[list[list[int]], list[str]]:
    """Held-out windows and pass-key prompts, with the pass keys ("" for the windows)."""
    tok = data.load_tokenizer(data.MODEL_DIR)
    held = data.heldout_tokens(data.MODEL_DIR, tok)
    prompts = data.ppl_windows(held, 3000, 6 * 2999)
    tasks = data.RetrievalTasks(tok)
    rng = random.Random(9)
    answers = [""] * len(prompts)
    for depth in (0.1, 0.5, 0.9):
        ex = tasks.eval_example("passkey", rng, held, 6000, depth)
        prompts.append(list(ex.prompt))
        answers.append(ex.answer)
    return prompts, answers


def _spec(tp: int, executor: str | None) -> dict:
    prompts, _ = _prompts()
    spec = dict(model=str(data.MODEL_DIR), load_format="auto", backend="BITDECODE",
                bitdecode={"bits": 4}, tensor_parallel_size=tp, gpu_memory_utilization=0.3,
                max_model_len=data.MAX_CONTEXT, max_num_seqs=16, enforce_eager=False,
                jobs=[dict(name="gen", prompts=prompts, max_tokens=GEN, logprobs=TOP,
                           reset_prefix_cache=True, capture=False)])
    if executor:
        spec["distributed_executor_backend"] = executor
    return spec


@pytest.fixture(scope="module")
def single_gpu():
    _needs_two_gpus()
    return run_in_subprocess(_spec(1, None), timeout=600)


def _assert_passkeys(res: dict, what: str) -> None:
    _, answers = _prompts()
    tok = data.load_tokenizer(data.MODEL_DIR)
    for toks, answer in zip(res["jobs"]["gen"]["tokens"], answers, strict=True):
        if answer:
            text = tok.decode(toks)
            assert data.answer_correct(text, answer), f"{what}: {text!r} for {answer}"


@pytest.mark.parametrize("executor", ["mp", "ray"])
def test_tp2_equals_single_gpu(single_gpu, executor):
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (device kit: WITH_RAY=1)")
    res = run_in_subprocess(_spec(2, executor), timeout=600)
    assert "BITDECODE" in res["log"]
    _assert_passkeys(single_gpu, "TP=1")
    _assert_passkeys(res, f"TP=2 {executor}")
    test, ref = res["jobs"]["gen"], single_gpu["jobs"]["gen"]
    assert_greedy_equal_up_to_ties(test["tokens"], ref["tokens"], ref["logprobs"], GEN,
                                   f"TP=2 {executor} vs TP=1")
    assert res["kv_cache_tokens"] and single_gpu["kv_cache_tokens"]
    print(f"TP=2 {executor}: KV cache {res['kv_cache_tokens']} tokens "
          f"(TP=1: {single_gpu['kv_cache_tokens']})")
