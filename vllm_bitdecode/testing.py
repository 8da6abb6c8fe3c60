"""Dummy-weight Llama engines for GPU tests and benchmarks (no downloads anywhere).

Each engine runs in a fresh subprocess (``python -m vllm_bitdecode.testing SPEC OUT``) so
that engines with different backends never share GPU memory or plugin state, and so the
engine log (which carries vLLM's "GPU KV cache size" line) can be read back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_llama_config(path: str | Path, **overrides: Any) -> Path:
    """A directory holding only config.json: enough for load_format="dummy"."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**LLAMA3_8B, **overrides}, indent=1))
    return path


def engine_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    backend = spec.get("backend", "BITDECODE")
    kw: dict[str, Any] = dict(
        model=spec["model"],
        load_format="dummy",
        skip_tokenizer_init=True,
        attention_backend=backend,
        enforce_eager=spec.get("enforce_eager", False),
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.85),
        max_model_len=spec.get("max_model_len", 8192),
        max_num_seqs=spec.get("max_num_seqs", 64),
        seed=0,
    )
    if backend == "BITDECODE":
        kw["additional_config"] = {"bitdecode": spec.get("bitdecode", {})}
    if "kv_cache_dtype" in spec:
        kw["kv_cache_dtype"] = spec["kv_cache_dtype"]
    for key in ("max_num_batched_tokens", "enable_chunked_prefill", "enable_prefix_caching",
                "num_gpu_blocks_override", "block_size"):
        if key in spec:
            kw[key] = spec[key]
    return kw


def _install_hook(model):
    """Record the last attention layer's output at every forward (eager engines only)."""
    import torch

    attn = model.model.layers[-1].self_attn.attn
    store: list[torch.Tensor] = []
    model._bitdecode_attn_outputs = store
    attn.register_forward_hook(lambda mod, args, out: store.append(out.detach().float().cpu()))
    return True


def _fetch_hook(model):
    return model._bitdecode_attn_outputs


def run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one engine from ``spec`` and run what it asks; returns plain data."""
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(spec))
    result: dict[str, Any] = {}
    gen = spec.get("generate")
    if gen:
        if gen.get("capture_attention"):
            llm.apply_model(_install_hook)
        prompts = gen["prompts"]
        params = []
        for i in range(len(prompts)):
            forced = gen.get("forced_tokens")
            params.append(SamplingParams(
                max_tokens=gen["max_tokens"], temperature=0.0, logprobs=gen.get("logprobs", 1),
                ignore_eos=True,
                allowed_token_ids=[forced[i]] if forced else None,
            ))
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        lps = [lp for o in outs for step in (o.outputs[0].logprobs or []) for lp in step.values()]
        result["logprobs_finite"] = all(
            lp.logprob == lp.logprob and abs(lp.logprob) != float("inf") for lp in lps
        )
        result["num_logprobs"] = len(lps)
        if gen.get("capture_attention"):
            result["attention"] = llm.apply_model(_fetch_hook)[0]
    timing = spec.get("decode_timing")
    if timing:
        result["decode_timing"] = _time_decode(llm, SamplingParams, timing)
    del llm
    torch.cuda.empty_cache()
    return result


def _time_decode(llm, sampling_params_cls, timing: dict[str, Any]) -> dict[str, float]:
    """ms per decode step: (time for 1 + n tokens - time for 1 token) / n, same prompts."""
    import random

    rng = random.Random(0)
    batch, context, steps = timing["batch"], timing["context"], timing.get("steps", 64)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(context)]}
               for _ in range(batch)]

    def run(n: int) -> float:
        sp = sampling_params_cls(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t0

    run(2)  # warm up (compilation, graphs), and fills the prefix cache if enabled
    prefill_only = min(run(1) for _ in range(2))
    full = min(run(1 + steps) for _ in range(2))
    return {"ms_per_step": 1000 * (full - prefill_only) / steps, "batch": batch,
            "context": context, "steps": steps}


def run_in_subprocess(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run :func:`run_engine` in a fresh Python; adds the engine log and KV-cache size."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.pt"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_bitdecode.testing", str(spec_path), str(out_path)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"engine failed (exit {proc.returncode}):\n{log[-6000:]}")
        import torch

        result = torch.load(out_path, weights_only=False)
    m = re.search(r"GPU KV cache size: ([\d,]+) tokens", log)
    result["kv_cache_tokens"] = int(m.group(1).replace(",", "")) if m else None
    result["log"] = log
    return result


def main() -> None:
    import torch

    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.save(run_engine(spec), sys.argv[2])


if __name__ == "__main__":
    main()
