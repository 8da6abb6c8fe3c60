"""Dummy-weight Llama engines for GPU tests and benchmarks (no downloads anywhere).

Each engine runs in a fresh subprocess (``python -m vllm_bitdecode.testing SPEC OUT``) so
that engines with different backends never share GPU memory or plugin state, and so the
engine log (which carries vLLM's "GPU KV cache size" line) can be read back.

A spec can ask one engine for several things in turn, so that one start-up (35-55 s with
compilation) serves many checks: ``generate`` (one batch, optional attention capture),
``jobs`` (named batches with prefix-cache resets, attention capture with positions,
every attention forward checked against the reference on its own pages, vLLM's
counters and CUDA-graph replays per job), ``decode_timing`` / ``decode_timings``
(ms per decode step), ``decode_profiles`` (GPU time per decode step by kernel,
vllm_bitdecode.step_profile) and ``throughput`` (a ``vllm bench throughput``-style run).

A model directory for ``vllm serve`` / ``vllm bench`` (config.json plus a tiny word-level
tokenizer with a chat template) is written by::

    python -m vllm_bitdecode.testing make-model DIR [--layers N] [--vocab-size V]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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

# A tiny Llama for serving tests: 8 query / 2 KV heads of d=128 (GQA 4), 2 layers.
TINY_LLAMA = dict(
    hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
    head_dim=128, num_hidden_layers=2, vocab_size=32000, max_position_embeddings=32768,
)

# Token ids 0-2 of the test tokenizer; they match LLAMA3_8B's bos/eos ids.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Plain words the test tokenizer knows, so that chat prompts map to real ids.
TOKENIZER_WORDS = ("user", "assistant", "system", ":", "hello", "tell", "me", "a", "story",
                   "about", "the", "sea", ".", ",", "?")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def write_llama_config(path: str | Path, **overrides: Any) -> Path:
    """A directory holding only config.json: enough for load_format="dummy"."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**LLAMA3_8B, **overrides}, indent=1))
    return path


def tokenizer_vocab(vocab_size: int) -> dict[str, int]:
    """One word per id: the special tokens, a few English words, then ``w<id>``."""
    words = [*SPECIAL_TOKENS, *TOKENIZER_WORDS]
    if vocab_size < len(words):
        raise ValueError(f"vocab_size {vocab_size} < {len(words)} fixed tokens")
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), vocab_size)})
    return vocab


def write_tiny_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """tokenizer.json + tokenizer_config.json (with a chat template) for ``vocab_size`` ids.

    A word-level tokenizer with exactly as many ids as the model's vocabulary, so that
    every id a dummy-weight model samples decodes (to ``w<id>``, space-separated), and
    text prompts split on whitespace and punctuation. Enough for ``vllm serve`` (text
    and chat endpoints) and for ``vllm bench``'s random dataset; no download needed.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab=tokenizer_vocab(vocab_size), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return path


def write_model_dir(path: str | Path, tokenizer: bool = True, **overrides: Any) -> Path:
    """config.json (Llama-3-8B shape unless overridden) and, by default, the tiny tokenizer."""
    if tokenizer:
        # without a transformers_version, transformers 4.57 takes a local tokenizer for
        # a Mistral one and warns about its regex
        overrides = {"transformers_version": "4.57.1", **overrides}
    path = write_llama_config(path, **overrides)
    if tokenizer:
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        write_tiny_tokenizer(path, vocab)
    return path


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


def _install_hook(model):
    """Record the last attention layer's output at every forward (eager engines only)."""
    import torch

    attn = model.model.layers[-1].self_attn.attn
    store: list[torch.Tensor] = []
    model._bitdecode_attn_outputs = store
    attn.register_forward_hook(lambda mod, args, out: store.append(out.detach().float().cpu()))
    return True


def poison_prefill_workspaces(model) -> int:
    """Fill every BITDECODE layer's prefill workspace with NaN (the layers share one per
    engine and shape), as memory an earlier user of the allocator left may hold: a row
    that attention reads without writing it first then shows in the output. Returns the
    workspaces filled."""
    seen = set()
    for module in model.modules():
        ws = getattr(getattr(module, "impl", None), "prefill_workspace", None)
        if ws is not None and ws.data_ptr() not in seen:
            seen.add(ws.data_ptr())
            ws.fill_(float("nan"))
    return len(seen)


def _fetch_hook(model):
    return model._bitdecode_attn_outputs


