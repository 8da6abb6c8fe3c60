"""BitDecodeAttentionBackend: the static facts vLLM asks of an attention backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType

from vllm_bitdecode import config, page_format

if TYPE_CHECKING:
    from vllm_bitdecode.backend.impl import BitDecodeAttentionImpl
    from vllm_bitdecode.backend.metadata import BitDecodeMetadataBuilder

BACKEND_NAME = "BITDECODE"


class BitDecodeAttentionBackend(AttentionBackend):
    """Paged attention over 4-bit / 2-bit KV pages (see docs/page-format.md)."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False  # vLLM calls do_kv_cache_update first
    supported_dtypes: ClassVar[list[torch.dtype]] = list(page_format.SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "bfloat16", "float16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[BitDecodeAttentionImpl]:
        from vllm_bitdecode.backend.impl import BitDecodeAttentionImpl

        return BitDecodeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[BitDecodeMetadataBuilder]:
        from vllm_bitdecode.backend.metadata import BitDecodeMetadataBuilder

        return BitDecodeMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        return list(page_format.SUPPORTED_BLOCK_SIZES)

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        # K and V of a token live in the same page, so there is no leading 2.
        if head_size not in page_format.SUPPORTED_HEAD_SIZES:
            # vLLM's offloading connector asks for the shape at head size 256 only to
            # find the blocks' axis; no page of such a head exists (start-up refuses the
            # model's head size before any cache is allocated), so its size is 0.
            return (num_blocks, num_kv_heads, 0)
        region = _engine_settings().head_region_bytes(head_size, block_size)
        return (num_blocks, num_kv_heads, region)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        if include_num_layers_dimension:
            # (layers, blocks, heads, bytes) laid out blocks first: a block holds every
            # layer's page, the cross-layer layout the offloading connector asks for
            # (one copy per block); each layer sees pages 'layers' pages apart
            return (1, 0, 2, 3)
        return (0, 1, 2)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(page_format.SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        # the kernels are built for sm_90a (H100 / H200); ROCm reports 9.x too (MI200 as
        # 9.0, MI300 as 9.4), and those are not NVIDIA GPUs
        from vllm.platforms import current_platform

        return not current_platform.is_rocm() and (capability.major, capability.minor) == (9, 0)

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # vLLM calls this in every worker with the engine's config current, after the
        # model is loaded and before the KV cache is allocated. Model properties were
        # already checked when the attention layers were built (Impl.__init__); this is
        # where the settings are parsed and recorded for the static methods. The size
        # stays vLLM's default: channel K's residual and the prefill workspace were sized
        # from cache_config.block_size while the model loaded (per-channel-k-design.md, 9).
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is not None:
            config.set_active(config.check_vllm_config(vllm_config))
        return super().get_preferred_block_size(default_block_size)


def _engine_settings() -> config.BitDecodeConfig:
    """The settings of the engine asking, for the static methods, which get no config:
    those of the vLLM config current in this thread if it asks for BITDECODE (vLLM makes
    the engine's config current while a worker allocates its KV cache and its KV
    connector probes shapes: each engine gets its own page, even with several in one
    process), else the process's last recorded (``config.get_active``)."""
    from vllm.config import get_current_vllm_config_or_none

    from vllm_bitdecode._registration import bitdecode_settings

    settings = bitdecode_settings(get_current_vllm_config_or_none())
    return settings if settings is not None else config.get_active()
