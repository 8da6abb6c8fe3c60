"""The unquantized baselines the kernel tests and benchmarks compare against."""

from __future__ import annotations


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