def _install_capture(model):
    """Record, at every forward (eager engines only), the last layer's attention output
    rows with the position of each row, so that runs with different schedules (chunks,
    cache hits, preemption) can be compared row by row."""
    layer = model.model.layers[-1].self_attn
    store: dict[str, list] = {"positions": [], "rows": []}
    model._bitdecode_capture = store

    def before(mod, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[0]
        store["positions"].append(positions.detach().reshape(-1).cpu())

    def after(mod, args, out):
        store["rows"].append(out.detach().reshape(out.shape[0], -1).cpu())

    layer.register_forward_pre_hook(before, with_kwargs=True)
    layer.attn.register_forward_hook(after)
    return True


def _reset_capture(model):
    model._bitdecode_capture["positions"].clear()
    model._bitdecode_capture["rows"].clear()
    return True


def _fetch_capture(model):
    import torch

    store = model._bitdecode_capture
    pos, rows = store["positions"], store["rows"]
    if len(pos) != len(rows):
        raise RuntimeError(f"capture out of step: {len(pos)} positions, {len(rows)} outputs")
    sizes = [int(r.shape[0]) for r in rows]
    for p, r in zip(pos, rows, strict=True):
        if p.numel() != r.shape[0]:
            raise RuntimeError(f"capture: {p.numel()} positions for {r.shape[0]} rows")
    return {
        "positions": torch.cat(pos) if pos else torch.empty(0, dtype=torch.long),
        "rows": torch.cat(rows) if rows else torch.empty(0),
        "forward_sizes": sizes,
        "forward_first_positions": [int(p[0]) if p.numel() else -1 for p in pos],
    }


def _install_batch_counter(worker) -> bool:
    """Count, in the worker, what the persistent batch goes through at each step's
    ``_update_states``: ``unscheduled`` running requests (in the batch before the step,
    neither scheduled nor finished in it: under async scheduling a request that reached
    its max_tokens sits out one step, and vLLM takes it out of the batch while keeping
    its state) and ``moved`` requests (in the batch before and after, at another index:
    condensing after finished requests, reordering). Proof that a test's case happened."""
    runner = worker.model_runner
    counts = {"steps": 0, "unscheduled": 0, "moved": 0}
    runner._bitdecode_batch_counts = counts
    original = runner._update_states

    def _update_states(scheduler_output):
        before = {r: i for i, r in enumerate(runner.input_batch.req_ids) if r is not None}
        scheduled = set(scheduler_output.num_scheduled_tokens)
        finished = set(scheduler_output.finished_req_ids)
        out = original(scheduler_output)
        after = {r: i for i, r in enumerate(runner.input_batch.req_ids) if r is not None}
        counts["steps"] += 1
        counts["unscheduled"] += len(set(before) - scheduled - finished)
        counts["moved"] += sum(1 for r, i in after.items() if r in before and before[r] != i)
        return out

    runner._update_states = _update_states
    return True


def _fetch_batch_counter(worker) -> dict[str, int]:
    return dict(worker.model_runner._bitdecode_batch_counts)


class _GraphReplayCounter:
    """Counts ``torch.cuda.CUDAGraph.replay`` calls (full and piecewise vLLM graphs)."""

    def __init__(self) -> None:
        import torch

        self.count = 0
        original = torch.cuda.CUDAGraph.replay
        counter = self

        def replay(graph, *args, **kwargs):
            counter.count += 1
            return original(graph, *args, **kwargs)

        torch.cuda.CUDAGraph.replay = replay


def _after_build(hook) -> None:
    """Have every BitDecodeMetadataBuilder.build of this process call
    ``hook(common_attn_metadata, metadata)`` on the metadata it returns (the engine's
    per-step counters and checks below)."""
    from vllm_bitdecode.backend.metadata import BitDecodeMetadataBuilder

    original = BitDecodeMetadataBuilder.build

    def build(builder, common_prefix_len, common_attn_metadata, *args, **kwargs):
        md = original(builder, common_prefix_len, common_attn_metadata, *args, **kwargs)
        hook(common_attn_metadata, md)
        return md

    BitDecodeMetadataBuilder.build = build


class _PrefillGroupCounter:
    """Counts the prefill's workspace groups (per-token and channel mode) of an engine
    running in this process: steps with prefills, groups, steps with more than one, and
    steps that read a context in windows (per-token K)."""

    def __init__(self) -> None:
        self.counts = {"steps": 0, "groups": 0, "multi_group_steps": 0, "max_groups": 0,
                       "windowed_steps": 0}
        counts = self.counts

        def count(cam, md) -> None:
            if md.prefill is not None:
                n = len(md.channel_k.prefill_groups if md.channel_k else md.prefill.groups)
                counts["steps"] += 1
                counts["groups"] += n
                counts["multi_group_steps"] += n > 1
                counts["max_groups"] = max(counts["max_groups"], n)
                counts["windowed_steps"] += any(g.windows > 1 for g in md.prefill.groups)

        _after_build(count)


class _DecodeRowCounter:
    """Counts, in an engine running in this process, the steps whose decode requests
    had several query tokens (drafts to verify, short chunks) and went to the decode
    kernel: steps, query tokens (``rows``), the requests they came from, and how many of
    those steps read the tokens beside the heads (``packed``) rather than as one row per
    token."""

    def __init__(self) -> None:
        from vllm_bitdecode.backend.metadata import BitDecodeMetadataBuilder

        self.counts = {"steps": 0, "rows": 0, "requests": 0, "packed": 0}
        original_rows = BitDecodeMetadataBuilder._expand_decode_rows
        counts = self.counts

        def count(tokens: int, requests: int, packed: bool) -> None:
            if tokens > requests:  # some request had several query tokens
                counts["steps"] += 1
                counts["rows"] += tokens
                counts["requests"] += requests
                counts["packed"] += packed

        def expand(builder, cam, num_decodes, rows):
            count(rows, num_decodes, False)
            return original_rows(builder, cam, num_decodes, rows)

        def count_packed(cam, md) -> None:
            if md.decode_query_start is not None:
                count(md.num_decode_tokens, md.num_decodes, True)

        BitDecodeMetadataBuilder._expand_decode_rows = expand
        _after_build(count_packed)


class _SparseRowCounter:
    """In an engine running in this process with sparse mode on: over every step's
    decode rows, how many are long enough to decode sparsely (``eligible``: at least
    min_seq_len tokens) and how many of those get score keys in the selection layer's
    workspace (``with_keys``), by the kernels' own test (``selection_row_has_keys`` in
    selection.cuh: first key plus length in tokens within the capacity); an eligible
    row without keys decodes densely, exact but without the saving. Reads the step's
    device tensors after each build, a sync per step: for tests only."""

    def __init__(self) -> None:
        from vllm_bitdecode.backend.metadata import (
            rows_long_enough_for_sparse,
            rows_with_score_keys,
        )

        self.counts = {"steps": 0, "rows": 0, "eligible": 0, "with_keys": 0,
                       "capacity": 0}
        counts = self.counts

        def count(cam, md) -> None:
            sp = md.sparse
            if sp is None or md.num_decodes == 0:
                return
            lens = md.decode_seq_lens
            counts["steps"] += 1
            counts["rows"] += int((lens >= 1).sum())
            counts["eligible"] += int(rows_long_enough_for_sparse(lens, sp.min_seq_len).sum())
            counts["with_keys"] += int(rows_with_score_keys(
                lens, sp.key_offsets, sp.min_seq_len, sp.key_capacity).sum())
            counts["capacity"] = sp.key_capacity

        _after_build(count)


class _KernelCheck:
    """In an eager engine running in this process: after every attention forward of
    every layer of the model, the same attention computed as :mod:`reference` does it
    from that layer's pages as they are at that moment (the dequantized cache, float32),
    compared row by row with what BITDECODE wrote. This judges the kernels in a real
    engine (its schedules, prefix-cache hits, reordered batches, drafts under
    verification) apart from quantization: two engines whose batches differ compute
    keys and values in GEMMs of other shapes, and a 4-bit code can round the other way,
    but a row against its own cache must match within the kernels' rounding.

    Prefill requests of more than ``MAX_QUERY`` query tokens are left out (the
    reference's float32 score matrix of a whole prompt is large); every decode is
    checked. Per layer and forward, one record: the layer, the decode and prefill tokens
    checked, the longest decode request, for each kind the relative error over its rows
    and the worst row's, and how concentrated the decode rows' attention is: the mean
    share of their softmax on the last ``RECENT`` positions of their sequence."""

    MAX_QUERY = 64
    RECENT = 16

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.on = False

        def keep_batch(cam, md) -> None:
            # the whole batch as vLLM gave it (the metadata keeps decodes and prefills
            # apart); clones, since vLLM refills its buffers for the next step
            md.check_batch = (cam.query_start_loc_cpu[: cam.num_reqs + 1].clone(),
                              cam.seq_lens[: cam.num_reqs].clone(),
                              cam.block_table_tensor[: cam.num_reqs].clone())

        _after_build(keep_batch)

    def install(self, impl, layer_index: int) -> None:
        """Check ``impl`` (a layer's BitDecodeAttentionImpl) from now on."""
        original = impl.forward

        def forward(layer, query, key, value, kv_cache, attn_metadata, output=None, **kw):
            out = original(layer, query, key, value, kv_cache, attn_metadata, output, **kw)
            if self.on and attn_metadata is not None:
                record = self._check(impl, query, kv_cache, attn_metadata, out)
                self.records.append({"layer": layer_index, **record})
            return out

        impl.forward = forward

    def _check(self, impl, query, kv_cache, md, out) -> dict[str, float]:
        import torch

        from vllm_bitdecode import reference as ref

        qsl, seq_lens, block_table = md.check_batch
        fmt = md.page_format
        q = query[: md.num_actual_tokens]
        qf = ref.rotate(q) if impl.bitdecode.rotate_k else q.float()
        err = {"decode": [0.0, 0.0, 0, 0.0], "prefill": [0.0, 0.0, 0, 0.0]}  # num, den, rows, worst
        longest, recent = 0, []
        for i in range(seq_lens.shape[0]):
            start, end = int(qsl[i]), int(qsl[i + 1])
            kind = "decode" if end <= md.num_decode_tokens else "prefill"
            if end == start or (kind == "prefill" and end - start > self.MAX_QUERY):
                continue
            n = int(seq_lens[i])
            pages = block_table[i, : -(-n // fmt.block_size)]
            k, v = ref.read_blocks(kv_cache, pages, n, fmt, q.dtype)
            want, lse = ref.attention_lse(qf[start:end], k, v, impl.scale)
            want = want.flatten(1)
            if kind == "decode":
                longest = max(longest, end - start)
                w = self.RECENT
                lse_recent = ref.attention_lse(qf[start:end], k[-w:], v[-w:], impl.scale)[1]
                recent.append(torch.exp(lse_recent - lse).mean(0))  # [tokens]
            got = out[start:end].float().flatten(1)
            diff = (got - want).norm(dim=1)
            e = err[kind]
            e[0] += float(diff.square().sum())
            e[1] += float(want.square().sum())
            e[2] += end - start
            e[3] = max(e[3], float((diff / want.norm(dim=1).clamp_min(1e-30)).max()))
        record: dict[str, float] = {
            "longest_decode": longest,
            "decode_recent_share": float(torch.cat(recent).mean()) if recent else 0.0,
        }
        for kind, (num, den, rows, worst) in err.items():
            record[f"{kind}_rows"] = rows
            record[f"{kind}_err"] = (num / den) ** 0.5 if den > 0 else 0.0
            record[f"{kind}_worst_row"] = worst
        return record


_KERNEL_CHECK: _KernelCheck | None = None


def _install_kernel_check(model) -> bool:
    for index, layer in enumerate(model.model.layers):
        _KERNEL_CHECK.install(layer.self_attn.attn.impl, index)
    return True


def counters(llm) -> dict[str, float]:
    """vLLM's Prometheus counters by name (needs ``disable_log_stats=False``), else {}."""
    try:
        metrics = llm.get_metrics()
    except AssertionError:  # stat logging disabled
        return {}
    out: dict[str, float] = {}
    for m in metrics:
        if type(m).__name__ == "Counter":
            out[m.name] = out.get(m.name, 0) + m.value
    return out


# A job's poison_kv_cache byte for bf16 models: 0x1111 as a page's scale and zero is
# ~1e-28, so a token read from a poisoned page is ~0 (an attention row ~100% off, an
# answer lost), and nothing turns into NaN
POISON_BYTE = 0x11


def _kv_cache_bytes(worker, fill: int | None = None) -> int:
    """Bytes of this worker's KV cache (layers that share a tensor count once); with
    ``fill``, every one of them is overwritten with that value first. The device is
    synchronized around the fill: the offloading connector copies pages on its own
    streams, and a copy to the CPU still running would take the fill with it."""
    import torch

    torch.cuda.synchronize()
    seen, total = set(), 0
    for cache in worker.model_runner.kv_caches:
        if fill is not None:
            cache.fill_(fill)
        if cache.data_ptr() not in seen:
            seen.add(cache.data_ptr())
            total += cache.numel() * cache.element_size()
    torch.cuda.synchronize()
    return total


def _sleep_and_wake(llm, level: int) -> int:
    """``LLM.sleep(level)``, then the wake-up; returns the GPU bytes the sleep freed (the
    engine runs in this process). Level 1 wakes everything at once; level 2, which
    discards the weights, wakes as RL trainers do: the weights' memory first, the weights
    reloaded from the model's files into it, then the KV cache."""
    import torch

    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    llm.sleep(level=level)
    freed = torch.cuda.mem_get_info()[0] - free_awake
    if level == 2:
        llm.wake_up(tags=["weights"])
        llm.collective_rpc("reload_weights")
        llm.wake_up(tags=["kv_cache"])
    else:
        llm.wake_up()
    return freed


def _run_job(llm, sampling_params_cls, job: dict[str, Any], replays,
             prefill_groups: _PrefillGroupCounter | None = None) -> dict[str, Any]:
    slept = None
    if job.get("sleep_level"):
        slept = {"freed_bytes": _sleep_and_wake(llm, job["sleep_level"]),
                 "kv_cache_bytes": sum(llm.collective_rpc(_kv_cache_bytes))}
    if job.get("reset_prefix_cache"):
        if not llm.reset_prefix_cache():
            raise RuntimeError(f"job {job['name']}: reset_prefix_cache() refused")
    poisoned = None
    if job.get("poison_kv_cache") is not None:
        poisoned = sum(llm.collective_rpc(_kv_cache_bytes, args=(job["poison_kv_cache"],)))
    if job.get("capture"):
        llm.apply_model(_reset_capture)
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
    batch_before = llm.collective_rpc(_fetch_batch_counter)[0] if job.get("count_batch") else None
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
        batch_after = llm.collective_rpc(_fetch_batch_counter)[0]
        res["batch"] = {k: batch_after[k] - batch_before[k] for k in batch_after}
    if job.get("prompt_logprobs"):
        res["prompt_logprobs"] = [_prompt_logprobs(p, o.prompt_logprobs)
                                  for p, o in zip(job["prompts"], outs, strict=True)]
    if job.get("capture"):
        res["capture"] = llm.apply_model(_fetch_capture)[0]
    if check is not None:
        check.on = False
        res["kernel_check"] = list(check.records)
    return res


def _prompt_logprobs(prompt: list[int], steps: list[Any]) -> dict[str, list[Any]]:
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

    replays = _GraphReplayCounter() if spec.get("count_graph_replays") else None
    groups = _PrefillGroupCounter() if spec.get("count_prefill_groups") else None
    decode_rows = _DecodeRowCounter() if spec.get("count_decode_rows") else None
    sparse_rows = _SparseRowCounter() if spec.get("count_sparse_rows") else None
    global _KERNEL_CHECK
    kernel_check = any(j.get("kernel_check") for j in spec.get("jobs") or ())
    if kernel_check:
        if not spec.get("enforce_eager"):
            raise ValueError("kernel_check needs enforce_eager (a graph replays no Python)")
        _KERNEL_CHECK = _KernelCheck()  # before the engine builds its metadata builders
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(spec))
    result: dict[str, Any] = {"startup_s": time.perf_counter() - t0,
                              "device_name": torch.cuda.get_device_name()}
    if spec.get("poison_prefill_workspace"):
        result["workspaces_poisoned"] = llm.apply_model(poison_prefill_workspaces)[0]
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
    jobs = spec.get("jobs")
    if jobs:
        if any(j.get("capture") for j in jobs):
            llm.apply_model(_install_capture)
        if kernel_check:
            llm.apply_model(_install_kernel_check)
        if any(j.get("count_batch") for j in jobs):
            llm.collective_rpc(_install_batch_counter)
        result["jobs"] = {}
        for job in jobs:
            result["jobs"][job["name"]] = _run_job(llm, SamplingParams, job, replays, groups)
        # the engine's counters over its whole life: a step's stats may reach the
        # front end with a later step's outputs, after the job that caused them ended
        result["final_metrics"] = counters(llm)
    timing = spec.get("decode_timing")
    if timing:
        result["decode_timing"] = _time_decode(llm, SamplingParams, timing, replays)
    timings = spec.get("decode_timings")
    if timings:
        result["decode_timings"] = [_time_decode(llm, SamplingParams, t, replays)
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
        result["throughput"] = _throughput(llm, SamplingParams, tp)
    if decode_rows is not None:
        result["decode_rows"] = dict(decode_rows.counts)
    if sparse_rows is not None:
        result["sparse_rows"] = dict(sparse_rows.counts)
    del llm
    torch.cuda.empty_cache()
    return result


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


def _time_decode(llm, sampling_params_cls, timing: dict[str, Any],
                 replays: _GraphReplayCounter | None = None) -> dict[str, Any]:
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


def _throughput(llm, sampling_params_cls, cfg: dict[str, Any]) -> dict[str, Any]:
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


def fa3_paged_decode(q, k_cache, v_cache, block_table, seq_lens, max_seq_len: int,
                     softmax_scale: float, out=None, cu_seqlens_q=None, max_seqlen_q: int = 1,
                     **descales):
    """One decode query per sequence through vLLM's FlashAttention-3 over a paged cache:
    the unquantized baseline of the kernel benchmarks and tests. With ``cu_seqlens_q``
    and ``max_seqlen_q`` a sequence may have several query tokens (drafts to verify),
    the last at its last position.

    q ``[num_seqs, num_heads, D]``; k_cache, v_cache ``[num_blocks, block_size,
    num_kv_heads, D]`` (bf16 / fp16, or fp8 with ``q_descale`` / ``k_descale`` /
    ``v_descale``); block_table ``[num_seqs, max_blocks]`` int32; seq_lens ``[num_seqs]``
    int32 (``seqused_k``), all on the GPU; ``max_seq_len`` >= every length. Causal, the
    query at the last position. ``out`` (written; a new tensor like ``q`` if None) is
    returned (bf16 for an fp8 q); ``cu_seqlens_q`` (``arange(num_seqs + 1)`` int32) may be
    passed in, so that a timed call launches nothing but the attention kernel.
    """
    import torch
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    if cu_seqlens_q is None:
        cu_seqlens_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    if out is None:  # FA3 writes fp8 attention in bf16
        out = torch.empty(q.shape, dtype=torch.bfloat16 if q.element_size() == 1 else q.dtype,
                          device=q.device)
    flash_attn_varlen_func(q, k_cache, v_cache, max_seqlen_q=max_seqlen_q,
                           cu_seqlens_q=cu_seqlens_q,
                           max_seqlen_k=max_seq_len, seqused_k=seq_lens,
                           block_table=block_table, softmax_scale=softmax_scale, causal=True,
                           out=out, fa_version=3, **descales)
    return out


def free_port() -> int:
    """A free TCP port on loopback, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_processes(pid: int) -> list:
    """psutil handles of a server's descendants (its engine core), [] if it is gone."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def process_alive(proc) -> bool:
    """A psutil process that is still running and not a zombie."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_cmdline(proc) -> str:
    """A psutil process's command line ("VLLM::EngineCore" for vLLM's engine process, which
    renames itself), "" if it cannot be read (gone, a zombie)."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def server_error_lines(log: str) -> str:
    """The lines that explain a failed ``vllm serve`` start, wherever they sit in a long
    log; the whole log also goes to $OUT/server.log when $OUT is set (the GPU machine)."""
    keep = [ln for ln in log.splitlines()
            if any(w in ln for w in ("Error", "error:", "Exception", "raise ", "File \""))]
    if out := os.environ.get("OUT"):
        with open(os.path.join(out, "server.log"), "w") as f:
            f.write(log)
    return "\n".join(keep[-80:])


class ServedProcess:
    """A running ``vllm serve``: its process, base URL, log file and (once it answered)
    its descendants, the engine core among them."""

    def __init__(self, proc: subprocess.Popen, base: str, log_path: Path) -> None:
        self.proc, self.base, self.log_path = proc, base, log_path
        self.children: list = []

    def log(self) -> str:
        return self.log_path.read_text()


def post_json(url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """POST a JSON body to a server a test started; the JSON reply."""
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def stop_server(proc: subprocess.Popen, children: list, timeout: float = 60) -> dict[str, Any]:
    """Stop a server and its descendants: SIGTERM, then wait; kill whatever is left (and
    say so)."""
    out: dict[str, Any] = {"sigterm": proc.poll() is None}
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            out["killed"] = True
    out["exit_code"] = proc.returncode
    end = time.monotonic() + 30
    while any(process_alive(c) for c in children) and time.monotonic() < end:
        time.sleep(0.5)
    left = [c for c in children if process_alive(c)]
    for c in left:
        with contextlib.suppress(Exception):
            c.kill()
    out["children_left"] = len(left)
    out["exit_s"] = time.monotonic() - t0
    out["clean"] = not out.get("killed") and not left and out["sigterm"]
    return out


@contextlib.contextmanager
def vllm_serve(args: list[str], log_path: Path, timeout: float = 300
               ) -> Iterator[ServedProcess]:
    """Start ``vllm serve ARGS --host 127.0.0.1 --port <free>``, wait until /health
    answers (failing with the log's error lines if it exits or takes over ``timeout``
    seconds), yield it, and stop it and anything it left running afterwards."""
    import urllib.request

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *args,
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        srv = ServedProcess(proc, f"http://127.0.0.1:{port}", log_path)
        try:
            deadline = time.time() + timeout
            while True:
                assert proc.poll() is None, server_error_lines(srv.log())
                try:
                    urllib.request.urlopen(srv.base + "/health", timeout=2)
                    break
                except OSError:
                    assert time.time() < deadline, ("server did not come up:\n"
                                                    + server_error_lines(srv.log()))
                    time.sleep(2)
            srv.children = child_processes(proc.pid)
            yield srv
        finally:
            stop_server(proc, srv.children)  # the engine process too, if it lingers


def _visible_gpus(pynvml) -> list[Any]:
    """NVML handles of the GPUs CUDA_VISIBLE_DEVICES names (by index or UUID), or all."""
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return handles
    uuids = []
    for h in handles:
        uuid = pynvml.nvmlDeviceGetUUID(h)
        uuids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
    out = []
    for item in (x.strip() for x in visible.split(",")):
        if item.isdigit():
            out += handles[int(item):int(item) + 1]
        elif item:
            out += [h for h, u in zip(handles, uuids, strict=True) if u.startswith(item)]
    return out


def nvml_memory() -> dict[str, Any]:
    """GPU memory as NVML reports it, over the GPUs this process may use
    (CUDA_VISIBLE_DEVICES; all without it): ``used_mib`` (the devices' used memory,
    summed) and ``by_pid`` ({pid: MiB} of the processes holding memory on any of them;
    None where the driver does not say). NVML gives the host's pids: inside a
    container's PID namespace they need not be this one's."""
    import pynvml

    pynvml.nvmlInit()
    try:
        used = 0.0
        by_pid: dict[int, float | None] = {}
        for handle in _visible_gpus(pynvml):
            used += pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                mib = None if proc.usedGpuMemory is None else proc.usedGpuMemory / 2**20
                prior = by_pid.get(proc.pid, 0.0)
                by_pid[proc.pid] = None if prior is None or mib is None else prior + mib
        return {"used_mib": used, "by_pid": by_pid}
    finally:
        pynvml.nvmlShutdown()


# NVML's clock event reasons (nvmlClocksEventReason*) by what they say: the driver holds
# the board to its power limit (SwPowerCap 0x4); a hardware slowdown (HwSlowdown 0x8,
# which comes with the next two, and HwPowerBrakeSlowdown 0x80, an external brake
# signal); heat (SwThermalSlowdown 0x20, HwThermalSlowdown 0x40). A sample can count
# under several.
GPU_CLOCK_REASONS = {"sw_power_cap": 0x4, "hw_slowdown": 0x8 | 0x80, "thermal": 0x20 | 0x40}


def gpu_sampler_main(path: str, interval_s: float, parent: int) -> None:
    """Append ``[Unix time, SM clock MHz, power W, clock event reasons]`` of the first GPU
    this process may use to ``path`` every ``interval_s`` seconds, until killed or until
    process ``parent`` is gone (an engine killed on a timeout leaves no sampler behind):
    the body of :class:`GpuSampler`'s process. The power is NVML's power usage, which on
    Ampere and newer GPUs is an average over the last second."""
    import pynvml

    pynvml.nvmlInit()
    handle = _visible_gpus(pynvml)[0]
    reasons = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
               or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)
    with open(path, "a") as f:
        while os.getppid() == parent:
            sample = [time.time(), pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                      pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, int(reasons(handle))]
            f.write(json.dumps(sample) + "\n")
            f.flush()
            time.sleep(interval_s)


def summarize_gpu_samples(samples: list[list[float]],
                          windows: list[tuple[float, float]]) -> dict[str, Any] | None:
    """The samples of :func:`gpu_sampler_main` that fall in any of ``windows`` ((start,
    end) on the Unix clock): their count, the SM clock's median / min / max, the power's
    median / max, and per entry of GPU_CLOCK_REASONS the fraction of samples where the
    driver gave that reason for a lowered clock. None without a sample in a window."""
    inside = [s for s in samples if any(a <= s[0] <= b for a, b in windows)]
    if not inside:
        return None
    clocks, power = [s[1] for s in inside], [s[2] for s in inside]
    out: dict[str, Any] = {
        "samples": len(inside), "sm_clock_mhz_median": statistics.median(clocks),
        "sm_clock_mhz_min": min(clocks), "sm_clock_mhz_max": max(clocks),
        "power_w_median": statistics.median(power), "power_w_max": max(power)}
    for name, mask in GPU_CLOCK_REASONS.items():
        out[f"{name}_fraction"] = sum(1 for s in inside if int(s[3]) & mask) / len(inside)
    return out


class GpuSampler:
    """SM clock, power (a one-second average) and the driver's reasons for a lowered
    clock, sampled every ``interval_s`` while the ``with`` block runs by a process of its
    own (no thread of this process competes for the GIL with vLLM's engine loop);
    :meth:`summary` keeps the samples of chosen windows. Without NVML or a GPU the
    process ends at once and :meth:`summary` gives None."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.samples: list[list[float]] = []
        self._proc: subprocess.Popen | None = None
        self._path = ""

    def __enter__(self) -> GpuSampler:
        fd, self._path = tempfile.mkstemp(suffix=".jsonl", prefix="gpu_samples_")
        os.close(fd)
        try:
            code = ("from vllm_bitdecode.testing import gpu_sampler_main; "
                    f"gpu_sampler_main({self._path!r}, {self.interval_s!r}, {os.getpid()})")
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10  # the first sample, or the process's end
            while time.monotonic() < deadline and self._proc.poll() is None:
                if os.path.getsize(self._path) > 0:
                    break
                time.sleep(0.01)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        with open(self._path) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut short by the end
                    self.samples.append(json.loads(line))
        os.unlink(self._path)

    def summary(self, windows: list[tuple[float, float]]) -> dict[str, Any] | None:
        return summarize_gpu_samples(self.samples, windows)


_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text format (vLLM's /metrics) -> {metric name: value summed over its
    label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out

TIE_LOGPROB = 0.02  # two best log-probabilities closer than this are a tie


def assert_greedy_equal_up_to_ties(tokens: list[list[int]], ref_tokens: list[list[int]],
                                   ref_logprobs: list[list[dict[int, float]]], length: int,
                                   what: str, tie_logprob: float = TIE_LOGPROB) -> int:
    """Greedy tokens equal the reference's, request by request, each ``length`` long.

    A request may differ once, at a step where the reference's two best log-probabilities
    are within ``tie_logprob`` (a different summation order may break such a tie); it is
    not compared after that step, its context differing from there on. At most one request
    in 8 (at least one) may do so. Returns the number that did.
    """
    ties = 0
    for i, (a_toks, b_toks) in enumerate(zip(tokens, ref_tokens, strict=True)):
        assert len(a_toks) == len(b_toks) == length, f"{what}: request {i} did not finish"
        for step, (a, b) in enumerate(zip(a_toks, b_toks, strict=True)):
            if a == b:
                continue
            top = sorted(ref_logprobs[i][step].values(), reverse=True)
            assert len(top) >= 2 and top[0] - top[1] < tie_logprob, (
                f"{what}: request {i}, step {step}: token {a} instead of {b} "
                f"(reference log-probs {top})")
            ties += 1
            break
    assert ties <= max(1, len(tokens) // 8), f"{what}: {ties} requests diverged at ties"
    return ties


def assert_greedy_close(tokens: list[list[int]], logprobs: list[list[dict[int, float]]],
                        ref_tokens: list[list[int]], ref_logprobs: list[list[dict[int, float]]],
                        length: int, what: str) -> list[int | None]:
    """vLLM's own rule for two engines whose arithmetic differs (its ``check_logprobs_close``):
    greedy tokens equal, request by request, up to a first divergence where each engine's
    token is among the other's top log-probabilities (``logprobs`` > 1 in the job); after
    it the contexts differ and the request is not compared further. Returns, per request,
    the step of its divergence (None: identical).
    """
    steps: list[int | None] = []
    for i, (a_toks, b_toks) in enumerate(zip(tokens, ref_tokens, strict=True)):
        assert len(a_toks) == len(b_toks) == length, f"{what}: request {i} did not finish"
        pairs = enumerate(zip(a_toks, b_toks, strict=True))
        step = next((j for j, (a, b) in pairs if a != b), None)
        if step is not None:
            a, b = a_toks[step], b_toks[step]
            assert a in ref_logprobs[i][step] and b in logprobs[i][step], (
                f"{what}: request {i}, step {step}: token {a} instead of {b}, and not among "
                f"the other's top tokens ({ref_logprobs[i][step]} / {logprobs[i][step]})")
        steps.append(step)
    return steps


def teacher_forced_agreement(test: list[dict[str, list[Any]]],
                             ref: list[dict[str, list[Any]]]) -> dict[str, float]:
    """Compare two engines' ``prompt_logprobs`` results on the same prompts: perplexity
    ratio (test / ref), the share of positions whose argmax agrees, and the mean absolute
    difference of the prompt tokens' log-probabilities."""
    import math

    a = [x for r in test for x in r["logprob"]]
    b = [x for r in ref for x in r["logprob"]]
    same = [x == y for t, r in zip(test, ref, strict=True)
            for x, y in zip(t["argmax"], r["argmax"], strict=True)]
    assert len(a) == len(b) == len(same) > 0, "prompt log-probabilities missing"
    return {"ppl_ratio": math.exp((sum(b) - sum(a)) / len(a)),
            "argmax_agreement": sum(same) / len(same),
            "mean_abs_logprob_diff": sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)}


def match_rows_by_position(test: dict[str, Any], ref: dict[str, Any]) -> tuple[Any, float]:
    """Compare two attention captures (``positions`` [N] and ``rows`` [N, H*D], as
    returned for jobs with ``capture``) row by row.

    For every row of ``test``: the smallest relative error |t - r| / |r| against the rows
    of ``ref`` at the same position (one per request that reached it; inf where ``ref``
    has none); and the overall relative error sqrt(sum |t - r|^2 / sum |r|^2) over those
    best matches. Returns (per-row errors tensor, overall error).
    """
    import math

    import torch

    tp, tr = test["positions"], test["rows"].float()
    rp, rr = ref["positions"], ref["rows"].float()
    r_order = torch.argsort(rp, stable=True)
    rp, rr = rp[r_order], rr[r_order]
    r_pos, r_cnt = torch.unique_consecutive(rp, return_counts=True)
    r_start = torch.cumsum(r_cnt, 0) - r_cnt
    where = {int(p): (int(s), int(c)) for p, s, c in zip(r_pos, r_start, r_cnt, strict=True)}
    t_order = torch.argsort(tp, stable=True)
    t_pos, t_cnt = torch.unique_consecutive(tp[t_order], return_counts=True)
    t_start = torch.cumsum(t_cnt, 0) - t_cnt
    errs = torch.full((tp.numel(),), math.inf)
    num = den = 0.0
    single_t, single_r = [], []  # positions with one reference row: compared at once
    for p, s, c in zip(t_pos.tolist(), t_start.tolist(), t_cnt.tolist(), strict=True):
        if p not in where:
            continue
        rs, rc = where[p]
        idx = t_order[s : s + c]
        if rc == 1:
            single_t.append(idx)
            single_r.append(torch.full((c,), rs))
            continue
        cand = rr[rs : rs + rc]
        dist = torch.cdist(tr[idx], cand, compute_mode="donot_use_mm_for_euclid_dist")
        norms = cand.norm(dim=1).clamp_min(1e-30)
        best = (dist / norms).argmin(dim=1)
        d_best = dist.gather(1, best[:, None])[:, 0]
        n_best = norms[best]
        errs[idx] = d_best / n_best
        num += float((d_best**2).sum())
        den += float((n_best**2).sum())
    if single_t:
        ti, ri = torch.cat(single_t), torch.cat(single_r)
        d_best = (tr[ti] - rr[ri]).norm(dim=1)
        n_best = rr[ri].norm(dim=1).clamp_min(1e-30)
        errs[ti] = d_best / n_best
        num += float((d_best**2).sum())
        den += float((n_best**2).sum())
    return errs, math.sqrt(num / den) if den else math.inf


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


def _make_model_cli(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m vllm_bitdecode.testing make-model",
        description="Write a dummy-weight Llama model directory (config.json, tiny "
                    "tokenizer with a chat template) for vllm serve / vllm bench "
                    "with --load-format dummy. Llama-3-8B shape unless overridden.",
    )
    ap.add_argument("path")
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--tiny", action="store_true",
                    help="the 2-layer, 1024-wide test model instead of the 8B shape")
    ap.add_argument("--no-tokenizer", action="store_true")
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = dict(TINY_LLAMA) if args.tiny else {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    path = write_model_dir(args.path, tokenizer=not args.no_tokenizer, **overrides)
    print(path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "make-model":
        _make_model_cli(sys.argv[2:])
        return
    import torch

    spec = json.loads(Path(sys.argv[1]).read_text())
    if "startup_failure" in spec:
        torch.save(startup_failure(spec), sys.argv[2])
        return
    torch.save(run_engine(spec), sys.argv[2])


if __name__ == "__main__":
    main()
