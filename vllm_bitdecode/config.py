"""The ``bitdecode`` settings, read once from vLLM's ``--additional-config``.

    vllm serve MODEL --attention-backend BITDECODE \\
        --additional-config '{"bitdecode": {"bits": 2, "group_size": 64}}'

Every problem is reported as :class:`BitDecodeConfigError` with one line naming the
setting, at start-up, before the KV cache or the model weights take GPU memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from vllm_bitdecode import page_format

CONFIG_KEY = "bitdecode"


class BitDecodeConfigError(ValueError):
    """A setting or a model property that BITDECODE cannot serve."""


@dataclasses.dataclass(frozen=True)
class BitDecodeConfig:
    bits: int = 4
    """Code width of K and V: 4 or 2."""
    group_size: int = 128
    """Channels sharing one scale and zero point (per token): 32, 64 or 128."""
    rotate_k: bool = True
    """Rotate K and Q per head by a fixed randomized Hadamard transform before
    quantizing, which spreads outlier channels over the head (see docs/)."""

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> BitDecodeConfig:
        raw = (additional_config or {}).get(CONFIG_KEY, {})
        if not isinstance(raw, Mapping):
            raise BitDecodeConfigError(
                f"additional_config['{CONFIG_KEY}'] must be a dict, got {type(raw).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BitDecodeConfigError(
                f"unknown {CONFIG_KEY} setting(s) {unknown}; valid settings are {sorted(known)}"
            )
        cfg = cls(**raw)
        cfg._check_values()
        return cfg

    def _check_values(self) -> None:
        def bad(name: str, allowed: object) -> BitDecodeConfigError:
            value = getattr(self, name)
            return BitDecodeConfigError(
                f"{CONFIG_KEY}.{name}={value!r} is not supported; allowed: {allowed}"
            )

        if type(self.bits) is not int or self.bits not in page_format.SUPPORTED_BITS:
            raise bad("bits", list(page_format.SUPPORTED_BITS))
        groups = page_format.SUPPORTED_GROUP_SIZES
        if type(self.group_size) is not int or self.group_size not in groups:
            raise bad("group_size", list(page_format.SUPPORTED_GROUP_SIZES))
        if not isinstance(self.rotate_k, bool):
            raise bad("rotate_k", [True, False])

    def page_format(self, head_size: int, block_size: int) -> page_format.PageFormat:
        return page_format.PageFormat(head_size, self.bits, self.group_size, block_size)


def check_model(
    *,
    head_size: int,
    dtype: torch.dtype,
    kv_cache_dtype: str | None,
    block_size: int | None,
    use_mla: bool = False,
    is_encoder_decoder: bool = False,
    sliding_window: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
) -> None:
    """Raise BitDecodeConfigError for a model or cache setting BITDECODE cannot serve."""
    if use_mla:
        raise BitDecodeConfigError("MLA models are not supported by BITDECODE (model type)")
    if is_encoder_decoder:
        raise BitDecodeConfigError(
            "encoder-decoder models are not supported by BITDECODE (model type)"
        )
    if sliding_window is not None:
        raise BitDecodeConfigError(
            f"sliding-window attention (window {sliding_window}) is not supported by BITDECODE"
        )
    if head_size not in page_format.SUPPORTED_HEAD_SIZES:
        raise BitDecodeConfigError(
            f"head size {head_size} is not supported by BITDECODE; supported: "
            f"{list(page_format.SUPPORTED_HEAD_SIZES)}"
        )
    if dtype not in page_format.SUPPORTED_DTYPES:
        raise BitDecodeConfigError(
            f"dtype {dtype} is not supported by BITDECODE; use --dtype bfloat16 or float16"
        )
    if kv_cache_dtype not in (None, "auto", "bfloat16", "float16"):
        raise BitDecodeConfigError(
            f"--kv-cache-dtype {kv_cache_dtype} cannot be combined with BITDECODE, which "
            "stores its own 4/2-bit pages; leave it 'auto' and set "
            f"--additional-config '{{\"{CONFIG_KEY}\": {{\"bits\": 4}}}}'"
        )
    if block_size is not None and block_size not in page_format.SUPPORTED_BLOCK_SIZES:
        raise BitDecodeConfigError(
            f"--block-size {block_size} is not supported by BITDECODE; supported: "
            f"{list(page_format.SUPPORTED_BLOCK_SIZES)}"
        )
    if num_heads is not None and num_kv_heads:
        if num_heads % num_kv_heads or num_heads // num_kv_heads > 16:
            raise BitDecodeConfigError(
                f"{num_heads} query heads over {num_kv_heads} KV heads: BITDECODE needs "
                "query heads per KV head to be a whole number of at most 16"
            )


def check_vllm_config(vllm_config: Any) -> BitDecodeConfig:
    """Validate everything BITDECODE needs from a VllmConfig; return the parsed settings."""
    cfg = BitDecodeConfig.from_additional_config(vllm_config.additional_config)
    model = vllm_config.model_config
    if model is None:
        return cfg
    parallel = vllm_config.parallel_config
    check_model(
        head_size=model.get_head_size(),
        dtype=model.dtype,
        kv_cache_dtype=vllm_config.cache_config.cache_dtype,
        block_size=vllm_config.cache_config.block_size
        if vllm_config.cache_config.user_specified_block_size
        else None,
        use_mla=model.use_mla,
        is_encoder_decoder=model.is_encoder_decoder,
        sliding_window=model.get_sliding_window(),
        num_heads=model.get_num_attention_heads(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
    )
    return cfg


# The settings of this process's engine. vLLM asks the backend for its cache shape
# through static methods that carry no config, so the impl records it here when the
# model's attention layers are built (one engine per process, as in vLLM's workers).
_active: BitDecodeConfig | None = None


def set_active(cfg: BitDecodeConfig) -> None:
    global _active
    _active = cfg


def get_active() -> BitDecodeConfig:
    if _active is None:
        raise BitDecodeConfigError("BITDECODE was not configured in this process")
    return _active
