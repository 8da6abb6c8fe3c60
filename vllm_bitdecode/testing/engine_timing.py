"""Timing an engine the way the end-to-end benchmarks report it: ms per decode step in
the steady state (:func:`time_decode`) and ``vllm bench throughput``'s measurement
(:func:`throughput`)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from vllm_bitdecode.testing.engine_probes import GraphReplayCounter, counters
from vllm_bitdecode.testing.gpu_monitor import GpuSampler

SPEC_DRAFTS = "vllm:spec_decode_num_draft_tokens"
SPEC_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"


def decode_prompts(batch: int, context: int) -> list[dict[str, list[int]]]:
    """The decode timings' prompts: ``batch`` of ``context`` random token ids in
    100..29999 (never a forced token below 100), the same on every call."""
    import random

    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(context)]}
            for _ in range(batch)]


TIMING_METHOD = ("steady state: median over 3 interleaved pairs of (decode span of 1 + 2n "
                 "tokens - decode span of 1 + n tokens) / n, a run's decode span being its "
                 "requests' median time from first to last token by vLLM's engine-core "
                 "timestamps (the run's wall time where vLLM keeps no request stats); "
                 "garbage collector held off during each run")


def decode_span_s(outputs: list[Any]) -> float | None:
    """Seconds from a request's first token to its last by the engine core's clock (vLLM's
    ``RequestOutput.metrics``, kept when ``disable_log_stats=False``), the median over
    ``outputs``; None when any output lacks them. The span holds the decode steps only:
    not the prefill, nor the time the front end takes before and after the run."""
    spans = []
    for out in outputs:
        m = getattr(out, "metrics", None)
        first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
        if not first or last < first:
            return None
        spans.append(last - first)
    return statistics.median(spans) if spans else None


def time_decode(llm, sampling_params_cls, timing: dict[str, Any],
                 replays: GraphReplayCounter | None = None) -> dict[str, Any]:
    """ms per decode step in the steady state: generating 1 + n and 1 + 2n tokens from the
    same prompts, in ``repeats`` interleaved pairs (default 3); each pair gives
    (span(1 + 2n) - span(1 + n)) / n and ms_per_step is the median of the pairs.

    A run's span is :func:`decode_span_s`, from its requests' first token to their last on
    the engine core's clock, so that neither the prefill nor the front end's work around
    the run counts; where vLLM keeps no request stats it is the run's wall time
    (``clock``: "engine" or "wall"). Both runs of a pair hold the same first steps (with
    drafts, those before the n-gram proposer finds the forced token repeating): the
    difference is n tokens of decoding at full speed. Python's garbage collector is held
    off during each run (vLLM's engine runs in this process), so that a collection cannot
    fall in one run of a pair and not the other. ``ms_per_step_each`` is each pair's
    figure and ``ms_per_step_wall_each`` the same from wall times. ``gpu_in_long_runs``
    (where NVML sees a GPU) is the GPU's SM clock, power and reasons for a lowered clock
    over the long runs (:class:`GpuSampler`, every 0.1 s): a GPU held at its power
    limit runs every kernel of the step at a lower clock, so a step's time depends on
    more than its own kernels.

    History: until 2026-12-01 the figure was t(1 + n) - t(1), best of 2 (two runs of
    bench_spec_decode the same day differed by up to 1.8x in a case with drafts); then
    (best wall t(1 + 2n) - best wall t(1 + n)) / n, which on an H200 the same day spread
    over 6-13% between pairs and, taking two minima apart, reported the largest pair in
    two of four cases (benchmarks/results/step_breakdown_456a070_h200.json). The warm-up
    generated 2 tokens until 2026-12-02: too few for the n-gram proposer to find the
    forced token repeating, so the drafts' first use (about half a second, once per
    engine) fell in the first short run, and the first pair of every 1 x 128K case with
    drafts came out negative on an H200 (benchmarks/results/spec_decode*_h200.json of
    that day); the warm-up is now a short run.

    With speculative decoding a step yields several tokens, so ms_per_step is ms per
    generated token of a request; ``forced_token`` (one token id that every request must
    always take, through allowed_token_ids) makes n-gram drafts right once it repeats.
    ``draft_tokens`` / ``accepted_tokens`` are the drafts proposed and accepted in the
    timed window (n tokens of every request; long runs' counts less short runs', over
    the pairs), when the engine keeps vLLM's counters. With ``replays`` (the engine's
    ``count_graph_replays``), ``graph_replays_per_step`` is the CUDA-graph replays of the
    window per generated token: 1 where vLLM replays a full graph per engine step, about
    one per layer where it runs piecewise graphs around eager attention.
    """
    import gc

    batch, context, steps = timing["batch"], timing["context"], timing.get("steps", 64)
    repeats = timing.get("repeats", 3)
    prompts = decode_prompts(batch, context)
    forced = timing.get("forced_token")
    # per run length: each run's wall and decode-span seconds, counters' and replays'
    # increments
    runs: dict[int, dict[str, list[Any]]] = {}

    def run(n: int) -> None:
        sp = sampling_params_cls(max_tokens=n, temperature=0.0, ignore_eos=True,
                                 allowed_token_ids=None if forced is None else [forced])
        before, replays_before = counters(llm), replays.count if replays else 0
        gc.collect()
        gc.disable()
        try:
            start = time.time()  # the GPU samples' clock
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, sp, use_tqdm=False)
            seconds = time.perf_counter() - t0
            end = time.time()
        finally:
            gc.enable()
        after = counters(llm)
        rec = runs.setdefault(n, {"seconds": [], "spans": [], "counters": [], "replays": [],
                                  "windows": []})
        rec["seconds"].append(seconds)
        rec["windows"].append((start, end))
        rec["spans"].append(decode_span_s(outputs))
        rec["counters"].append({k: after[k] - before.get(k, 0) for k in after})
        rec["replays"].append(replays.count - replays_before if replays else 0)

    short, long = 1 + steps, 1 + 2 * steps
    t0 = time.perf_counter()
    run(short)  # warm-up: compilation, graphs, drafts' first use; fills the prefix cache
    warmup = time.perf_counter() - t0
    runs.clear()  # not a timed run
    with GpuSampler() as gpu:
        for _ in range(repeats):
            run(short)
            run(long)
    s, lg = runs[short], runs[long]

    def per_step_ms(a: list[float], b: list[float]) -> list[float]:
        return [1000 * (y - x) / steps for x, y in zip(a, b, strict=True)]

    wall_each = per_step_ms(s["seconds"], lg["seconds"])
    engine_clock = None not in s["spans"] + lg["spans"]
    each = per_step_ms(s["spans"], lg["spans"]) if engine_clock else wall_each
    out: dict[str, Any] = {
        "ms_per_step": statistics.median(each),
        "ms_per_step_each": each,
        "ms_per_step_wall_each": wall_each,
        "clock": "engine" if engine_clock else "wall",
        "runs_s": {"short": s["seconds"], "long": lg["seconds"]},
        "batch": batch, "context": context, "steps": steps, "repeats": repeats,
        "warmup_s": warmup}
    if engine_clock:
        out["decode_spans_s"] = {"short": s["spans"], "long": lg["spans"]}
    gpu_state = gpu.summary(lg["windows"])
    if gpu_state is not None:
        out["gpu_in_long_runs"] = gpu_state

    def window(values: list[float], short_values: list[float]) -> float:
        return (sum(values) - sum(short_values)) / repeats  # per pair

    if replays is not None:
        out["graph_replays_per_step"] = window(lg["replays"], s["replays"]) / steps
    if forced is not None:
        out["forced_token"] = forced
    if any(SPEC_DRAFTS in c for c in lg["counters"]):
        for name, key in ((SPEC_DRAFTS, "draft_tokens"), (SPEC_ACCEPTED, "accepted_tokens")):
            out[key] = window([c.get(name, 0) for c in lg["counters"]],
                              [c.get(name, 0) for c in s["counters"]])
    return out


def throughput(llm, sampling_params_cls, cfg: dict[str, Any]) -> dict[str, Any]:
    """``vllm bench throughput``'s measurement on random token prompts of fixed length:
    all requests submitted at once, ignore_eos, temperature 1; total (prompt + output)
    tokens / s over the whole run, as that benchmark reports it."""
    import torch

    n, lin, lout = cfg["num_prompts"], cfg["input_len"], cfg["output_len"]
    gen = torch.Generator().manual_seed(cfg.get("seed", 0))
    ids = torch.randint(100, cfg.get("vocab_high", 30000), (n, lin), generator=gen).tolist()
    prompts = [{"prompt_token_ids": p} for p in ids]
    if cfg.get("warmup", True):  # graphs and kernels ready before the clock starts
        llm.generate([{"prompt_token_ids": ids[0][:256]}],
                     sampling_params_cls(max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.reset_prefix_cache()  # no request finds another's blocks (or the warm-up's)
    before = counters(llm)
    sp = sampling_params_cls(n=1, temperature=1.0, top_p=1.0, ignore_eos=True,
                             max_tokens=lout)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    after = counters(llm)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outs)
    return {
        "num_prompts": n, "input_len": lin, "output_len": lout, "elapsed_s": elapsed,
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "requests_per_s": n / elapsed,
        "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "num_preemptions": after.get("vllm:num_preemptions", 0)
        - before.get("vllm:num_preemptions", 0),
    }
