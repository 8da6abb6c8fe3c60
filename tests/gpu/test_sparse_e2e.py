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
- the engine log shows sparse mode's layer plan was used, not a silent dense fallback;
- with n-gram drafts (speculative decoding), each query token under verification is a
  decode row of its own, and the output stays with the same engine's without drafts;
- over pages brought back from the CPU by vLLM's offloading connector (both
  granularities), and after vLLM's sleep mode (levels 1 and 2; dense, sparse and channel
  K), the answers stay the same.
"""

from __future__ import annotations

import functools

import pytest

from vllm_bitdecode import stdlib_llama as data
from vllm_bitdecode.testing.comparisons import assert_greedy_close
from vllm_bitdecode.testing.engine import run_in_subprocess
from vllm_bitdecode.testing.engine_probes import POISON_BYTE

pytestmark = pytest.mark.gpu

GEN = 16
# TidalDecode's retrieval claim holds from k = 256; rows shorter than 1,024 stay dense
K512 = {"enabled": True, "token_budget": 512, "min_seq_len": 1024}


@functools.cache
def _prompts() -> tuple[list[list[int]], list[str]]:
    return data.passkey_prompts(11, (0.1, 0.3, 0.5, 0.7, 0.9))


def _run(sparse: dict | None, logprobs: int | None = 5, prompts: list | None = None,
         **engine) -> dict:
    """The shipped model with BITDECODE 4-bit (sparse mode as given) generating GEN
    tokens for ``prompts`` (default: the five pass-key prompts); ``engine`` adds to or
    replaces the engine's settings."""
    if not (data.MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped model is missing")
    bitdecode = {"bits": 4} | ({"sparse": sparse} if sparse else {})
    spec = dict(
        model=str(data.MODEL_DIR), load_format="auto", backend="BITDECODE",
        bitdecode=bitdecode, gpu_memory_utilization=0.3, max_model_len=data.MAX_CONTEXT,
        max_num_seqs=8, enforce_eager=False,
        jobs=[dict(name="gen", prompts=prompts or _prompts()[0], max_tokens=GEN,
                   logprobs=logprobs, reset_prefix_cache=True, capture=False)])
    return run_in_subprocess(spec | engine, timeout=600)


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
    res = _run(K512 | {"granularity": granularity})
    n = len(_prompts()[1])
    right, dense_right = _answers_right(res), _answers_right(_dense())
    print(f"pass keys right: sparse {granularity}s k=512 {right}/{n}, dense {dense_right}/{n}")
    assert dense_right == n
    assert right >= n - 1, f"sparse decoding at k=512 answered {right} of {n} pass keys"


def test_v_groups_of_64_retrieve_the_pass_keys_with_page_selection():
    """V groups of 64 have their own selection and reuse kernels (their V loop unrolls
    differently from group 128's; until 2026-12-05 it kept o in local memory)."""
    res = _run(None, bitdecode={"bits": 4, "group_size": 64,
                                "sparse": K512 | {"granularity": "page"}})
    assert "BITDECODE sparse decode: dense layers [0, 1], selection layers [2]" in res["log"]
    assert "V per token in groups of 64" in res["log"]
    n = len(_prompts()[1])
    right = _answers_right(res)
    print(f"pass keys right: sparse pages k=512, V group 64: {right}/{n}")
    assert right >= n - 1, f"V group 64 at k=512 answered {right} of {n} pass keys"


@pytest.mark.parametrize("granularity", ["page", "token"])
def test_cpu_offloading_in_sparse_mode(granularity):
    """Sparse decode (pages or single tokens, k = 512) over pages that come back from the
    CPU through vLLM's offloading connector (--kv-offloading-size): the pass-key prompts
    run cold; a prompt shorter than a page (nothing to store) steps the engine while
    their pages' stores finish; then the GPU prefix cache is reset and every GPU page
    poisoned (testing.engine_probes.kv_cache_bytes), and the prompts again take their pages from the
    CPU and give the cold run's tokens (vLLM's rule for engines whose arithmetic differs:
    the second prefill computes only the last tokens). Control: poisoned again without a
    reset, the prompts hit the GPU's poisoned pages and lose the pass keys."""
    sparse = K512 | {"granularity": granularity}
    prompts = _prompts()[0]

    def job(name, ps, max_tokens, reset, poison=None):
        return dict(name=name, prompts=ps, max_tokens=max_tokens, logprobs=5, capture=False,
                    reset_prefix_cache=reset, poison_kv_cache=poison)

    res = _run(sparse, kv_offloading_size=1.0, disable_hybrid_kv_cache_manager=True,
               disable_log_stats=True,  # see test_serving's offload engine
               jobs=[job("cold", prompts, GEN, True),
                     job("settle", [prompts[0][:3]], 8, False),
                     job("hit", prompts, GEN, True, poison=POISON_BYTE),
                     job("poisoned_gpu_hit", prompts, GEN, False, poison=POISON_BYTE)])
    jobs = res["jobs"]
    cold, hit, control = jobs["cold"], jobs["hit"], jobs["poisoned_gpu_hit"]
    n = len(prompts)
    right = [data.count_right(j["tokens"], _prompts()[1]) for j in (cold, hit, control)]
    print(f"sparse ({granularity}s) + CPU offloading: cached {hit['num_cached_tokens']} of "
          f"{[len(p) for p in prompts]} tokens; pass keys right cold / CPU hit / poisoned "
          f"GPU hit: {right[0]}/{n}, {right[1]}/{n}, {right[2]}/{n}")
    assert cold["num_cached_tokens"] == [0] * n
    # the prompts are whole pages (6,000 tokens): the connector reports every token
    # loaded (H200, 2026-12-04), and vLLM computes the last one again for its logits
    for prompt, cached in zip(prompts, hit["num_cached_tokens"], strict=True):
        assert len(prompt) - 32 < cached <= len(prompt), f"CPU hit of {cached} tokens"
    assert_greedy_close(hit["tokens"], hit["logprobs"], cold["tokens"], cold["logprobs"],
                        GEN, f"sparse {granularity}s over CPU-loaded pages vs cold")
    assert right[1] == right[0] >= n - 1
    assert right[2] <= 1, f"poisoned pages still answered {right[2]} of {n} pass keys"


@pytest.mark.parametrize(("mode", "level"), [("dense", 1), ("sparse pages", 1),
                                           ("channel K", 1), ("dense", 2)])
def test_sleep_and_wake_up_keep_the_answers(mode, level):
    """vLLM's sleep mode (``enable_sleep_mode``; ``LLM.sleep`` then the wake-up, as RL
    trainers use between rollouts): the sleep gives back the KV cache's memory, and with
    it what vLLM allocated in the cache's memory pool (the metadata builders' persistent
    buffers, which the CUDA graphs read), which comes back uninitialized. Level 1 keeps
    the weights (and the impl's buffers made beside them: channel mode's residual rows)
    on the CPU; level 2 discards them too, and the test wakes the weights, reloads them
    from the model's files and then wakes the KV cache
    (``testing.engine_probes.sleep_and_wake``). The
    pass-key prompts run before the sleep and after the wake-up, cold both times, with
    CUDA graphs; the answers are the same tokens and log-probabilities (one engine, one
    batch: the same arithmetic)."""
    engine: dict = {}
    if mode == "channel K":
        engine["bitdecode"] = {"bits": 4, "k_mode": "channel"}
    sparse = K512 | {"granularity": "page"} if mode == "sparse pages" else None
    prompts = _prompts()[0]
    jobs = [dict(name=name, prompts=prompts, max_tokens=GEN, logprobs=5, capture=False,
                 reset_prefix_cache=True, sleep_level=sleep_level)
            for name, sleep_level in (("awake", None), ("woken", level))]
    res = _run(sparse, enable_sleep_mode=True, jobs=jobs, **engine)
    before, after = res["jobs"]["awake"], res["jobs"]["woken"]
    slept = after["sleep"]
    n = len(prompts)
    right = [data.count_right(j["tokens"], _prompts()[1]) for j in (before, after)]
    print(f"sleep level {level} ({mode}): the sleep freed "
          f"{slept['freed_bytes'] / 2**30:.2f} GiB (KV cache "
          f"{slept['kv_cache_bytes'] / 2**30:.2f} GiB); pass keys right {right[0]}/{n} "
          f"before, {right[1]}/{n} after the wake-up")
    assert slept["freed_bytes"] >= slept["kv_cache_bytes"] > 0
    assert right[0] >= n - 1
    assert after["tokens"] == before["tokens"]
    assert after["logprobs"] == before["logprobs"]


def test_drafts_verify_as_rows_in_sparse_mode():
    """Speculative decoding in sparse mode: each query token of a request verifying its
    drafts (3 from vLLM's n-gram proposer, which finds the pass key in the prompt) gets a
    decode row of its own whose length stops at that token (backend/metadata.py,
    decode_rows), in persistent buffers that CUDA graphs replay; the selection layer
    picks each row's top-k over the positions up to its own token. Against the same
    sparse engine without drafts (both with async scheduling off, which vLLM turns off
    for n-gram drafts): the pass keys found as often, every multi-token step taken as
    rows, drafts accepted, and the greedy tokens equal up to a first divergence where
    the drafts' token is among the reference's five best (vLLM's rule for engines whose
    arithmetic differs; the drafts' run returns no log-probabilities of its own).
    H200, 2026-12-01, in a run whose engine had vLLM's counters off (so its check of
    accepted drafts failed, for that alone): 5/5 pass keys with and without drafts,
    the tokens identical in all 5 requests, 21 multi-token steps taken as rows (417
    rows for 105 requests), none packed."""
    sparse = K512 | {"granularity": "token"}
    ref = _run(sparse, async_scheduling=False)
    spec = _run(sparse, logprobs=None, async_scheduling=False, count_decode_rows=True,
                disable_log_stats=False,  # vLLM's spec-decode counters
                speculative_config=dict(method="ngram", num_speculative_tokens=3,
                                        prompt_lookup_min=2, prompt_lookup_max=5))
    assert "BITDECODE sparse decode: dense layers [0, 1], selection layers [2]" in spec["log"]
    rows, metrics = spec["decode_rows"], spec["jobs"]["gen"]["metrics"]
    gen, ref_gen = spec["jobs"]["gen"], ref["jobs"]["gen"]
    n = len(_prompts()[1])
    right, ref_right = _answers_right(spec), _answers_right(ref)
    diverged = []
    for i, (a, b) in enumerate(zip(gen["tokens"], ref_gen["tokens"], strict=True)):
        assert len(a) == len(b) == GEN, f"request {i} did not finish"
        step = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if step is not None:
            assert a[step] in ref_gen["logprobs"][i][step], (i, step, a[step])
        diverged.append(step)
    print(f"sparse with n-gram drafts: pass keys {right}/{n} (without drafts {ref_right}); "
          f"first divergences {diverged}; decode-row steps {rows}; drafts "
          f"{metrics.get('vllm:spec_decode_num_draft_tokens')}, accepted "
          f"{metrics.get('vllm:spec_decode_num_accepted_tokens')}")
    assert rows["steps"] > 0 and rows["rows"] > rows["requests"] > 0, rows
    assert rows["packed"] == 0, rows  # sparse mode never packs the tokens
    assert metrics.get("vllm:spec_decode_num_accepted_tokens", 0) > 0, metrics
    assert right >= ref_right - 1 and right >= n - 1, (right, ref_right)
    assert sum(s is not None for s in diverged) <= n // 2, diverged


def test_a_prompts_last_token_on_the_decode_path_stays_dense():
    """A prompt of m * 16 + 1 tokens sent again hits the prefix cache on its m pages, and
    vLLM schedules its last token alone, as a decode. Prefill stays dense in sparse mode
    (backend/metadata.py, _prompt_rows): that row gets no score keys, so the engine's
    counter sees it as a prompt row, and the answers stay with the cold run's, whose
    prompts were prefilled whole. Before 1b6e98a such a last token ran selection and reuse
    at the budget (64 here). H200, 2026-12-05: passed (5 prompt rows, 5,984 tokens cached
    each)."""
    bos = _prompts()[0][0][0]
    prompts = [[bos] + p[len(p) - (len(p) - 1) // 16 * 16:] for p in _prompts()[0]]
    assert all(len(p) % 16 == 1 and len(p) > 4096 for p in prompts)
    jobs = [dict(name=name, prompts=prompts, max_tokens=GEN, logprobs=5, capture=False,
                 reset_prefix_cache=name == "cold") for name in ("cold", "warm")]
    res = _run({"enabled": True, "token_budget": 64, "min_seq_len": 1024}, jobs=jobs,
               enable_prefix_caching=True, count_sparse_rows=True)
    cold, warm = res["jobs"]["cold"], res["jobs"]["warm"]
    counts = res["sparse_rows"]
    print(f"prompt tails on the decode path: {counts}; cached {warm['num_cached_tokens']}")
    assert warm["num_cached_tokens"] == [len(p) - 1 for p in prompts], warm["num_cached_tokens"]
    assert counts["prompt"] >= len(prompts), counts
    assert_greedy_close(warm["tokens"], warm["logprobs"], cold["tokens"], cold["logprobs"],
                        GEN, "a prompt's last token from the prefix cache vs the cold run")


def test_rows_keep_their_keys_with_drafts_in_a_full_cache():
    """The score workspace holds every decode row of a full cache, drafts' rows included
    (backend/metadata.py, score_workspace_keys): 32 pass-key requests of 6,000 tokens
    decoding together with n-gram drafts, in a KV cache sized to just hold them
    (num_gpu_blocks_override), so that the cache, not max_model_len, bounds the
    workspace. Every row long enough to decode sparsely gets its keys, by the kernels'
    own test (testing.engine_probes.SparseRowCounter): none falls back to dense decoding. Before
    90d18b7 the workspace counted the cache's tokens once, not once per query token of a
    request, and most of these rows would have decoded densely (exact, but without the
    saving). H200, 2026-12-02, 7ea9549: passed, with the file's other 5 tests (454 s)."""
    n, max_rows = 32, 32 * 4
    prompts, _ = data.passkey_prompts(13, [(i + 0.5) / n for i in range(n)])
    blocks = n * -(-(max(map(len, prompts)) + GEN + 4) // 16)
    res = _run(K512 | {"granularity": "token"}, logprobs=None, prompts=prompts,
               max_num_seqs=n, num_gpu_blocks_override=blocks, async_scheduling=False,
               count_sparse_rows=True, count_decode_rows=True,
               speculative_config=dict(method="ngram", num_speculative_tokens=3,
                                       prompt_lookup_min=2, prompt_lookup_max=5))
    counts, rows = res["sparse_rows"], res["decode_rows"]
    gen = res["jobs"]["gen"]
    print(f"sparse rows with drafts, {n} requests in {blocks} blocks: {counts}; "
          f"multi-token steps {rows}")
    assert all(len(t) == GEN for t in gen["tokens"]), "a request did not finish"
    assert rows["steps"] > 0 and rows["rows"] > rows["requests"], rows  # drafts verified
    # the cache bounded the workspace (else this test would not test that bound)
    assert counts["capacity"] < max_rows * data.MAX_CONTEXT, counts
    assert counts["eligible"] > n, counts
    assert counts["with_keys"] == counts["eligible"], counts
