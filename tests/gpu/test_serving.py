"""Serving features with BITDECODE: chunked prefill, prefix caching, CUDA graphs, preemption.

A dummy-weight 2-layer Llama (8 query / 2 KV heads, d=128, GQA 4) keeps each engine cheap.
Three engines per bit width run in subprocesses (vllm_bitdecode.testing), each serving
several checks, so each starts once:

- ``reference``: eager, every prompt prefilled in one piece, prefix caching on, memory
  plenty. Runs every workload cold, and the prefix-cache sequence (cold, other, warm).
- ``constrained``: eager, 2048-token steps (chunked prefill) and only 1000 KV blocks
  (16,000 tokens), so that the preemption workload (48 requests growing to ~21.6K
  tokens) is preempted and recomputed.
- ``graphs``: vLLM's default compilation and CUDA-graph mode.

What is compared, and why greedy tokens alone are not enough: vLLM's dummy weights
(uniform in +-1e-3) make attention nearly uniform and its contribution to the residual
stream smaller than one bf16 step, so greedy tokens hardly depend on attention. They are
compared exactly (the issue's requirement; see _assert_greedy_equal for the one allowed
exception, a bf16 tie between the two best logits), and the eager engines also record
the last layer's attention output with the position of every row; with near-uniform
attention a row is the running mean of the dequantized V of its context, so a query that
sees the wrong context (missing chunks, stale or foreign pages) is off by ~100%, while
the same context gives ~0.1%. Rows are matched by position (and, for batches, by the
nearest of the reference rows at that position).

Environment: BITDECODE_SERVING_BITS="4,2" (default) picks the bit widths. About 6 engine
starts in all; the file should take 4-5 minutes on an H100. BITDECODE_SERVING_K_MODE=channel
runs every check in per-channel K mode (issue #7), where chunked prefill, prefix hits,
preemption and graph padding are the residual's lifetime cases; its chunks of 2040
tokens then end mid-page. BITDECODE_SERVING_BLOCK (default 16) sets the block size, e.g.
64 for channel mode's 2-bit configuration; the KV budgets stay the same in tokens.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from vllm_bitdecode.testing.comparisons import match_rows_by_position
from vllm_bitdecode.testing.engine import run_in_subprocess
from vllm_bitdecode.testing.engine_probes import POISON_BYTE
from vllm_bitdecode.testing.model_dir import TINY_LLAMA, write_llama_config

pytestmark = pytest.mark.gpu

BITS = [int(b) for b in os.environ.get("BITDECODE_SERVING_BITS", "4,2").split(",") if b]
K_MODE = os.environ.get("BITDECODE_SERVING_K_MODE", "token")
MAX_LEN = 16384
BLOCK = int(os.environ.get("BITDECODE_SERVING_BLOCK", "16"))  # 16: vLLM's default

LONG, CHUNK, LONG_GEN = 15000, 2048 if K_MODE == "token" else 2040, 16
WINDOWED = {"prefill_window": 4096} if K_MODE == "token" else {}  # channel mode reads whole
PREFIX, SUFFIX_A, SUFFIX_B, PREFIX_GEN = 6000, 300, 500, 16
# Short prompts and long answers: all requests start, then outgrow the cache. vLLM's
# scheduler, simulated on CPU with these numbers, preempts 12 times.
PREEMPT_LENS = [100 + 4 * i for i in range(48)]
PREEMPT_GEN = 256
NUM_BLOCKS = 16000 // BLOCK  # 16,000 tokens: LONG fits, the preemption workload (~21.6K) does not
MIXED_LENS = (5, 37, 300, 1200, 2900, 6100)
MIXED_GEN = 32

# Attention rows: same context gives ~1e-3 (bf16 rounding, summation order); a wrong
# context gives ~1. Per-row bounds are looser at 2 bits, where one code that flips
# between runs (a K/V element rounded differently by a GEMM of another size) moves a
# short context's mean more.
GLOBAL_TOL = 0.02
ROW_TOL = {4: 0.1, 2: 0.2}
CONTROL_MIN = 0.2
# Raw logits (logprobs_mode="raw_logits") of dummy weights are ~1e-4, kept in bf16: a
# "tie" is two logits at most TIE_ULPS bf16 steps apart; logits of the same token at the
# same step may differ by LOGIT_ULPS steps between runs.
TIE_ULPS = 2
LOGIT_ULPS = 8
TOP_LOGITS = 2


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, TINY_LLAMA["vocab_size"]) for _ in range(n)]


def _prompts() -> dict[str, list[list[int]]]:
    rng = random.Random(4)
    prefix = _ids(rng, PREFIX)
    suffix_a, suffix_b = _ids(rng, SUFFIX_A), _ids(rng, SUFFIX_B)
    suffix_a[0] = 10  # the two requests share exactly PREFIX tokens
    suffix_b[0] = 11
    return {
        "long": [_ids(rng, LONG)],
        "mixed": [_ids(rng, n) for n in MIXED_LENS],
        "preempt": [_ids(rng, n) for n in PREEMPT_LENS],
        "prefix_a": [prefix + suffix_a],
        "prefix_b": [prefix + suffix_b],
    }


def _job(name, prompts, max_tokens, reset=True, capture=True, poison=None):
    return dict(name=name, prompts=prompts, max_tokens=max_tokens, reset_prefix_cache=reset,
                capture=capture, logprobs=TOP_LOGITS, poison_kv_cache=poison)


def _specs(model: str, bits: int) -> dict[str, dict]:
    p = _prompts()
    common = dict(model=model, backend="BITDECODE", bitdecode={"bits": bits, "k_mode": K_MODE},
                  gpu_memory_utilization=0.25, max_model_len=MAX_LEN, max_num_seqs=64,
                  enable_prefix_caching=True, disable_log_stats=False,
                  logprobs_mode="raw_logits", count_graph_replays=True, block_size=BLOCK)
    roomy = 131072 // BLOCK  # 131K tokens: far more than any job needs, quick to set up
    return {
        "reference": dict(common, enforce_eager=True, max_num_batched_tokens=MAX_LEN,
                          num_gpu_blocks_override=roomy, jobs=[
            _job("long", p["long"], LONG_GEN),
            _job("mixed", p["mixed"], MIXED_GEN, capture=False),
            _job("preempt", p["preempt"], PREEMPT_GEN),
            _job("prefix_cold", p["prefix_b"], PREFIX_GEN),
            _job("prefix_other", p["prefix_a"], PREFIX_GEN, capture=False),
            _job("prefix_warm", p["prefix_b"], PREFIX_GEN, reset=False),
        ]),
        # per-token K: the chunks read their context in windows of 4,096 tokens (merged by
        # LSE), the one-piece reference its whole 15,000 tokens in one
        "constrained": dict(common, enforce_eager=True, max_num_batched_tokens=CHUNK,
                            num_gpu_blocks_override=NUM_BLOCKS,
                            bitdecode=dict(common["bitdecode"], **WINDOWED),
                            count_prefill_groups=True, jobs=[
            _job("long", p["long"], LONG_GEN),
            _job("preempt", p["preempt"], PREEMPT_GEN),
        ]),
        "graphs": dict(common, enforce_eager=False, max_num_batched_tokens=MAX_LEN,
                       num_gpu_blocks_override=roomy, jobs=[
            _job("mixed", p["mixed"], MIXED_GEN, capture=False),
        ]),
        # vLLM's CPU offloading connector (--kv-offloading-size): B runs cold and its pages
        # are stored to the CPU; a prompt shorter than a page (nothing to store) steps the
        # engine until those stores have finished; then the GPU prefix cache is reset and
        # every GPU page overwritten, and B again must load its prefix from the CPU. Last,
        # a control: the GPU pages overwritten once more, without a reset, so that B hits
        # the GPU cache's poisoned pages and its rows must be far off. Stats off: in an
        # engine inside the caller's process (as here) vLLM 0.20's offloading metrics get
        # unserialized records and fail an assert (H200, 2026-12-04), for any backend.
        "offload": dict(common, enforce_eager=True, max_num_batched_tokens=MAX_LEN,
                        num_gpu_blocks_override=roomy, kv_offloading_size=1.0,
                        disable_hybrid_kv_cache_manager=True, disable_log_stats=True, jobs=[
            _job("offload_cold", p["prefix_b"], PREFIX_GEN),
            _job("offload_settle", p["mixed"][:1], BLOCK - 1 - MIXED_LENS[0], reset=False,
                 capture=False),
            _job("offload_hit", p["prefix_b"], PREFIX_GEN, poison=POISON_BYTE),
            _job("offload_poisoned_gpu_hit", p["prefix_b"], PREFIX_GEN, reset=False,
                 poison=POISON_BYTE),
        ]),
    }


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """engine(name, bits) -> that engine's result; each engine runs at most once."""
    model = str(write_llama_config(tmp_path_factory.mktemp("tiny-llama"), **TINY_LLAMA))
    cache: dict[tuple[str, int], dict | Exception] = {}

    def get(name: str, bits: int) -> dict:
        key = (name, bits)
        if key not in cache:
            try:
                cache[key] = run_in_subprocess(_specs(model, bits)[name], timeout=600)
                print(f"[{name} {bits}-bit] started in {cache[key]['startup_s']:.1f} s")
            except Exception as e:  # run a failing engine once, not once per test
                cache[key] = e
        if isinstance(cache[key], Exception):
            raise cache[key]
        return cache[key]

    return get


