"""BitDecodeAttentionImpl: per-layer quantize-on-write and attention."""

from __future__ import annotations

import math
import weakref

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionImpl, AttentionType
from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

from vllm_bitdecode import config, kc_prefill, ops
from vllm_bitdecode.backend.metadata import (
    MIN_TILES_PER_SPLIT,
    BitDecodeMetadata,
    PrefillGroup,
    workspace_rows,
)
from vllm_bitdecode.page_format import PageFormat
from vllm_bitdecode.reference import rotation_matrix

# One prefill workspace per engine and shape, shared by the layers, which run one after
# another; held by the layers, so it goes with the engine.
_PREFILL_WORKSPACES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class BitDecodeAttentionImpl(AttentionImpl[BitDecodeMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **unsupported: object,
    ) -> None:
        def refuse(what: str) -> config.BitDecodeConfigError:
            return config.BitDecodeConfigError(f"{what} is not supported by BITDECODE")

        if attn_type != AttentionType.DECODER:
            raise refuse(f"attention type {attn_type}")
        if alibi_slopes is not None:
            raise refuse("ALiBi")
        if logits_soft_cap:
            raise refuse("logits soft-capping")
        if kv_sharing_target_layer_name is not None:
            raise refuse("KV sharing between layers")
        if any(v is not None for v in unsupported.values()):
            raise refuse(f"attention option(s) {sorted(unsupported)}")
        config.check_model(
            head_size=head_size,
            dtype=torch.get_default_dtype(),
            kv_cache_dtype=kv_cache_dtype,
            block_size=None,
            sliding_window=sliding_window,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
        )
        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is not None:
            self.bitdecode = config.check_vllm_config(vllm_config)
        else:
            self.bitdecode = config.get_active()
        config.set_active(self.bitdecode)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.fa_version = get_flash_attn_version(head_size=head_size)
        # defined by vLLM on CUDA platforms only, hence imported here
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

        self._flash_attn_varlen = flash_attn_varlen_func
        self._rotation: torch.Tensor | None = None  # [D, D] model dtype, rotates prefill Q
        self._prefill_rotation_gain = 1.0  # the softmax scale's factor for that Q
        self._fmt = None  # page format, known once the cache is bound
        self._role: str | None = None  # sparse mode: dense, selection or reuse
        self.residual = self._residual(vllm_config)
        self.prefill_workspace = self._prefill_workspace(vllm_config)

    def _residual(self, vllm_config) -> torch.Tensor | None:
        """Per-channel K mode: this layer's exact K and V of every live request's newest
        page (config.residual_shape, which start-up's size warning counts too).
        Made while vLLM loads the model, so its memory profile takes it off the KV budget
        (docs/per-channel-k-design.md, section 9)."""
        if not self.bitdecode.channel_k or vllm_config is None:
            return None
        return torch.empty(config.residual_shape(vllm_config, self.num_kv_heads,
                                                 self.head_size),
                           dtype=vllm_config.model_config.dtype,
                           device=torch.device("cuda", torch.cuda.current_device()))

    def _prefill_workspace(self, vllm_config) -> torch.Tensor | None:
        """The rows prefill dequantizes K and V into, [2, prefill_workspace_rows,
        kv_heads, head_size] in the model dtype, one per engine (the layers run one after
        another). Made while vLLM loads the model, so its memory profile takes it off the
        KV budget, and GPU memory stays flat whatever the prefix-cache hits of a step."""
        if vllm_config is None or not torch.cuda.is_available():
            return None  # (the CPU tests build layers without a GPU)
        rows = workspace_rows(vllm_config, self.bitdecode, vllm_config.cache_config.block_size)
        dtype = vllm_config.model_config.dtype
        device = torch.device("cuda", torch.cuda.current_device())
        shape = (2, rows, self.num_kv_heads, self.head_size)
        key = (id(vllm_config), device, dtype, shape)
        ws = _PREFILL_WORKSPACES.get(key)
        if ws is None:
            ws = torch.empty(shape, dtype=dtype, device=device)
            _PREFILL_WORKSPACES[key] = ws
        return ws

    # ---- quantize-on-write --------------------------------------------------------------
    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if self.bitdecode.channel_k:
            return  # forward writes: the prefill must read the residual before the write
        if self._fmt is None:
            self._fmt = self.bitdecode.page_format(
                self.head_size, _block_size(kv_cache, self.bitdecode, self.head_size)
            )
        fmt = self._fmt
        ops.quantize_to_pages(
            key, value, slot_mapping, kv_cache,
            _signs(self.bitdecode, key.device, self.head_size),
            fmt.bits, fmt.group_size, fmt.block_size,
        )

    # ---- attention ----------------------------------------------------------------------
    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_region_bytes] uint8
        attn_metadata: BitDecodeMetadata | None,
        output: torch.Tensor | None = None,  # [num_tokens, num_heads, head_size]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert output is not None, "BITDECODE writes into vLLM's output buffer"
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("BITDECODE does not produce quantized outputs")
        md = attn_metadata
        if md is None:  # profiling run: no cache yet
            return output.fill_(0)
        fmt = md.page_format
        if md.channel_k is not None:
            return self._forward_channel_k(query, key, value, kv_cache, md, output)
        if md.num_decodes > 0:
            nd = md.num_decodes
            sp = md.sparse
            role = config.DENSE if sp is None else self._sparse_role(layer, sp)
            if role == config.REUSE:
                ops.decode_sparse(
                    output[:nd], query[:nd], kv_cache, md.decode_block_table,
                    md.decode_seq_lens, sp.sel_positions, sp.sel_count, md.partial_out,
                    md.partial_lse, md.rotation_signs, self.scale, fmt.bits, fmt.group_size,
                    fmt.block_size, sp.reuse_splits, MIN_TILES_PER_SPLIT, sp.shared,
                    sp.selection_unit, sp.sel_cache_tiles,
                )
            elif role == config.SELECT:  # dense, and the positions for the reuse layers
                ops.decode_select(
                    output[:nd], query[:nd], kv_cache, md.decode_block_table,
                    md.decode_seq_lens, md.partial_out, md.partial_lse, md.rotation_signs,
                    self.scale, fmt.bits, fmt.group_size, fmt.block_size, md.num_splits,
                    MIN_TILES_PER_SPLIT, sp.sel_positions, sp.sel_count, sp.keys,
                    sp.key_offsets, sp.min_seq_len, sp.shared, sp.selection_unit,
                    sp.sel_cache_tiles,
                )
            else:  # with decode_query_start, the rows are the requests' query tokens
                # and otherwise the rows themselves: not num_decode_tokens, which is
                # below them where vLLM pads a graph batch with requests of no tokens
                nt = nd if md.decode_query_start is None else md.num_decode_tokens
                ops.decode(
                    output[:nt], query[:nt], kv_cache, md.decode_block_table,
                    md.decode_seq_lens, md.partial_out, md.partial_lse, md.rotation_signs,
                    self.scale, fmt.bits, fmt.group_size, fmt.block_size, md.num_splits,
                    MIN_TILES_PER_SPLIT, md.decode_query_start, md.decode_max_query_len,
                )
        if md.prefill is not None:
            self._prefill(query, kv_cache, md, output)
        return output

    def _forward_channel_k(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        kv_cache: torch.Tensor, md: BitDecodeMetadata, output: torch.Tensor,
    ) -> torch.Tensor:
        """Per-channel K mode (docs/per-channel-k-design.md, sections 5, 7, 8): gather the
        prefill rows' exact keys and values of their own pages, write the step (V per
        token, filled pages per channel, the newest page's K and V into the residual),
        then decode and the two-part prefill."""
        kc = md.channel_k
        fmt = md.page_format
        start = md.num_decode_tokens
        # each group's own rows, read before the write replaces the residual's
        own_kv = [kc_prefill.gather_own_kv(
            g.plan, self.residual, kc.row_slot_host,
            key[start + g.token_begin : start + g.token_end],
            value[start + g.token_begin : start + g.token_end]) for g in kc.prefill_groups]
        ops.write_tokens_kc(key, value, md.slot_mapping, kc.query_start_loc, kc.seq_lens,
                            kc.row_slot, kv_cache, self.residual, fmt.bits, fmt.group_size,
                            fmt.block_size, self.bitdecode.k_param_bits)
        if md.num_decodes > 0:
            nd = md.num_decodes
            ops.decode_kc(output[:nd], query[:nd], kv_cache, self.residual,
                          md.decode_block_table, md.decode_seq_lens, kc.row_slot,
                          md.partial_out, md.partial_lse, self.scale, fmt.bits,
                          fmt.group_size, fmt.block_size, md.num_splits, MIN_TILES_PER_SPLIT,
                          self.bitdecode.k_param_bits)
        pf = md.prefill
        for g, own in zip(kc.prefill_groups, own_kv, strict=True):
            # dequantized pages, then a scratch page per segment (run_kc_prefill)
            k_ws, v_ws = self._workspace_rows(g.plan.pool_rows, query)
            ops.dequantize_pages_kc(kv_cache, pf.block_table[g.req_begin : g.req_end],
                                    pf.seq_lens[g.req_begin : g.req_end], g.workspace_start,
                                    k_ws, v_ws, fmt.bits, fmt.group_size, fmt.block_size,
                                    g.max_seq_len, self.bitdecode.k_param_bits)
            tokens = slice(start + g.token_begin, start + g.token_end)
            kc_prefill.run_kc_prefill(g.plan, query[tokens], own, k_ws, v_ws, self.scale,
                                      self._fa_closed, self._fa_near, _merge_attn_states,
                                      output[tokens])
        return output

    def _fa_paged(self, q, k_pages, v_pages, cu_q, seqused_k, block_table, max_q, max_k,
                  scale, causal: bool):
        return self._flash_attn_varlen(
            q=q, k=k_pages, v=v_pages, max_seqlen_q=max_q, cu_seqlens_q=cu_q,
            max_seqlen_k=max_k, seqused_k=seqused_k, block_table=block_table,
            softmax_scale=scale, causal=causal, return_softmax_lse=True,
            fa_version=self.fa_version,
        )

    def _fa_closed(self, *args):
        """Non-causal varlen attention over paged K/V (a group's closed pages)."""
        return self._fa_paged(*args, causal=False)

    def _fa_near(self, *args):
        """Causal varlen attention over paged K/V, the last query aligned with the last
        key (a segment's pages from its group's first one, then its own page)."""
        return self._fa_paged(*args, causal=True)

    def _sparse_role(self, layer: torch.nn.Module, sp) -> str:
        """This layer's role in sparse mode, from its index in the model (resolved once)."""
        if self._role is None:
            self._role = sp.plan.role(config.layer_index(layer.layer_name))
        return self._role

    def _prefill(
        self, query: torch.Tensor, kv_cache: torch.Tensor, md: BitDecodeMetadata,
        output: torch.Tensor,
    ) -> None:
        """Prefill chunks attend to their whole context read back from the pages, one
        group of requests at a time through the bounded workspace; a context longer than
        the workspace window by window, the windows' results merged by LSE."""
        fmt = md.page_format
        start = md.num_decode_tokens
        q = query[start : md.num_actual_tokens]
        scale = self.scale
        if md.rotation_signs is not None:  # K was stored rotated: rotate Q the same way
            rotation = self._prefill_rotation(q)
            q, scale = q @ rotation, scale * self._prefill_rotation_gain
        merged: tuple[torch.Tensor, torch.Tensor] | None = None  # the windows so far
        for g in md.prefill.groups:
            k, v = self._dequantize_group(kv_cache, g, fmt, query)
            out = output[start + g.token_begin : start + g.token_end]
            last = g.window == g.windows - 1
            result = self._attend_group(q[g.token_begin : g.token_end], k, v, g, scale, out)
            if g.windows == 1:
                continue
            if merged is None:  # the context's first window
                merged = result
                continue
            # the last merge writes the output; the ones before it, each rounded to the
            # model dtype once as FlashAttention's own output is, keep their LSE
            acc = out if last else torch.empty_like(out)
            acc_lse = None if last else torch.empty_like(result[1])
            _merge_attn_states(acc, *merged, *result, acc_lse)
            merged = None if last else (acc, acc_lse)

    def _dequantize_group(self, kv_cache: torch.Tensor, g: PrefillGroup, fmt: PageFormat,
                          like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefill group's context (one window of it), read back from the pages into
        the workspace: K and V, [g.total_kv_tokens, kv_heads, D] each."""
        k, v = self._workspace_rows(g.total_kv_tokens, like)
        ops.dequantize_pages(
            kv_cache, g.block_table, g.seq_lens, g.kv_start_loc, k, v,
            fmt.bits, fmt.group_size, fmt.block_size, g.max_seq_len,
        )
        return k, v

    def _attend_group(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      g: PrefillGroup, scale: float, out: torch.Tensor
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """FlashAttention over a group's dequantized context: written into ``out`` when
        the context is one window; else returned with its LSE, for the merge (only the
        last window is causal: the earlier ones lie wholly before the chunk)."""
        return self._flash_attn_varlen(
            q=q, k=k, v=v,
            max_seqlen_q=g.max_query_len, cu_seqlens_q=g.query_start_loc,
            max_seqlen_k=g.max_seq_len, cu_seqlens_k=g.kv_start_loc,
            softmax_scale=scale, causal=g.window == g.windows - 1,
            out=out if g.windows == 1 else None,
            return_softmax_lse=g.windows > 1, fa_version=self.fa_version,
        )

    def _workspace_rows(self, rows: int, like: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of ``rows`` rows of the shared prefill workspace (made here when
        the engine gave none, as in unit tests)."""
        ws = self.prefill_workspace
        if ws is None:
            ws = torch.empty((2, rows, self.num_kv_heads, self.head_size), dtype=like.dtype,
                             device=like.device)
        if rows > ws.shape[1]:
            raise RuntimeError(f"BITDECODE prefill group needs {rows} workspace rows, "
                               f"the workspace has {ws.shape[1]}")
        return ws[0, :rows], ws[1, :rows]

    def _prefill_rotation(self, like: torch.Tensor) -> torch.Tensor:
        """K's rotation for a prefill's Q as one GEMM in the model dtype: the signed
        Hadamard matrix, whose entries are +-1, times 2^-ceil(log2(sqrt(D))) (1/16 at
        D = 128), so exact in bf16 and fp16 and never larger than the orthonormal
        rotation's output; the GEMM sums in float32 and rounds once. What it leaves out
        of 1/sqrt(D) goes into the softmax scale (_prefill_rotation_gain). Until
        2026-12-02 this was a float32 product with the orthonormal matrix: Q converted
        to float32 and back around a float32 GEMM, in every layer."""
        if self._rotation is None or self._rotation.device != like.device \
                or self._rotation.dtype != like.dtype:
            power = 2.0 ** -math.ceil(math.log2(math.sqrt(self.head_size)))
            self._rotation = (rotation_matrix(self.head_size).sign() * power).to(
                device=like.device, dtype=like.dtype)
            self._prefill_rotation_gain = 1.0 / (power * math.sqrt(self.head_size))
        return self._rotation


def _merge_attn_states(out, prefix_out, prefix_lse, suffix_out, suffix_lse,
                       out_lse=None) -> None:
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    merge_attn_states(out, prefix_out, prefix_lse, suffix_out, suffix_lse, out_lse)


def _block_size(kv_cache: torch.Tensor, cfg: config.BitDecodeConfig, head_size: int) -> int:
    """Tokens per page, recovered from the cache's head-region size."""
    return cfg.block_size_of(head_size, kv_cache.shape[-1])


_SIGNS: dict[torch.device, torch.Tensor] = {}


def _signs(cfg: config.BitDecodeConfig, device: torch.device, head_size: int):
    if not cfg.rotate_k:
        return None
    if device not in _SIGNS:
        from vllm_bitdecode.page_format import rotation_signs

        _SIGNS[device] = rotation_signs(head_size).to(device)
    return _SIGNS[device]
