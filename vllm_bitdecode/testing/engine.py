"""One dummy-weight engine per spec, and the subprocess it runs in.

A spec (plain JSON) asks one engine for several things in turn: ``generate`` (one batch,
optional attention capture), ``jobs`` (named batches with prefix-cache resets, sleep and
wake-up, KV-cache poisoning, attention capture with positions, every attention forward
checked against the reference on its own pages, vLLM's counters and CUDA-graph replays
per job), ``decode_timing`` / ``decode_timings`` (ms per decode step),
``decode_profiles`` (GPU time per decode step by kernel, vllm_bitdecode.step_profile) and
``throughput`` (a ``vllm bench throughput``-style run). A spec with a
``startup_failure`` entry instead starts an engine that must fail and reports what the
failure left behind.
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

from vllm_bitdecode.testing.engine_probes import (
    DecodeRowCounter,
    GraphReplayCounter,
    KernelCheck,
    PrefillGroupCounter,
    SparseRowCounter,
    counters,
    fetch_batch_counter,
    fetch_capture,
    fetch_recorded_outputs,
    install_batch_counter,
    install_capture,
    install_output_recorder,
    kv_cache_bytes,
    poison_prefill_workspaces,
    reset_capture,
    sleep_and_wake,
)
from vllm_bitdecode.testing.engine_timing import decode_prompts, throughput, time_decode
from vllm_bitdecode.testing.gpu_monitor import nvml_memory
from vllm_bitdecode.testing.server import child_processes, process_alive, process_cmdline


def engine_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """``LLM(**kwargs)`` for a spec; ``backend`` None or "auto" lets vLLM choose."""
    backend = spec.get("backend", "BITDECODE")
    kw: dict[str, Any] = dict(
        model=spec["model"],
        load_format=spec.get("load_format", "dummy"),
        skip_tokenizer_init=True,
        enforce_eager=spec.get("enforce_eager", False),
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.85),
        max_model_len=spec.get("max_model_len", 8192),
        max_num_seqs=spec.get("max_num_seqs", 64),
        seed=0,
    )
    if backend not in (None, "auto"):
        kw["attention_backend"] = backend
    if backend == "BITDECODE":
        kw["additional_config"] = {"bitdecode": spec.get("bitdecode", {})}
    if "kv_cache_dtype" in spec:
        kw["kv_cache_dtype"] = spec["kv_cache_dtype"]
    for key in ("max_num_batched_tokens", "enable_chunked_prefill", "enable_prefix_caching",
                "num_gpu_blocks_override", "block_size", "disable_log_stats",
                "compilation_config", "logprobs_mode", "tensor_parallel_size",
                "distributed_executor_backend", "async_scheduling",
                "long_prefill_token_threshold", "speculative_config", "kv_offloading_size",
                "disable_hybrid_kv_cache_manager", "enable_sleep_mode"):
        if key in spec:
            kw[key] = spec[key]
    return kw


_KERNEL_CHECK: KernelCheck | None = None


def _install_kernel_check(model) -> bool:
    for index, layer in enumerate(model.model.layers):
        _KERNEL_CHECK.install(layer.self_attn.attn.impl, index)
    return True


def _run_job(llm, sampling_params_cls, job: dict[str, Any], replays,
             prefill_groups: PrefillGroupCounter | None = None) -> dict[str, Any]:
    slept = None
    if job.get("sleep_level"):
        slept = {"freed_bytes": sleep_and_wake(llm, job["sleep_level"]),
                 "kv_cache_bytes": sum(llm.collective_rpc(kv_cache_bytes))}
    if job.get("reset_prefix_cache"):
        if not llm.reset_prefix_cache():
            raise RuntimeError(f"job {job['name']}: reset_prefix_cache() refused")
    poisoned = None
    if job.get("poison_kv_cache") is not None:
        poisoned = sum(llm.collective_rpc(kv_cache_bytes, args=(job["poison_kv_cache"],)))
    if job.get("capture"):
        llm.apply_model(reset_capture)
    check = _KERNEL_CHECK if job.get("kernel_check") else None
    if check is not None:
        check.records.clear()
        check.on = True
    before = counters(llm)
    replays_before = replays.count if replays else 0
    groups_before = dict(prefill_groups.counts) if prefill_groups else None
    max_tokens = job["max_tokens"]  # one for all prompts, or one per prompt
    per_prompt = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(job["prompts"])
    forced = job.get("forced_tokens")  # one token per prompt that it must always take
    params = [sampling_params_cls(
        max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=job.get("logprobs", 1),
        prompt_logprobs=1 if job.get("prompt_logprobs") else None,
        allowed_token_ids=[forced[i]] if forced else None,
    ) for i, n in enumerate(per_prompt)]
    batch_before = llm.collective_rpc(fetch_batch_counter)[0] if job.get("count_batch") else None
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params,
                        use_tqdm=False)
    seconds = time.perf_counter() - t0
    after = counters(llm)
    res: dict[str, Any] = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "finish_reasons": [o.outputs[0].finish_reason for o in outs],
        "num_cached_tokens": [o.num_cached_tokens for o in outs],
        "logprobs": [
            [{int(t): float(lp.logprob) for t, lp in step.items()}
             for step in (o.outputs[0].logprobs or [])]
            for o in outs
        ],
        "metrics": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        "graph_replays": (replays.count - replays_before) if replays else None,
        "seconds": seconds,
        "poisoned_bytes": poisoned,
        "sleep": slept,
    }
    if groups_before is not None:
        after_groups = prefill_groups.counts
        res["prefill_groups"] = {k: after_groups[k] - groups_before[k]
                                 for k in after_groups if k != "max_groups"}
        res["prefill_groups"]["max_groups_so_far"] = after_groups["max_groups"]
    if batch_before is not None:
        batch_after = llm.collective_rpc(fetch_batch_counter)[0]
        res["batch"] = {k: batch_after[k] - batch_before[k] for k in batch_after}
    if job.get("prompt_logprobs"):
        res["prompt_logprobs"] = [teacher_forced_scores(p, o.prompt_logprobs)
                                  for p, o in zip(job["prompts"], outs, strict=True)]
    if job.get("capture"):
        res["capture"] = llm.apply_model(fetch_capture)[0]
    if check is not None:
        check.on = False
        res["kernel_check"] = list(check.records)
    return res


def teacher_forced_scores(prompt: list[int], steps: list[Any]) -> dict[str, list[Any]]:
    """Teacher-forced scores of a prompt (``prompt_logprobs=1``): for every position after
    the first, the log-probability of the prompt's own next token and the argmax token."""
    actual, argmax = [], []
    for token, step in zip(prompt[1:], steps[1:], strict=True):
        actual.append(float(step[token].logprob))
        argmax.append(next(int(t) for t, lp in step.items() if lp.rank == 1))
    return {"logprob": actual, "argmax": argmax}


