"""Where a decode step's GPU time goes: every kernel of the steady-state decode steps of a
running vLLM engine, timed by the CUDA profiler (CUPTI, through ``torch.profiler``) and
summed by what it does (attention, KV write, GEMMs, compiled elementwise work, ...).

The window is the one ``testing.engine_timing.time_decode`` times: the engine generates 1 + n and
1 + 2n tokens from the same cached prompts, and the difference of the two profiles,
over n, is the GPU work of n decode steps (their CUDA-graph replays included: CUPTI
records the kernels of a graph one by one); a kernel launched as often in both (the
prefill's) is none of it. ``gpu_busy_ms`` is the time at least one
kernel or copy runs; a step's wall time less that is time the GPU waits for the host.

Kernels can overlap: a copy on another stream, and BITDECODE's combine, a programmatic
dependent launch that starts beside the decode kernel and waits in
``griddepcontrol.wait`` for most of its life. So each instant of busy time is attributed
to the kernel running then that started first (for the combine: only the time after the
decode ended), and the categories sum to the busy time; ``span_ms`` of a top kernel is
its own start-to-end time, overlap included.

The pure part (names to categories, interval union, the difference of two profiles)
runs without a GPU; :func:`profile_decode` needs an engine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

# (category, pattern searched in the kernel's demangled name), first match wins;
# a kernel that matches none is "other", and ``top_kernels`` names it
# (the combine first: FlashAttention's combine kernels have "flash::" in their names too;
# TURBOQUANT's are vLLM's Triton kernels, named after their Python functions; a prefill
# reads its context back from the pages with bitdecode's dequantize kernel)
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention combine", r"bitdecode::combine_kernel|FlashAttnFwdCombine"
                          r"|flash_fwd_splitkv_combine|merge_attn|_fwd_kernel_stage2"),
    ("attention", r"bitdecode::(decode|select_topk|dequantize)_kernel|flash::|flash_fwd|fmha"
                  r"|paged_attention"
                  r"|_tq_decode_stage1|_tq_full_dequant_kv|_fwd_(grouped_)?kernel_stage1"),
    ("KV-cache write", r"bitdecode::(quantize|kc_\w+)_kernel"
                       r"|reshape_and_cache|_tq_fused_store"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|matmul"),
    ("compiled elementwise (torch.compile)", r"^triton_|triton_(poi|red|per)_"),
    ("copies and fills", r"^Memcpy|^Memset|[Cc]opy|fill_kernel"),
    ("other PyTorch ops", r"at::native|at_cuda_detail|cub::"),
)
OTHER = "other"
CATEGORY_NAMES = tuple(c for c, _ in KERNEL_CATEGORIES) + (OTHER,)
_PATTERNS = tuple((c, re.compile(p)) for c, p in KERNEL_CATEGORIES)


class Kernel(NamedTuple):
    """One GPU activity of a profile: a kernel, copy or fill (microseconds)."""

    name: str
    start_us: float
    end_us: float


def category(name: str) -> str:
    """The category of a kernel by its name (see KERNEL_CATEGORIES)."""
    for cat, pattern in _PATTERNS:
        if pattern.search(name):
            return cat
    return OTHER


def attributed_us(kernels: Iterable[Kernel]) -> list[tuple[Kernel, float]]:
    """Each kernel with the busy time attributed to it: the instants it runs that no kernel
    started before it covers. Sorted by start, a kernel's share is its interval past the
    latest end of those before it, so the shares sum to the time at least one kernel
    runs (the union of their intervals: kernels on two streams at once count once)."""
    out, end = [], float("-inf")
    for k in sorted(kernels, key=lambda k: (k.start_us, -k.end_us)):
        out.append((k, max(0.0, k.end_us - max(k.start_us, end))))
        end = max(end, k.end_us)
    return out


def summarize(kernels: Sequence[Kernel]) -> dict[str, Any]:
    """One profile: per kernel name, its own microseconds (start to end), launches and
    attributed microseconds (:func:`attributed_us`); and the busy time, their sum."""
    per_name: dict[str, list[float]] = {}
    busy = 0.0
    for k, share in attributed_us(kernels):
        entry = per_name.setdefault(k.name, [0.0, 0, 0.0])
        entry[0] += k.end_us - k.start_us
        entry[1] += 1
        entry[2] += share
        busy += share
    return {"busy_us": busy, "names": per_name}


def per_step(short: dict[str, Any], long: dict[str, Any], steps: int,
             top: int = 25) -> dict[str, Any]:
    """The decode steps between two profiles (``long`` generated ``steps`` tokens more
    per request than ``short``), per step, in milliseconds: busy time by category (the
    attributed time, which sums to ``gpu_busy_ms``), the busiest kernel names (attributed
    ``ms``, their own ``span_ms``, launches per step), and ``kernel_ms``, the sum of the
    kernels' own times, above the busy time by their overlap."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    names = set(short["names"]) | set(long["names"])
    kernels, not_steps_us = [], 0.0
    for name in names:
        us_long, n_long, mine_long = long["names"].get(name, (0.0, 0, 0.0))
        us_short, n_short, mine_short = short["names"].get(name, (0.0, 0, 0.0))
        if n_long == n_short:
            # launched as often in both runs, so none of it is the extra steps' (the
            # prefill's kernels): what its time differs by is run-to-run noise, left out
            # of the busy time too
            not_steps_us += mine_long - mine_short
            continue
        kernels.append({"name": name[:160], "category": category(name),
                        "ms": (mine_long - mine_short) / steps / 1000,
                        "span_ms": (us_long - us_short) / steps / 1000,
                        "launches": (n_long - n_short) / steps})
    kernels.sort(key=lambda k: -k["ms"])
    by_category = dict.fromkeys(CATEGORY_NAMES, 0.0)
    for k in kernels:
        by_category[k["category"]] += k["ms"]
    return {
        "steps": steps,
        "categories_ms": by_category,
        "kernel_ms": sum(k["span_ms"] for k in kernels),
        "gpu_busy_ms": (long["busy_us"] - short["busy_us"] - not_steps_us) / steps / 1000,
        "launches": sum(k["launches"] for k in kernels),
        "top_kernels": kernels[:top],
    }


def _profile_generate(llm, prompts: list[dict[str, Any]], params) -> dict[str, Any]:
    """``llm.generate`` under the CUDA profiler; the summary of its GPU activity."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    kernels = [Kernel(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == cuda and e.time_range.elapsed_us() > 0]
    if not kernels:  # the engine's GPU work ran in another process
        raise RuntimeError("the profiler saw no GPU activity: profile_decode needs the "
                           "engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return summarize(kernels)


def profile_decode(llm, sampling_params_cls, prompts: list[dict[str, Any]],
                   steps: int = 16) -> dict[str, Any]:
    """GPU time of one decode step of ``prompts`` (greedy, ignore_eos) by kernel, from
    the profiles of generating 1 + steps and 1 + 2 x steps tokens after a warm-up run
    that also fills the prefix cache (see :func:`per_step`)."""

    def params(n: int):
        return sampling_params_cls(max_tokens=n, temperature=0.0, ignore_eos=True)

    llm.generate(prompts, params(2), use_tqdm=False)  # warm-up, prefix cache
    short = _profile_generate(llm, prompts, params(1 + steps))
    long = _profile_generate(llm, prompts, params(1 + 2 * steps))
    return per_step(short, long, steps)
