"""vllm-bitdecode: a vLLM attention backend over 4-bit / 2-bit paged KV caches.

vLLM calls :func:`register` (entry point ``vllm.general_plugins``) in every process,
possibly several times; it is idempotent. Nothing heavy is imported here.
"""

from __future__ import annotations

__version__ = "0.1.0"

BACKEND_NAME = "BITDECODE"
BACKEND_PATH = "vllm_bitdecode.backend.backend.BitDecodeAttentionBackend"
VLLM_VERSION = "0.20.0"  # the one vLLM whose internals _registration wraps (setup.py pins it)


def register() -> None:
    """Make ``--attention-backend BITDECODE`` and ``attention_backend="BITDECODE"`` work.

    Under another vLLM version nothing is installed (one error line says so): the
    wrappers reach into vLLM's private classes, and vLLM runs this in every process of
    every engine, so one renamed method would break engines that never asked for
    BITDECODE. Those run as without the plugin; one that asks for BITDECODE fails in
    vLLM's own check of the backend name."""
    from vllm_bitdecode import _registration

    if not _registration.vllm_supported(VLLM_VERSION):
        return
    _registration.register_backend_enum(BACKEND_NAME, BACKEND_PATH)
    _registration.patch_kv_cache_spec()
    _registration.patch_cli_help()
    _registration.patch_engine_config()
    _registration.patch_allowed_token_mask_swap()
    _registration.patch_layer_backend_check()
    _registration.patch_forced_preemption_report()