def run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one engine from ``spec`` and run what it asks; returns plain data."""
    import torch
    from vllm import LLM, SamplingParams

    replays = GraphReplayCounter() if spec.get("count_graph_replays") else None
    groups = PrefillGroupCounter() if spec.get("count_prefill_groups") else None
    decode_rows = DecodeRowCounter() if spec.get("count_decode_rows") else None
    sparse_rows = SparseRowCounter() if spec.get("count_sparse_rows") else None
    global _KERNEL_CHECK
    kernel_check = any(j.get("kernel_check") for j in spec.get("jobs") or ())
    if kernel_check:
        if not spec.get("enforce_eager"):
            raise ValueError("kernel_check needs enforce_eager (a graph replays no Python)")
        _KERNEL_CHECK = KernelCheck()  # before the engine builds its metadata builders
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(spec))
    result: dict[str, Any] = {"startup_s": time.perf_counter() - t0,
                              "device_name": torch.cuda.get_device_name()}
    if spec.get("poison_prefill_workspace"):
        result["workspaces_poisoned"] = llm.apply_model(poison_prefill_workspaces)[0]
    gen = spec.get("generate")
    if gen:
        if gen.get("capture_attention"):
            llm.apply_model(install_output_recorder)
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
            result["attention"] = llm.apply_model(fetch_recorded_outputs)[0]
    jobs = spec.get("jobs")
    if jobs:
        if any(j.get("capture") for j in jobs):
            llm.apply_model(install_capture)
        if kernel_check:
            llm.apply_model(_install_kernel_check)
        if any(j.get("count_batch") for j in jobs):
            llm.collective_rpc(install_batch_counter)
        result["jobs"] = {}
        for job in jobs:
            result["jobs"][job["name"]] = _run_job(llm, SamplingParams, job, replays, groups)
        # the engine's counters over its whole life: a step's stats may reach the
        # front end with a later step's outputs, after the job that caused them ended
        result["final_metrics"] = counters(llm)
    timing = spec.get("decode_timing")
    if timing:
        result["decode_timing"] = time_decode(llm, SamplingParams, timing, replays)
    timings = spec.get("decode_timings")
    if timings:
        result["decode_timings"] = [time_decode(llm, SamplingParams, t, replays)
                                    for t in timings]
    profiles = spec.get("decode_profiles")
    if profiles:
        from vllm_bitdecode.step_profile import profile_decode

        result["decode_profiles"] = [
            profile_decode(llm, SamplingParams, decode_prompts(p["batch"], p["context"]),
                           p.get("steps", 16)) | {"batch": p["batch"], "context": p["context"]}
            for p in profiles]
    tp = spec.get("throughput")
    if tp:
        result["throughput"] = throughput(llm, SamplingParams, tp)
    if decode_rows is not None:
        result["decode_rows"] = dict(decode_rows.counts)
    if sparse_rows is not None:
        result["sparse_rows"] = dict(sparse_rows.counts)
    del llm
    torch.cuda.empty_cache()
    return result


def parse_kv_cache_tokens(log: str) -> int | None:
    """vLLM's "GPU KV cache size: N tokens" (the last one in the log), or None."""
    found = re.findall(r"GPU KV cache size: ([\d,]+) tokens", log)
    return int(found[-1].replace(",", "")) if found else None


