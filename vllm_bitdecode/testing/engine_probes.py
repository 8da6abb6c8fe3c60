"""What a test installs into an engine running in this process, and reads back: hooks on
the model (outputs, captures with positions, every layer checked against the float32
reference), per-step counters on the metadata builder and the runner's persistent batch,
CUDA-graph replays, vLLM's counters, the KV cache poisoned, and sleep with wake-up.
Each is a function of the model, the worker or the ``LLM`` that ``apply_model`` /
``collective_rpc`` can run, or a class made before the engine builds its metadata
builders."""

from __future__ import annotations


def install_output_recorder(model):
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


def fetch_recorded_outputs(model):
    return model._bitdecode_attn_outputs


def install_capture(model):
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


def reset_capture(model):
    model._bitdecode_capture["positions"].clear()
    model._bitdecode_capture["rows"].clear()
    return True


def fetch_capture(model):
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


def install_batch_counter(worker) -> bool:
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


def fetch_batch_counter(worker) -> dict[str, int]:
    return dict(worker.model_runner._bitdecode_batch_counts)


class GraphReplayCounter:
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


class PrefillGroupCounter:
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


class DecodeRowCounter:
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


class SparseRowCounter:
    """In an engine running in this process with sparse mode on: over every step's
    decode rows, how many are long enough to decode sparsely (``eligible``: at least
    min_seq_len tokens, not a prompt's chunk; those are ``prompt``, dense by design,
    backend.metadata's _prompt_rows) and how many of those get score keys in the
    selection layer's workspace (``with_keys``), by the kernels' own test
    (``selection_row_has_keys`` in selection.cuh: first key plus length in tokens within
    the capacity); an eligible row without keys decodes densely, exact but without the
    saving. Reads the step's device tensors after each build, a sync per step: for tests
    only."""

    def __init__(self) -> None:
        from vllm_bitdecode.backend.metadata import (
            rows_long_enough_for_sparse,
            rows_with_score_keys,
        )

        self.counts = {"steps": 0, "rows": 0, "eligible": 0, "with_keys": 0,
                       "prompt": 0, "capacity": 0}
        counts = self.counts

        def count(cam, md) -> None:
            sp = md.sparse
            if sp is None or md.num_decodes == 0:
                return
            lens = md.decode_seq_lens
            counts["steps"] += 1
            counts["rows"] += int((lens >= 1).sum())
            long_enough = rows_long_enough_for_sparse(lens, sp.min_seq_len)
            prompt = sp.key_offsets < 0  # a prompt's short chunk: dense by design
            counts["prompt"] += int((long_enough & prompt).sum())
            counts["eligible"] += int((long_enough & ~prompt).sum())
            counts["with_keys"] += int(rows_with_score_keys(
                lens, sp.key_offsets, sp.min_seq_len, sp.key_capacity).sum())
            counts["capacity"] = sp.key_capacity

        _after_build(count)


class KernelCheck:
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


def kv_cache_bytes(worker, fill: int | None = None) -> int:
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


def sleep_and_wake(llm, level: int) -> int:
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
