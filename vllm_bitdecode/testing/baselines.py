"""The unquantized baselines the kernel tests and benchmarks compare against."""

from __future__ import annotations

# vLLM 0.20 decodes in full CUDA graphs, where its FlashAttention builder bounds FA3's
# splits by this (AttentionConfig.flash_attn_max_num_splits_for_cuda_graph)
FA3_GRAPH_MAX_SPLITS = 32


def fa3_decode_schedule(q, k_cache, seq_lens, max_seq_len: int, cu_seqlens_q,
                        max_seqlen_q: int = 1, num_splits: int = FA3_GRAPH_MAX_SPLITS):
    """FA3's tile schedule for a batch, as vLLM's FlashAttention metadata builder
    computes it once per step (``aot_schedule``) and every layer's call then reuses: pass
    it to :func:`fa3_paged_decode` with the same ``num_splits`` so that a timed call
    runs the attention kernel and its combine only, not FA3's scheduling pass, as in
    vLLM. Shapes as in :func:`fa3_paged_decode`."""
    from vllm.vllm_flash_attn import get_scheduler_metadata

    return get_scheduler_metadata(
        batch_size=seq_lens.shape[0], max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seq_len,
        num_heads_q=q.shape[1], num_heads_kv=k_cache.shape[2], headdim=q.shape[2],
        cache_seqlens=seq_lens, qkv_dtype=k_cache.dtype, cu_seqlens_q=cu_seqlens_q,
        page_size=k_cache.shape[1], causal=True, num_splits=num_splits)


def fa3_paged_decode(q, k_cache, v_cache, block_table, seq_lens, max_seq_len: int,
                     softmax_scale: float, out=None, cu_seqlens_q=None, max_seqlen_q: int = 1,
                     scheduler_metadata=None, num_splits: int = 0, **descales):
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
    passed in, so that a timed call launches nothing but the attention kernel, and so may
    ``scheduler_metadata`` with its ``num_splits`` (:func:`fa3_decode_schedule`); without
    them FA3 schedules the call itself, one more kernel per call.
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
                           out=out, fa_version=3, scheduler_metadata=scheduler_metadata,
                           num_splits=num_splits, **descales)
    return out
