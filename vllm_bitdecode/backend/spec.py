"""The KV-cache spec BITDECODE reports to vLLM: the true bytes of a quantized page."""

from __future__ import annotations

from dataclasses import dataclass, replace

from typing_extensions import Self
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_bitdecode.page_format import PageFormat


@dataclass(frozen=True, kw_only=True)
class BitDecodeAttentionSpec(FullAttentionSpec):
    """A full-attention spec whose page is a BITDECODE page (dtype is uint8 bytes).

    vLLM divides the KV memory by ``page_size_bytes``, so reporting the packed size
    here is what turns 4-bit pages into ~3.8x more cache blocks.
    """

    bits: int = 4
    group_size: int = 128
    k_mode: str = "token"  # or "channel": K per channel over the page (issue #7)
    k_param_bits: int = 16  # channel mode: K (scale, zc) in fp16 (16) or e4m3 (8)

    @property
    def page_format(self) -> PageFormat:
        return PageFormat(self.head_size, self.bits, self.group_size, self.block_size)

    @property
    def real_page_size_bytes(self) -> int:
        if self.k_mode == "channel":
            from vllm_bitdecode.reference_kc import KCPageLayout

            return KCPageLayout(self.page_format, self.k_param_bits).page_bytes(
                self.num_kv_heads)
        return self.page_format.page_bytes(self.num_kv_heads)

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        merged = super().merge(specs)
        first = specs[0]
        key = (first.bits, first.group_size, first.k_mode, first.k_param_bits)
        if any((s.bits, s.group_size, s.k_mode, s.k_param_bits) != key for s in specs):
            raise ValueError("all BITDECODE layers of one KV-cache group need one page format")
        return replace(merged, bits=first.bits, group_size=first.group_size,
                       k_mode=first.k_mode, k_param_bits=first.k_param_bits)