def startup_failure(spec: dict[str, Any]) -> dict[str, Any]:
    """Start ``LLM(**engine_kwargs(spec))``, which is expected to fail, and report what the
    failure leaves behind (run by :func:`run_in_subprocess` for specs with a
    ``startup_failure`` entry: ``baseline_used_mib``, NVML's used memory before this
    process started, ``tol_mib`` and ``settle_s``).

    Reported: ``started`` and the error (``failed_at``: when, by ``time.time()``); the
    processes this one started that are still alive after up to ``settle_s``
    (``alive_descendants``); whether CUDA is initialised here and PyTorch's GPU memory
    here; NVML's figures once those processes are gone
    (``after_failure``: polled until the used memory, less this process's own where NVML
    lists it, is within ``tol_mib`` of the baseline, or until ``settle_s`` is up). Last,
    CUDA is initialised here (``probe``: NVML's figures then), which shows whether NVML
    lists this process by its pid (``nvml_sees_own_pid``), so whether its per-process
    figures can be trusted.
    """
    import gc

    import torch

    cfg = spec["startup_failure"]
    me = os.getpid()
    out: dict[str, Any] = {"pid": me, "started": False, "error_type": None, "error": None}
    t0 = time.monotonic()
    try:
        from vllm import LLM

        llm = LLM(**engine_kwargs(spec))
    except Exception as e:  # noqa: BLE001 - the failure is what is reported
        out["error_type"] = f"{type(e).__module__}.{type(e).__qualname__}"
        out["error"] = str(e)
    else:
        out["started"] = True
        del llm
    out["failed_after_s"] = time.monotonic() - t0
    out["failed_at"] = time.time()
    gc.collect()
    end = time.monotonic() + cfg.get("settle_s", 30)
    alive = [p for p in child_processes(me) if process_alive(p)]
    while alive and time.monotonic() < end:
        time.sleep(0.2)
        alive = [p for p in child_processes(me) if process_alive(p)]
    out["alive_descendants"] = [{"pid": p.pid, "cmdline": process_cmdline(p)} for p in alive]
    out["cuda_initialized"] = torch.cuda.is_initialized()
    out["memory_allocated"] = torch.cuda.memory_allocated() if out["cuda_initialized"] else 0
    out["memory_reserved"] = torch.cuda.memory_reserved() if out["cuda_initialized"] else 0
    limit = cfg["baseline_used_mib"] + cfg.get("tol_mib", 256)
    t1 = time.monotonic()
    while True:  # the driver may give an exited process's memory back a moment later
        mem = nvml_memory()
        if mem["used_mib"] - (mem["by_pid"].get(me) or 0.0) <= limit or \
                time.monotonic() >= end:
            break
        time.sleep(0.5)
    out["after_failure"] = {**mem, "waited_s": time.monotonic() - t1}
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    out["probe"] = nvml_memory()
    out["nvml_sees_own_pid"] = me in out["probe"]["by_pid"]
    return out


def run_in_subprocess(spec: dict[str, Any], timeout: float = 900,
                      env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run :func:`run_engine` (:func:`startup_failure` for a spec with a
    ``startup_failure`` entry) in a fresh Python; adds the engine log and KV-cache size.
    The engine runs inside that process (VLLM_ENABLE_V1_MULTIPROCESSING=0) unless ``env``,
    which overrides the environment, says otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.pt"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_bitdecode.testing", str(spec_path), str(out_path)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"engine failed (exit {proc.returncode}):\n{log[-6000:]}")
        import torch

        result = torch.load(out_path, weights_only=False)
    result["kv_cache_tokens"] = parse_kv_cache_tokens(log)
    result["log"] = log
    return result
