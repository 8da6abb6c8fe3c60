"""vllm-bitdecode: a vLLM attention backend over 4-bit / 2-bit paged KV caches.

vLLM calls :func:`register` (entry point ``vllm.general_plugins``) in every process,
possibly several times; it is idempotent. Nothing heavy is imported here.
"""

from __future__ import annotations

__version__ = "0.1.0"

BACKEND_NAME = "BITDECODE"
BACKEND_PATH = "vllm_bitdecode.backend.backend.BitDecodeAttentionBackend"


def register() -> None:
    """Make ``--attention-backend BITDECODE`` and ``attention_backend="BITDECODE"`` work."""
    from vllm_bitdecode import _registration

    _registration.register_backend_enum(BACKEND_NAME, BACKEND_PATH)
    _registration.patch_kv_cache_spec()
    _registration.patch_cli_help()
    _registration.patch_engine_config()
    _registration.patch_allowed_token_mask_swap()
    _registration.patch_layer_backend_check()
    _registration.patch_forced_preemption_report()
