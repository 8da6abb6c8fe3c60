"""vLLM end to end with a dummy-weight Llama (32 query / 8 KV heads, d=128).

Each engine runs in its own subprocess (vllm_bitdecode.testing). The attention output
of the last layer is recorded at every forward and compared with the FLASH_ATTN
engine's; every request is forced to one token so that both engines see identical
inputs at every decode step, and the decode kernel is compared, not just prefill.
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_bitdecode.testing import run_in_subprocess, write_llama_config

pytestmark = pytest.mark.gpu

PROMPT_LENS = (7, 130, 1000, 2500)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_llama_config(tmp_path_factory.mktemp("llama"), num_hidden_layers=4,
                                  vocab_size=32000, max_position_embeddings=8192))


def _spec(model_dir, backend, **extra):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 32000) for _ in range(n)] for n in PROMPT_LENS]
    return dict(
        model=model_dir, backend=backend, enforce_eager=True, gpu_memory_utilization=0.4,
        max_model_len=4096,
        generate=dict(prompts=prompts, max_tokens=MAX_TOKENS, logprobs=5,
                      forced_tokens=[11, 22, 33, 44], capture_attention=True),
        **extra,
    )


@pytest.fixture(scope="module")
def flash_attn_run(model_dir):
    return run_in_subprocess(_spec(model_dir, "FLASH_ATTN"))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# Dummy weights give near-uniform attention, so the output error is the V quantization
# error of Gaussian data: 0.100 (4-bit) and 0.50 (2-bit) in the CPU reference's tests;
# measured here on an H100 (2026-11-22): 0.099 and 0.497.
@pytest.mark.parametrize("bits, prefill_bound, decode_bound", [(4, 0.12, 0.12), (2, 0.6, 0.6)])
def test_bitdecode_matches_flash_attention_within_quantization_error(
    model_dir, flash_attn_run, bits, prefill_bound, decode_bound
):
    run = run_in_subprocess(_spec(model_dir, "BITDECODE", bitdecode={"bits": bits}))
    assert "Using AttentionBackendEnum.BITDECODE backend" in run["log"] or "BITDECODE" in run["log"]
    assert run["logprobs_finite"] and run["num_logprobs"] > 0
    assert run["tokens"] == flash_attn_run["tokens"] == [[t] * MAX_TOKENS for t in (11, 22, 33, 44)]
    ours, theirs = run["attention"], flash_attn_run["attention"]
    assert len(ours) == len(theirs) == MAX_TOKENS  # one prefill + decode steps
    errs = [_rel_err(a, b) for a, b in zip(ours, theirs, strict=True)]
    print(f"bits={bits}: last-layer attention relative error per step: "
          + ", ".join(f"{e:.4f}" for e in errs))
    assert errs[0] <= prefill_bound
    assert max(errs[1:]) <= decode_bound
    # the check can fail: against unrelated outputs (another step's) the error is ~1
    assert _rel_err(ours[1], theirs[0][: ours[1].shape[0]]) > 1.5 * max(errs[1:])
    assert run["kv_cache_tokens"] > flash_attn_run["kv_cache_tokens"] * (3.5 if bits == 4 else 6)


def test_bitdecode_with_cuda_graphs_generates(model_dir):
    """The default (compiled, CUDA-graph) engine runs and gives finite logprobs."""
    spec = _spec(model_dir, "BITDECODE")
    spec["enforce_eager"] = False
    spec["generate"]["capture_attention"] = False
    spec["generate"]["forced_tokens"] = None
    run = run_in_subprocess(spec)
    assert run["logprobs_finite"] and run["num_logprobs"] > 0
    assert all(len(t) == MAX_TOKENS for t in run["tokens"])


@pytest.mark.parametrize(
    "bitdecode, message",
    [({"bits": 3}, "bitdecode.bits=3"), ({"group": 64}, "unknown bitdecode setting")],
)
def test_bad_config_fails_at_startup_with_one_clear_line(model_dir, bitdecode, message):
    spec = _spec(model_dir, "BITDECODE", bitdecode=bitdecode)
    with pytest.raises(RuntimeError, match=message):
        run_in_subprocess(spec)
