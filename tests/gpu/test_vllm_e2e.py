"""vLLM end to end with a dummy-weight Llama (32 query / 8 KV heads, d=128).

Each engine runs in its own subprocess (vllm_bitdecode.testing). The attention output
of the last layer is recorded at every forward and compared with the FLASH_ATTN
engine's; every request is forced to one token so that both engines see identical
inputs at every decode step, and the decode kernel is compared, not just prefill.

A bad configuration fails at start-up with one clear line, and leaves no GPU memory
allocated: checked for two rejected while vLLM builds its configuration and one rejected
when vLLM's engine process builds the model (about 30-40 s each).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time

import pytest
import torch

from vllm_bitdecode.testing.engine import run_in_subprocess
from vllm_bitdecode.testing.gpu_monitor import nvml_memory
from vllm_bitdecode.testing.model_dir import write_llama_config
from vllm_bitdecode.testing.server import child_processes, process_cmdline

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
# measured here on an H100 (2026-11-22): 0.099 and 0.497. V groups of 64 run their own
# kernels: until 2026-12-05 their output accumulator sat in local memory (12-35x slower at
# 2 bits, the case here); no engine had run them. The last number is the least KV-cache
# capacity over FlashAttention's: 3.76x the tokens per byte at 4 bits and group 128, 7.1x
# at 2 bits, 6.4x at 2 bits and group 64 (page_format; vLLM's rounding and its other
# buffers take some).
@pytest.mark.parametrize("bits, group_size, prefill_bound, decode_bound, capacity",
                         [(4, 128, 0.12, 0.12, 3.5), (2, 128, 0.6, 0.6, 6),
                          (2, 64, 0.6, 0.6, 5.4)])
def test_bitdecode_matches_flash_attention_within_quantization_error(
    model_dir, flash_attn_run, bits, group_size, prefill_bound, decode_bound, capacity
):
    run = run_in_subprocess(_spec(model_dir, "BITDECODE",
                                  bitdecode={"bits": bits, "group_size": group_size}))
    assert f"BITDECODE KV cache: {bits}-bit codes" in run["log"]  # the builder's start-up line
    assert f"V per token in groups of {group_size};" in run["log"]
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
    assert run["kv_cache_tokens"] > flash_attn_run["kv_cache_tokens"] * capacity


def test_bitdecode_with_cuda_graphs_generates(model_dir):
    """A smoke test: the default (compiled, CUDA-graph) engine runs and gives finite
    logprobs. Outputs under graphs against eager ones: test_serving.py,
    test_cuda_graphs_match_eager."""
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


# ---------------------------------------------------------------- GPU memory after a bad start-up

# name: (backend, settings, environment, words naming the problem, whether vLLM's engine
# process starts)
STARTUP_FAILURES = {
    # rejected while vLLM builds its configuration, in the process that calls LLM(...):
    # vLLM's own check of the backend name, and BITDECODE's settings and model checks
    # (EngineArgs.create_engine_config; tests/cpu/test_startup_errors.py: stage "config")
    "config/backend-name": ("BITDECOD", {}, {}, "Unknown attention backend: 'BITDECOD'",
                            False),
    "config/bits-3": ("BITDECODE", {"bitdecode": {"bits": 3}}, {}, "bitdecode.bits=3", False),
    # rejected in vLLM's engine process, when the model's first attention layer is built
    # and vLLM's selector asks the backend (stage "selector"), after that process has taken
    # the GPU (CUDA context, the first layers' weights)
    "selector/batch-invariant": ("BITDECODE", {}, {"VLLM_BATCH_INVARIANT": "1"},
                                 "batch invariance not supported", True),
}
TOL_MIB = 256  # noise in a device's used memory (as benchmarks/soak.py --mem-tol-mib)
CONTEXT_MIB = 1024  # a CUDA context with its libraries' handles, and no allocations
ENGINE_MIB = 100  # the least an engine process takes: its own CUDA context alone is more


class _Watch:
    """Every 0.2 s, in a thread: NVML's used GPU memory ([(time.time(), MiB)]) and the
    processes this test process starts meanwhile, recursively (pid: last command line
    read; processes of earlier tests are left out)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.processes: dict[int, str] = {}
        self._earlier = {p.pid for p in child_processes(os.getpid())}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.time(), nvml_memory()["used_mib"]))
            for proc in child_processes(os.getpid()):
                if proc.pid not in self._earlier:
                    self.processes[proc.pid] = process_cmdline(proc) or \
                        self.processes.get(proc.pid, "")
            self._stop.wait(0.2)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def peak_mib(self, until: float) -> float:
        return max((m for t, m in self.samples if t <= until), default=0.0)