def _shifted(cap: dict, shift: int) -> dict:
    return dict(cap, positions=cap["positions"] + shift)


def _below(cap: dict, limit: int | None) -> dict:
    if limit is None:
        return cap
    keep = cap["positions"] < limit
    return dict(cap, positions=cap["positions"][keep], rows=cap["rows"][keep])


def _assert_rows_match(test: dict, ref: dict, bits: int, what: str,
                       limit: int | None = None) -> float:
    """Every row of ``test`` (below position ``limit``, where a tie changed a context)
    matches a row of ``ref`` at its position."""
    test, ref = _below(test, limit), _below(ref, limit)
    assert test["positions"].numel() > 0, f"{what}: no rows to compare"
    errs, overall = match_rows_by_position(test, ref)
    assert torch.isfinite(errs).all(), f"{what}: rows at positions the reference never computed"
    worst = float(errs.max())
    print(f"{what} ({bits}-bit): {errs.numel()} attention rows, overall rel. error "
          f"{overall:.2e}, worst row {worst:.2e}")
    assert overall <= GLOBAL_TOL, f"{what}: attention rows differ by {overall:.3f}"
    assert worst <= ROW_TOL[bits], f"{what}: a row differs by {worst:.3f}"
    return overall


def _bf16_ulp(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0**-133


def _assert_greedy_equal(test: dict, ref: dict, what: str) -> list[tuple[int, int]]:
    """Greedy tokens of ``test`` equal those of ``ref``, request by request.

    One exception, at most once per job: a request may take the reference's runner-up
    at a step where the reference's two best raw logits are within TIE_ULPS bf16 steps
    of each other, a tie that any difference in rounding may break; that request is not
    compared after it (its context differs from there on). Where tokens agree, the raw
    logits both runs report for the same token agree within LOGIT_ULPS bf16 steps.
    Returns the (request, step) of each tie; at most one per 8 requests is allowed.
    """
    assert len(test["tokens"]) == len(ref["tokens"])
    ties = []
    for i, (t_toks, r_toks) in enumerate(zip(test["tokens"], ref["tokens"], strict=True)):
        assert len(t_toks) == len(r_toks), f"{what}: request {i} lengths differ"
        t_lps, r_lps = test["logprobs"][i], ref["logprobs"][i]
        for step, (a, b) in enumerate(zip(t_toks, r_toks, strict=True)):
            top = r_lps[step]
            if a != b:
                where = f"{what}: request {i}, step {step}: token {a} instead of {b}"
                assert a in top, f"{where}, not among the reference's best {top}"
                gap = top[b] - top[a]
                assert 0 <= gap <= TIE_ULPS * _bf16_ulp(top[b]), (
                    f"{where}; reference logits {top[b]:.6e} vs {top[a]:.6e}: not a tie")
                ties.append((i, step))
                break
            for tok in t_lps[step].keys() & top.keys():
                diff = abs(t_lps[step][tok] - top[tok])
                assert diff <= LOGIT_ULPS * _bf16_ulp(top[tok]), (
                    f"{what}: request {i}, step {step}: logit of {tok} "
                    f"{t_lps[step][tok]:.6e} vs {top[tok]:.6e}")
    if ties:
        print(f"{what}: greedy tokens equal except after bf16 ties at (request, step) {ties}")
    allowed = max(1, len(ref["tokens"]) // 8)
    assert len(ties) <= allowed, f"{what}: {len(ties)} requests diverged at ties: {ties}"
    return ties


def _first_diverged_position(ties: list, prompts: list[list[int]]) -> int | None:
    """The first position whose attention row may differ after a tie (the token chosen at
    a tie enters the context there), or None without ties."""
    if not ties:
        return None
    return min(len(prompts[i]) + step for i, step in ties)


def _assert_logprobs_finite(job: dict) -> None:
    values = [v for req in job["logprobs"] for step in req for v in step.values()]
    assert values and all(math.isfinite(v) for v in values)


def _assert_all_finished(job: dict, n: int, max_tokens: int) -> None:
    assert len(job["tokens"]) == n
    assert all(len(t) == max_tokens for t in job["tokens"])
    assert job["finish_reasons"] == ["length"] * n


@pytest.mark.parametrize("bits", BITS)
def test_chunked_prefill_matches_one_piece_prefill(engine, bits):
    """A 15,000-token prompt prefilled in 2,048-token chunks (8 steps) against the same
    prompt prefilled in one step.

    Near-exact, not bitwise: both runs store the same quantized K/V (a token's K/V depend
    only on its own hidden state, and each layer quantizes them before it attends), and
    in both runs every query attends to its whole context dequantized from the pages,
    since BITDECODE's prefill reads back even the chunk's own tokens. What differs is
    arithmetic order: GEMMs over 2,048 rather than 15,000 rows may pick other cuBLAS
    kernels (a K/V element can round to the other bf16 neighbour, and rarely that moves
    its 4/2-bit code), FlashAttention splits a shorter query range differently, and with
    per-token K the chunks read their history in 4,096-token windows merged by LSE (each
    merge rounds to bf16 once, as FlashAttention's output is). So greedy tokens are
    asserted equal (short of a bf16 tie, see _assert_greedy_equal), and the attention
    rows (recorded with their positions) within 2% overall, against
    ~10% for the 4-bit quantization itself and ~100% for a chunk that missed its history.
    """
    ref = engine("reference", bits)["jobs"]["long"]
    chunked = engine("constrained", bits)["jobs"]["long"]
    for job in (ref, chunked):
        _assert_all_finished(job, 1, LONG_GEN)
        _assert_logprobs_finite(job)
    # the schedules really differ: one 15,000-token step vs steps of at most 2,048
    assert ref["capture"]["forward_sizes"][0] == LONG
    prefill = [n for n, first in zip(chunked["capture"]["forward_sizes"],
                                     chunked["capture"]["forward_first_positions"],
                                     strict=True) if first < LONG]
    assert sum(prefill) == LONG and max(prefill) <= CHUNK
    assert len(prefill) >= math.ceil(LONG / CHUNK)
    if WINDOWED:  # the chunks past the first 4,096 tokens read their history in windows
        assert chunked["prefill_groups"]["windowed_steps"] >= LONG // CHUNK - 2
    ties = _assert_greedy_equal(chunked, ref, f"chunked vs one piece ({bits}-bit)")
    _assert_rows_match(chunked["capture"], ref["capture"], bits, "chunked vs one piece",
                       _first_diverged_position(ties, _prompts()["long"]))
    # control: the same comparison against the wrong positions is far off
    _, wrong = match_rows_by_position(_shifted(chunked["capture"], LONG // 2), ref["capture"])
    assert wrong > CONTROL_MIN, f"control comparison too close ({wrong:.3f}): test is blind"


@pytest.mark.parametrize("bits", BITS)
def test_prefix_cache_hit_gives_cold_run_tokens(engine, bits):
    """Request B = 6,000-token prefix + 500 tokens, run cold (cache reset), then after
    request A = same prefix + 300 other tokens: B's second run hits the cache for the
    whole prefix (RequestOutput.num_cached_tokens), computes only its 500 own tokens,
    and gives the cold run's greedy tokens and attention rows."""
    jobs = engine("reference", bits)["jobs"]
    cold, other, warm = jobs["prefix_cold"], jobs["prefix_other"], jobs["prefix_warm"]
    prompt_len = PREFIX + SUFFIX_B
    assert cold["num_cached_tokens"] == [0] and other["num_cached_tokens"] == [0]
    cached = warm["num_cached_tokens"][0]
    assert PREFIX - BLOCK < cached <= PREFIX, f"prefix-cache hit of {cached} tokens"
    for job in (cold, warm):
        _assert_all_finished(job, 1, PREFIX_GEN)
        _assert_logprobs_finite(job)
    ties = _assert_greedy_equal(warm, cold, f"prefix-cache hit vs cold ({bits}-bit)")
    # the prefix was not recomputed: the warm run's rows start where the hit ends
    warm_pos = warm["capture"]["positions"]
    assert int(warm_pos.min()) == cached
    assert int((warm_pos < prompt_len).sum()) == prompt_len - cached
    _assert_rows_match(warm["capture"], cold["capture"], bits, "prefix-cache hit vs cold",
                       _first_diverged_position(ties, _prompts()["prefix_b"]))


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "on an H200 (2026-11-29) vLLM 0.20's counters in LLM.get_metrics() counted only this "
    "engine's first request (prefix_cache_queries 15000, hits 0) although the warm request "
    "reported num_cached_tokens 6000. Likely cause, read in vLLM 0.20's source, not yet "
    "confirmed on a GPU: LLMEngine.step records the scheduler's stats only for steps that "
    "return request outputs (v1/engine/llm_engine.py, `len(outputs.outputs) > 0`), the "
    "prefix-cache stats are drained every step (KVCacheManager.make_prefix_cache_stats), "
    "and the step that admits a request running alone returns none when its prompt is "
    "chunked or, under async scheduling, at all: its hit is never counted"))
@pytest.mark.parametrize("bits", BITS)
def test_prefix_cache_counters_count_the_hit(engine, bits):
    """vLLM's Prometheus counters (LLM.get_metrics()) over the engine's life show the
    warm request's hit: no other job of this engine shares a prefix."""
    res = engine("reference", bits)
    jobs, final = res["jobs"], res["final_metrics"]
    cached = jobs["prefix_warm"]["num_cached_tokens"][0]
    hit_counts = {name: jobs[name]["metrics"].get("vllm:prefix_cache_hits")
                  for name in ("prefix_cold", "prefix_other", "prefix_warm")}
    print(f"prefix cache ({bits}-bit): {cached} tokens cached; vllm:prefix_cache_hits per job "
          f"{hit_counts}, engine {final.get('vllm:prefix_cache_hits')}; queries "
          f"{final.get('vllm:prefix_cache_queries')}")
    for name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
        assert name in final, f"{name} missing from LLM.get_metrics()"
    assert cached <= final["vllm:prefix_cache_hits"] <= cached + BLOCK, hit_counts
    assert final["vllm:prefix_cache_queries"] >= 2 * (PREFIX + SUFFIX_B) + PREFIX + SUFFIX_A


@pytest.mark.parametrize("bits", BITS)
def test_cuda_graphs_match_eager(engine, bits):
    """vLLM's default compilation and CUDA-graph mode (full graphs for pure-decode steps,
    piecewise for the rest) against enforce_eager=True, on six prompts of 5 to 6,100
    tokens: graphs are replayed (counted at torch.cuda.CUDAGraph.replay) at every decode
    step, and greedy tokens are equal."""
    eager = engine("reference", bits)["jobs"]["mixed"]
    graphs = engine("graphs", bits)["jobs"]["mixed"]
    for job in (eager, graphs):
        _assert_all_finished(job, len(MIXED_LENS), MIXED_GEN)
        _assert_logprobs_finite(job)
    assert eager["graph_replays"] == 0
    assert graphs["graph_replays"] >= MIXED_GEN - 1, graphs["graph_replays"]
    _assert_greedy_equal(graphs, eager, f"CUDA graphs vs eager ({bits}-bit)")
    print(f"CUDA graphs ({bits}-bit): {graphs['graph_replays']} replays for "
          f"{MIXED_GEN} tokens")


@pytest.mark.skipif(K_MODE != "token", reason="per-channel K refuses offloading at start-up "
                    "(tests/cpu/test_startup_errors.py)")
@pytest.mark.parametrize("bits", BITS)
def test_cpu_offloading_hit_restores_the_pages(engine, bits):
    """--kv-offloading-size (vLLM's OffloadingConnector, cross-layer blocks): request B's
    pages go to the CPU during its cold run; after the GPU prefix cache is reset and every
    GPU page overwritten, B's second run takes its prefix from the CPU (num_cached_tokens,
    with the local cache empty) and gives the cold run's greedy tokens and attention rows,
    which it could not with a page left poisoned. The control job shows the poison
    reaches what attention reads."""
    jobs = engine("offload", bits)["jobs"]
    cold, hit, control = jobs["offload_cold"], jobs["offload_hit"], jobs["offload_poisoned_gpu_hit"]
    prompt_len = PREFIX + SUFFIX_B
    assert cold["num_cached_tokens"] == [0]
    assert jobs["offload_settle"]["finish_reasons"] == ["length"]
    for job in (hit, control):
        assert job["poisoned_bytes"] > 0
    cached = hit["num_cached_tokens"][0]
    print(f"CPU offloading ({bits}-bit): {cached} of {prompt_len} prompt tokens loaded from "
          f"the CPU; {hit['poisoned_bytes'] / 2**20:.0f} MiB of GPU pages poisoned first")
    # the prompt's full pages (6,496 tokens; its last 4 fill no page and are computed)
    assert prompt_len - 2 * BLOCK < cached < prompt_len, f"CPU hit of {cached} tokens"
    for job in (cold, hit):
        _assert_all_finished(job, 1, PREFIX_GEN)
        _assert_logprobs_finite(job)
    ties = _assert_greedy_equal(hit, cold, f"CPU offloading hit vs cold ({bits}-bit)")
    hit_pos = hit["capture"]["positions"]
    assert int(hit_pos.min()) == cached, "the loaded prefix was recomputed"
    _assert_rows_match(hit["capture"], cold["capture"], bits, "CPU offloading hit vs cold",
                       _first_diverged_position(ties, _prompts()["prefix_b"]))
    # control: the same request over the GPU cache's poisoned pages
    assert control["num_cached_tokens"][0] >= cached
    _, off = match_rows_by_position(control["capture"], cold["capture"])
    print(f"CPU offloading control ({bits}-bit): rows over poisoned GPU pages off by {off:.2f}")
    assert off > CONTROL_MIN, f"poisoned pages changed the rows by only {off:.3f}"


@pytest.mark.parametrize("bits", BITS)
def test_preemption_recomputes_and_matches_unconstrained_run(engine, bits):
    """48 requests (100-288 prompt tokens, 256 new each; ~21.6K tokens of KV in the end)
    on 1,000 blocks (16,000 tokens): vLLM preempts (its num_preemptions counter) and
    recomputes; every request finishes with the greedy tokens of the unconstrained run,
    and every attention row computed, recomputations included, equals the unconstrained
    run's row at that position for one of the requests."""
    ref = engine("reference", bits)["jobs"]["preempt"]
    tight = engine("constrained", bits)["jobs"]["preempt"]
    n = len(PREEMPT_LENS)
    assert "vllm:num_preemptions" in tight["metrics"], "LLM.get_metrics() lacks preemptions"
    assert ref["metrics"]["vllm:num_preemptions"] == 0
    preemptions = tight["metrics"]["vllm:num_preemptions"]
    print(f"preemption ({bits}-bit): {preemptions} preemptions; "
          f"{tight['capture']['rows'].shape[0]} rows computed vs "
          f"{ref['capture']['rows'].shape[0]} unconstrained")
    assert preemptions > 0
    for job in (ref, tight):
        _assert_all_finished(job, n, PREEMPT_GEN)
        _assert_logprobs_finite(job)
    ties = _assert_greedy_equal(tight, ref, f"preempted vs unconstrained ({bits}-bit)")
    # recomputation happened: more rows than the unconstrained run computed
    assert tight["capture"]["rows"].shape[0] > ref["capture"]["rows"].shape[0]
    _assert_rows_match(tight["capture"], ref["capture"], bits, "preempted vs unconstrained",
                       _first_diverged_position(ties, _prompts()["preempt"]))
