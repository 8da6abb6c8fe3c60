"""Plain-PyTorch stand-ins for the attention calls the backend makes on the GPU
(FlashAttention's varlen function, vLLM's merge_attn_states), for CPU tests that run the
impl with the reference in place of every CUDA op, and the random paged cache they read."""

from __future__ import annotations

import torch

from vllm_bitdecode import config as bd_config
from vllm_bitdecode import reference as ref


def flash_attn_varlen(*, q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale,
                      causal, fa_version, cu_seqlens_k=None, seqused_k=None, block_table=None,
                      out=None, return_softmax_lse=False):
    """FlashAttention's varlen call: K/V paged (block_table, seqused_k) or contiguous
    (cu_seqlens_k); causal from the bottom right when asked; into ``out`` if given, and
    with the LSE ([heads, tokens]) if asked."""
    outs, lses = [], []
    for j in range(cu_seqlens_q.shape[0] - 1):
        qs = q[int(cu_seqlens_q[j]) : int(cu_seqlens_q[j + 1])]
        if block_table is not None:
            n = int(seqused_k[j])
            pages = block_table[j, : -(-n // k.shape[1])].long()
            # pages read whole, as FlashAttention-3 reads 128-token pages (TMA), the rows
            # past seqused_k masked in the scores only
            ks, vs = k[pages].flatten(0, 1), v[pages].flatten(0, 1)
        else:
            ks = k[int(cu_seqlens_k[j]) : int(cu_seqlens_k[j + 1])]
            vs = v[int(cu_seqlens_k[j]) : int(cu_seqlens_k[j + 1])]
            n = ks.shape[0]
        assert qs.shape[0] <= max_seqlen_q and n <= max_seqlen_k
        o, lse = ref.attention_lse(qs, ks, vs, softmax_scale, causal, num_keys=n)
        outs.append(o.to(q.dtype))
        lses.append(lse)
    result = torch.cat(outs)
    if out is not None:
        out.copy_(result)
        result = out
    return (result, torch.cat(lses, dim=1)) if return_softmax_lse else result


def merge_attn_states(out, prefix_out, prefix_lse, suffix_out, suffix_lse, out_lse=None):
    """vLLM's merge_attn_states: ``out`` (and ``out_lse`` if given) written."""
    o, lse = ref.merge_attention_states(prefix_out, prefix_lse, suffix_out, suffix_lse)
    out.copy_(o)
    if out_lse is not None:
        out_lse.copy_(lse)


def quantize_to_pages(key, value, slot_mapping, cache, signs, bits, group_size,
                      block_size) -> None:
    """ops.quantize_to_pages by the reference, in the active config's page format."""
    fmt = bd_config.get_active().page_format(key.shape[-1], block_size)
    ref.write_tokens(cache, key, value, slot_mapping, fmt, signs is not None)


def dequantize_pages(cache, block_table, seq_lens, out_start, k_out, v_out, bits, group_size,
                     block_size, max_tokens) -> None:
    """ops.dequantize_pages by the reference: each request's first seq_lens[i] tokens into
    rows out_start[i]... of k_out / v_out, in the active config's page format."""
    fmt = bd_config.get_active().page_format(k_out.shape[-1], block_size)
    for i, n in enumerate(seq_lens.tolist()):
        assert n <= max_tokens
        assert block_table.stride(1) == 1  # the kernel's requirement (a window's is a view)
        k, v = ref.read_blocks(cache, block_table[i, : -(-n // block_size)], n, fmt,
                               k_out.dtype)
        w = int(out_start[i])
        k_out[w : w + n], v_out[w : w + n] = k.to(k_out.dtype), v.to(v_out.dtype)


def random_pages(fmt, rotate_k: bool, lens: list[int], num_kv_heads: int,
                 gen: torch.Generator, spare_blocks: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K and V (bf16) of ``lens[i]`` tokens for request i, quantized by the
    reference into pages in permuted order. Returns the cache [blocks, kv_heads, region]
    uint8 and the block table [requests, blocks per request] int32, ``spare_blocks``
    columns wider than the longest context needs."""
    bs = fmt.block_size
    max_blocks = -(-max(lens) // bs) + spare_blocks
    table = torch.randperm(len(lens) * max_blocks, generator=gen).to(torch.int32)
    table = table.view(len(lens), max_blocks)
    cache = torch.zeros(len(lens) * max_blocks, num_kv_heads, fmt.head_region_bytes,
                        dtype=torch.uint8)
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        slots = table[i, pos // bs].long() * bs + pos % bs
        k = torch.randn(n, num_kv_heads, fmt.head_size, generator=gen).to(torch.bfloat16)
        v = torch.randn(n, num_kv_heads, fmt.head_size, generator=gen).to(torch.bfloat16)
        ref.write_tokens(cache, k, v, slots, fmt, rotate_k)
    return cache, table


def assert_layer_matches(impl, q: torch.Tensor, cache: torch.Tensor, md,
                         want: torch.Tensor) -> None:
    """One layer's forward over a step, the output poisoned (a row never written shows
    as NaN), against the reference output ``want`` (float32)."""
    import types

    out = torch.full_like(q, float("nan"))
    impl.forward(types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn"), q, q, q,
                 cache, md, output=out)
    assert torch.isfinite(out).all()
    err = float((out.float() - want).norm() / want.norm())
    assert err < 1e-2, err
