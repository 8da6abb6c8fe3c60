"""vLLM's scheduler with BITDECODE's KV-cache spec: prefix-cache hits and their stats.

A second request sharing a 6,000-token prefix must reuse its full pages (a partial page is
never shared), and the scheduler's own SchedulerStats must count the hit. On an H200
(2026-11-29) the in-process ``LLM.get_metrics()`` counters showed no hits although
``num_cached_tokens`` did (tests/gpu/test_serving.py, xfail); this test pins that the
scheduler side, with our spec, is right, so a loss is between the engine core and the
front end's Prometheus logger.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

BLOCK = 16
PREFIX = 6000


@pytest.fixture()
def scheduler(tmp_path):
    return _scheduler(tmp_path)


def _scheduler(tmp_path, bitdecode: dict | None = None):
    """vLLM's Scheduler over BITDECODE's spec; ``bitdecode`` given: an engine config that
    asks for the backend with those settings (what the plugin's scheduler patches read)."""
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    import vllm_bitdecode
    from vllm_bitdecode.backend.spec import BitDecodeAttentionSpec
    from vllm_bitdecode.testing.model_dir import TINY_LLAMA, write_llama_config

    vllm_bitdecode.register()
    model = str(write_llama_config(tmp_path / "m", **TINY_LLAMA))
    mc = ModelConfig(model=model, skip_tokenizer_init=True, max_model_len=16384,
                     dtype="bfloat16")
    sc = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=16384, max_model_len=16384,
                         is_encoder_decoder=False)
    cc = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    cc.num_gpu_blocks = 2000
    extra = {}
    if bitdecode is not None:
        from vllm.config import AttentionConfig

        extra = dict(attention_config=AttentionConfig(backend="BITDECODE"),
                     additional_config={"bitdecode": bitdecode})
    vc = VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc,
                    device_config=DeviceConfig(device="cpu"), **extra)
    spec = BitDecodeAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=128,
                                  dtype=torch.uint8, bits=4, group_size=128)
    kvc = KVCacheConfig(num_blocks=2000, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec(["layers.0.self_attn.attn"], spec)])
    sched = Scheduler(vc, kvc, StructuredOutputManager(vc), block_size=BLOCK, log_stats=True)
    from vllm.utils.hashing import sha256

    init_none_hash(sha256)
    sched._test_hasher = get_request_block_hasher(BLOCK, sha256)
    return sched


def _add_request(sched, rid: str, prompt: list[int], max_tokens: int) -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    sched.add_request(Request(
        request_id=rid, prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        pooling_params=None, block_hasher=sched._test_hasher))


def _model_output(out):
    """A stand-in model's output for a SchedulerOutput: token 5 for every row."""
    from vllm.v1.outputs import ModelRunnerOutput

    rows = list(out.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids=rows, req_id_to_index={r: i for i, r in enumerate(rows)},
                             sampled_token_ids=[[5] for _ in rows], logprobs=None,
                             prompt_logprobs_dict={}, pooler_output=[])


def _serve(sched, rid: str, prompt: list[int]) -> tuple[list[tuple[int, int, int]], int]:
    """Run one request to completion with a stand-in model; (requests, queries, hits) of
    every SchedulerStats, and the tokens computed by its first step."""
    _add_request(sched, rid, prompt, max_tokens=2)
    stats, first = [], None
    for _ in range(5):
        out = sched.schedule()
        if not out.num_scheduled_tokens:
            break
        first = out.num_scheduled_tokens[rid] if first is None else first
        for eco in sched.update_from_output(out, _model_output(out)).values():
            if eco.scheduler_stats is not None:
                p = eco.scheduler_stats.prefix_cache_stats
                stats.append((p.requests, p.queries, p.hits))
    return stats, first


def test_shared_prefix_hits_full_pages_and_is_counted(scheduler):
    prefix = list(range(100, 100 + PREFIX))
    cold, first_cold = _serve(scheduler, "a", prefix + [7] * 300)
    warm, first_warm = _serve(scheduler, "b", prefix + [8] * 500)
    assert sum(h for _, _, h in cold) == 0 and first_cold == PREFIX + 300
    hit = PREFIX // BLOCK * BLOCK  # the full pages of the prefix; its partial page is not
    assert sum(q for _, q, _ in warm) == PREFIX + 500
    assert sum(h for _, _, h in warm) == hit
    assert first_warm == PREFIX + 500 - hit
    assert scheduler.reset_prefix_cache()
    again, _ = _serve(scheduler, "c", prefix + [9] * 500)
    assert sum(h for _, _, h in again) == 0  # nothing survives a reset


def _step(sched):
    """One schedule() and a stand-in model's output for it; the SchedulerOutput."""
    out = sched.schedule()
    sched.update_from_output(out, _model_output(out))
    return out


@pytest.mark.parametrize("k_mode", ["channel", "token"])
def test_requests_preempted_by_a_cache_reset_are_reported_in_channel_mode(tmp_path, k_mode):
    """reset_prefix_cache(reset_running_requests=True) (vLLM pausing or sleeping with
    mode="keep") preempts the running requests outside schedule(); vLLM's next output
    does not name them in preempted_req_ids, so per-channel K's residual slots stayed
    taken until they resumed. With channel mode the next output names them, once; with
    per-token K (no slots) the output stays vLLM's."""
    sched = _scheduler(tmp_path, {"bits": 4, "k_mode": k_mode})
    for rid in ("a", "b"):
        _add_request(sched, rid, list(range(10, 50)), max_tokens=8)
    assert not _step(sched).preempted_req_ids  # both prefill and run
    assert sched.reset_prefix_cache(reset_running_requests=True)
    out = _step(sched)  # both resume at once (FCFS puts them first)
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    assert (out.preempted_req_ids or set()) == ({"a", "b"} if k_mode == "channel" else set())
    assert not _step(sched).preempted_req_ids  # reported once