def _used_mib(settle_s: float = 0.0, at_most: float | None = None) -> float:
    """NVML's used memory: the least of a few samples; with ``at_most``, polled until it
    is down to that or ``settle_s`` is up (the driver frees an exited process's memory a
    moment later)."""
    end = time.monotonic() + settle_s
    samples = []
    while True:
        samples.append(nvml_memory()["used_mib"])
        if len(samples) >= 3 and (at_most is None or samples[-1] <= at_most or
                                  time.monotonic() >= end):
            return samples[-1] if at_most is not None else min(samples)
        time.sleep(0.2)


@pytest.mark.parametrize("case", list(STARTUP_FAILURES))
def test_failed_startup_leaves_no_gpu_memory(model_dir, case):
    """``LLM(...)`` with a bad configuration, as an application starts it: vLLM's engine in
    its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1, vLLM's default and what ``vllm
    serve`` does), in a child process that catches the start-up error and reports
    (vllm_bitdecode.testing.engine.startup_failure). Once the error is raised, no process of the
    test holds GPU memory but the child's own CUDA context, if it has one: the engine
    processes have exited (NVML lists none of them, where it lists processes by this
    namespace's pids), the child holds no PyTorch GPU memory, and the device's used memory
    is back to what it was before the child started, less that context; after the child
    exits, back to it entirely.
    """
    backend, settings, env, words, engine_starts = STARTUP_FAILURES[case]
    baseline = _used_mib()
    spec = _spec(model_dir, backend, **settings)
    spec["startup_failure"] = {"baseline_used_mib": baseline, "tol_mib": TOL_MIB,
                               "settle_s": 30}
    with _Watch() as watch:
        rep = run_in_subprocess(spec, timeout=300,
                                env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", **env})
    child = rep["pid"]
    child_cmd = watch.processes.get(child, "")
    peak = watch.peak_mib(until=rep["failed_at"])  # not the child's own probe, later
    def is_engine(cmd: str) -> bool:
        # vLLM's engine process renames itself; a fork that has not yet has the child's name
        return "EngineCore" in cmd or bool(child_cmd) and cmd == child_cmd

    engines = {pid: cmd for pid, cmd in watch.processes.items()
               if pid != child and is_engine(cmd)}
    others = {pid: cmd for pid, cmd in watch.processes.items()
              if pid != child and pid not in engines}
    print(f"{case}: {rep['error_type']} after {rep['failed_after_s']:.1f} s; engine processes "
          f"{engines}, others {others}; CUDA initialised in the child "
          f"{rep['cuda_initialized']}; NVML used: before {baseline:.0f} MiB, peak "
          f"{peak:.0f}, after the failure {rep['after_failure']['used_mib']:.0f} "
          f"(waited {rep['after_failure']['waited_s']:.1f} s), by pid "
          f"{rep['after_failure']['by_pid']}; NVML lists this namespace's pids "
          f"{rep['nvml_sees_own_pid']}")

    # the start-up failed, at the stage the case is about, naming the problem
    assert not rep["started"], "the bad configuration started an engine"
    if engine_starts:
        assert words in rep["log"], rep["log"][-3000:]
        assert engines, f"no engine process was seen: {watch.processes}"
        # the engine took GPU memory, so that giving it back is something to check
        assert peak >= baseline + ENGINE_MIB, f"peak {peak:.0f} MiB, {baseline:.0f} before"
    else:
        assert words in rep["error"] and "\n" not in rep["error"].strip(), rep["error"]
        assert not engines, f"an engine process started: {engines}"

    # every engine process has exited; the child holds no PyTorch GPU memory
    left = [d for d in rep["alive_descendants"] if is_engine(d["cmdline"])]
    assert not left, f"engine processes alive after the failure: {left}"
    assert rep["memory_allocated"] == 0 and rep["memory_reserved"] == 0, rep

    # NVML, in the child after the failure
    after, probe = rep["after_failure"], rep["probe"]
    if rep["nvml_sees_own_pid"]:
        held = {pid: mib for pid, mib in after["by_pid"].items()
                if pid in watch.processes and pid != child}
        assert not held, f"processes the child started still hold GPU memory: {held}"
        child_mib = after["by_pid"].get(child) or 0.0
        assert child_mib <= CONTEXT_MIB, f"the child holds {child_mib:.0f} MiB"
    else:
        # no per-process figures: allow the child a CUDA context where it had one before
        # the probe initialised CUDA (then the probe added little to the used memory)
        had_context = rep["cuda_initialized"] or \
            probe["used_mib"] - after["used_mib"] < ENGINE_MIB
        child_mib = CONTEXT_MIB if had_context else 0.0
    assert after["used_mib"] <= baseline + TOL_MIB + child_mib, (
        f"{after['used_mib']:.0f} MiB used after the failure; {baseline:.0f} MiB before, "
        f"the child's context {child_mib:.0f} MiB")

    # and once the child has exited too, the device is back where it was
    final = _used_mib(settle_s=30, at_most=baseline + TOL_MIB)
    assert final <= baseline + TOL_MIB, f"{final:.0f} MiB used after; {baseline:.0f} before"
