"""Every bad ``bitdecode`` setting and unsupported model property fails at start-up (#8).

One table, run through the start-up path that ``vllm serve`` takes, on the CPU:

1. **config**: the ``vllm serve`` flags of the row go through vLLM's own parser
   (``EngineArgs.add_cli_args``, ``from_cli_args``) and ``create_engine_config``;
2. **model init**: the first attention layer(s) of the model are built the way the model's
   code builds them (vLLM's ``Attention``, ``CrossAttention``, ``EncoderOnlyAttention`` and
   ``MLAAttention`` classes, with the arguments the Llama / Whisper / BERT / DeepSeek-V2
   code passes), under ``set_current_vllm_config`` and the model dtype. Inside, vLLM's
   selector runs the platform's ``get_attn_backend_cls``, which calls
   ``BitDecodeAttentionBackend.validate_configuration`` (stage **selector**); then vLLM's
   layer code (stage **layer**) and ``BitDecodeAttentionImpl.__init__`` (stage **impl**:
   ``check_model`` and ``check_vllm_config``) run;
3. **block_size**: ``Platform.update_block_size_for_backend`` (which calls the backend's
   ``get_preferred_block_size``; vLLM runs it after the weights are loaded);
4. **kv_cache_spec**: each layer's ``get_kv_cache_spec`` (the plugin's patched one).

Each row asserts the exception type, that its message is one line, the words that name
the problem, and the stage that raised it (so the table also documents where each check
lives). Everything the table rejects is rejected during model init, before the KV cache
exists; the GPU-memory half of the issue's requirement ("no GPU memory left allocated")
needs a GPU and is not checked here.

The platform is a stand-in for vLLM's ``CudaPlatform``, whose module cannot be imported
without libcuda: it reports the row's device capability, and its ``get_attn_backend_cls``
is the selected-backend branch of ``CudaPlatform.get_attn_backend_cls`` (the installed
source is checked to still have that branch and its message).

Parsing of the settings alone is tested in tests/cpu/test_config.py (``BAD_SETTINGS``,
``BAD_SPARSE``, ``BAD_MODELS``: more values per setting). ``BAD_SETTINGS`` and
``BAD_SPARSE`` are reused here as they are, through the whole start-up path, rather than
copied. ``validate_configuration`` alone is tested in
tests/cpu/test_registration.py.

Known gaps are rows marked ``xfail(strict=True)``: start-ups that should fail and do not.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import vllm.platforms
from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

import vllm_bitdecode
from vllm_bitdecode import config as bd_config
from vllm_bitdecode.backend.spec import BitDecodeAttentionSpec
from vllm_bitdecode.testing.model_dir import TINY_LLAMA

from . import test_config

BAD_SETTINGS = test_config.BAD_SETTINGS
BAD_SECTION_NAMES = test_config.BAD_SECTION_NAMES
# the nested sparse section's bad values (issue #6), where test_config has them
BAD_SPARSE = getattr(test_config, "BAD_SPARSE", [])

# ---------------------------------------------------------------- the models

_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, **TINY_LLAMA,
}
MODELS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    # a sliding window over every layer (as Mistral-7B-v0.1's config.json has it): vLLM
    # copies it into CacheConfig.sliding_window, and each Attention layer takes it from there
    # (MistralForCausalLM itself cannot be inspected by vLLM without CUDA)
    "llama-sliding": {**_LLAMA, "sliding_window": 4096},
    "deepseek_v2": {  # MLA (use_mla is true for this config)
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 256,
        "num_attention_heads": 8, "num_key_value_heads": 8, "num_hidden_layers": 2,
        "vocab_size": 32000, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16", "rope_theta": 10000.0,
    },
    "whisper": {  # encoder-decoder, d=128 heads
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
        "d_model": 512, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
        "encoder_layers": 1, "decoder_layers": 1, "vocab_size": 51865, "num_mel_bins": 80,
        "max_source_positions": 1500, "max_target_positions": 448,
        "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024, "torch_dtype": "float16",
    },
    "mamba": {  # attention-free: vLLM reports head size 0 and no KV heads
        "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 256,
        "state_size": 16, "num_hidden_layers": 2, "vocab_size": 32000, "intermediate_size": 512,
        "torch_dtype": "bfloat16",
    },
    "bert": {  # encoder-only (a pooling model), d=128 heads
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 512,
        "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 1024,
        "vocab_size": 30522, "max_position_embeddings": 512, "torch_dtype": "float16",
    },
}
MAX_MODEL_LEN = {"whisper": 448, "bert": 512}

# ---------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Row:
    flags: tuple[str, ...] = ()
    """``vllm serve`` flags besides MODEL, --attention-backend BITDECODE and
    --load-format dummy."""
    model: str = "llama"
    config: tuple[tuple[str, Any], ...] = ()
    """config.json overrides."""
    layer_kwargs: tuple[tuple[str, Any], ...] = ()
    """Extra arguments of the model's ``Attention(...)`` call (what some models pass)."""
    capability: tuple[int, int] = (9, 0)
    platform: str = "cuda"
    env: tuple[tuple[str, str], ...] = ()
    error: type[BaseException] | None = None
    """None: start-up passes every stage (a control row)."""
    stage: str | None = None
    words: tuple[str, ...] = ()
    spec: tuple[int, int, int] = (4, 128, 16)
    """Control rows: (bits, group_size, block_size) of the KV-cache spec."""


def _cfg(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(kw.items())


def _additional(settings: Any) -> tuple[str, ...]:
    return ("--additional-config", json.dumps({"bitdecode": settings}))


BDE = bd_config.BitDecodeConfigError

# an llm-compressor FP8 checkpoint's quantization_config, KV cache included
COMPRESSED_TENSORS_FP8_KV = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "quantization_status": "compressed", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False,
                    "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                              "dynamic": True, "symmetric": True}}},
    "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor",
                        "dynamic": False, "symmetric": True}}

ROWS: dict[str, Row] = {
    # ---- controls: the harness lets a good start-up through every stage
    "ok/llama-bf16": Row(),
    "ok/fp16-2bit-g64-block64": Row(flags=("--dtype", "float16", "--block-size", "64",
                                           *_additional({"bits": 2, "group_size": 64})),
                                    spec=(2, 64, 64)),
    "ok/kv-cache-dtype-bfloat16": Row(flags=("--kv-cache-dtype", "bfloat16")),
    "ok/kv-offloading": Row(flags=("--kv-offloading-size", "4",
                                   "--disable-hybrid-kv-cache-manager")),
    # a model whose every layer has the window, served with full attention instead
    "ok/disable-sliding-window": Row(model="llama-sliding", flags=("--disable-sliding-window",)),
    "ok/kv-transfer-config-offloading": Row(flags=(
        "--kv-transfer-config", '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}')),
    # ---- bitdecode settings: one row per key with a wrong type (whatever keys the
    # dataclass has, see test_every_setting_rejects_a_wrong_type), the values of
    # test_config.BAD_SETTINGS in test_bad_settings_fail_at_startup
    # ---- model properties: checked when vLLM builds its config (EngineArgs.
    # create_engine_config, in the process the user started), before any worker exists
    "head-size-64": Row(config=_cfg(head_dim=64), error=BDE, stage="config",
                        words=("head size 64", "BITDECODE", "128")),
    "head-size-256": Row(config=_cfg(head_dim=256), error=BDE, stage="config",
                         words=("head size 256", "BITDECODE", "128")),
    "dtype-float32": Row(flags=("--dtype", "float32"), error=BDE, stage="config",
                         words=("float32", "BITDECODE", "--dtype bfloat16")),
    "kv-cache-dtype-float16-bf16-model": Row(
        flags=("--kv-cache-dtype", "float16"), error=BDE, stage="config",
        words=("--kv-cache-dtype float16", "bfloat16 model", "--kv-cache-dtype auto")),
    "kv-cache-dtype-fp8": Row(flags=("--kv-cache-dtype", "fp8"), error=BDE, stage="config",
                              words=("--kv-cache-dtype fp8", "BITDECODE", "bits")),
    "kv-cache-dtype-fp8_e5m2": Row(flags=("--kv-cache-dtype", "fp8_e5m2"), error=BDE,
                                   stage="config",
                                   words=("--kv-cache-dtype fp8_e5m2", "BITDECODE")),
    "block-size-8": Row(flags=("--block-size", "8"), error=BDE, stage="config",
                        words=("--block-size 8", "BITDECODE", "16")),
    "block-size-24": Row(flags=("--block-size", "24"), error=BDE, stage="config",
                         words=("--block-size 24", "BITDECODE", "16")),
    "block-size-256": Row(flags=("--block-size", "256"), error=BDE, stage="config",
                          words=("--block-size 256", "supported")),
    "mla": Row(model="deepseek_v2", error=BDE, stage="config",
               words=("MLA", "BITDECODE")),
    "sliding-window-all-layers": Row(model="llama-sliding", error=BDE, stage="config",
                                     words=("sliding-window", "4096",
                                            "--disable-sliding-window")),
    # a head size that cannot be served is said first: --disable-sliding-window would not
    # help Gemma's 256
    "sliding-window-head-size-256": Row(model="llama-sliding", config=_cfg(head_dim=256),
                                        error=BDE, stage="config",
                                        words=("head size 256", "BITDECODE")),
    "attention-free": Row(model="mamba", error=BDE, stage="config",
                          words=("attention-free", "BITDECODE")),
    "sliding-window-interleaved": Row(
        config=_cfg(sliding_window=512, layer_types=["sliding_attention", "full_attention"]),
        error=BDE, stage="config", words=("sliding-window", "512")),
    "encoder-decoder": Row(model="whisper", error=BDE, stage="config",
                           words=("encoder-decoder",)),
    # KV connectors: only vLLM's CPU offloading connector (--kv-offloading-size turns it
    # on), with per-token K; the others would fail after the cache is allocated (NIXL's
    # probe asks for a cache shape at head size 1) or move pages nobody tested
    # vLLM 0.20 keeps its hybrid KV-cache manager on for --kv-offloading-size (not for
    # --kv-transfer-config), and the connector then refuses to start after the cache is
    # allocated, whatever the backend
    "kv-offloading-hybrid-manager": Row(flags=("--kv-offloading-size", "4"), error=BDE,
                                        stage="config",
                                        words=("--disable-hybrid-kv-cache-manager",)),
    "kv-offloading-channel-k": Row(flags=("--kv-offloading-size", "4",
                                          "--disable-hybrid-kv-cache-manager",
                                          *_additional({"k_mode": "channel"})),
                                   error=BDE, stage="config",
                                   words=("k_mode='channel'", "--kv-offloading-size")),
    "kv-offloading-lmcache": Row(flags=("--kv-offloading-size", "4",
                                        "--disable-hybrid-kv-cache-manager",
                                        "--kv-offloading-backend", "lmcache"),
                                 error=BDE, stage="config",
                                 words=("LMCacheConnectorV1", "--kv-offloading-size")),
    "kv-offloading-simple": Row(flags=("--kv-offloading-size", "4",
                                       "--disable-hybrid-kv-cache-manager"),
                                env=(("VLLM_USE_SIMPLE_KV_OFFLOAD", "1"),), error=BDE,
                                stage="config",
                                words=("SimpleCPUOffloadConnector",
                                       "VLLM_USE_SIMPLE_KV_OFFLOAD")),
    "kv-transfer-config-nixl": Row(
        flags=("--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'),
        error=BDE, stage="config", words=("NixlConnector", "OffloadingConnector")),
    # llm-compressor's FP8-KV checkpoints: the quantization config's kv_cache_scheme
    # makes vLLM store fp8 KV whatever --kv-cache-dtype says (vLLM 0.20's selector would
    # fail later, saying only "kv_cache_dtype not supported")
    "compressed-tensors-kv-cache-scheme": Row(
        config=_cfg(quantization_config=COMPRESSED_TENSORS_FP8_KV), error=BDE, stage="config",
        words=("kv_cache_scheme", "fp8 whatever --kv-cache-dtype says")),
    "compressed-tensors-kv-cache-scheme-bf16": Row(
        config=_cfg(quantization_config=COMPRESSED_TENSORS_FP8_KV),
        flags=("--kv-cache-dtype", "bfloat16"), error=BDE, stage="config",
        words=("kv_cache_scheme",)),
    # context parallelism interleaves pages across ranks (vLLM's own check is an assert
    # after the weights load); decode context parallelism needs tensor parallelism, whose
    # config vLLM cannot build without CUDA ops: test_config checks that refusal
    "prefill-context-parallel": Row(flags=("--prefill-context-parallel-size", "2"),
                                    error=BDE, stage="config",
                                    words=("context parallelism",
                                           "--prefill-context-parallel-size 2")),

    "chunked-local-attention": Row(config=_cfg(attention_chunk_size=8192), error=BDE,
                                   stage="config",
                                   words=("chunked local attention", "8192")),  # Llama 4
    # hybrid models (Jamba, Granite-4.0-H) are refused in the same place, but vLLM cannot
    # inspect their model classes without CUDA: test_config checks that refusal
    "encoder-only": Row(model="bert", error=ValueError, stage="selector",
                        words=("BITDECODE", "ENCODER_ONLY not supported")),
    "gqa-32-per-kv-head": Row(config=_cfg(num_attention_heads=64, num_key_value_heads=2,
                                          hidden_size=8192),
                              error=BDE, stage="config", words=("KV heads", "16")),
    "gqa-17-per-kv-head": Row(config=_cfg(num_attention_heads=17, num_key_value_heads=1,
                                          hidden_size=2176),
                              error=BDE, stage="config", words=("KV heads", "16")),
    # properties that the model code passes to Attention(...)
    "alibi": Row(layer_kwargs=_cfg(alibi_slopes=[0.5] * 8), error=BDE, stage="impl",
                 words=("ALiBi",)),  # Bloom, MPT, Baichuan-13B
    "alibi-sqrt": Row(layer_kwargs=_cfg(use_alibi_sqrt=True), error=ValueError, stage="layer",
                      words=("use_alibi_sqrt", "BITDECODE")),
    "logits-soft-cap": Row(layer_kwargs=_cfg(logits_soft_cap=50.0), error=BDE, stage="impl",
                           words=("soft-capping",)),  # Gemma-2, Grok
    "attention-sinks": Row(layer_kwargs=_cfg(sinks="zeros"), error=ValueError,
                           stage="selector",
                           words=("BITDECODE", "attention sinks not supported")),  # gpt-oss
    "kv-sharing": Row(layer_kwargs=_cfg(kv_sharing_target_layer_name="model.layers.0.attn"),
                      error=BDE, stage="impl", words=("KV sharing",)),  # Gemma-3n
    "batch-invariant": Row(env=(("VLLM_BATCH_INVARIANT", "1"),), error=ValueError,
                           stage="selector",
                           words=("BITDECODE", "batch invariance not supported")),
    # the kernels are built for sm_90a
    "gpu-sm80": Row(capability=(8, 0), error=ValueError, stage="selector",
                    words=("BITDECODE", "compute capability not supported")),
    "gpu-sm89": Row(capability=(8, 9), error=ValueError, stage="selector",
                    words=("BITDECODE", "compute capability not supported")),
    "gpu-sm100": Row(capability=(10, 0), error=ValueError, stage="selector",
                     words=("BITDECODE", "compute capability not supported")),
    "gpu-sm120": Row(capability=(12, 0), error=ValueError, stage="selector",
                     words=("BITDECODE", "compute capability not supported")),
    # other platforms: refused before vLLM's selector, which on vLLM's CPU build would
    # pick its own backend for every layer (with an info line) instead
    "rocm-mi300": Row(platform="rocm", capability=(9, 4), error=BDE, stage="config",
                      words=("BITDECODE", "NVIDIA", "ROCm platform")),
    "rocm-mi200": Row(platform="rocm", capability=(9, 0), error=BDE, stage="config",
                      words=("BITDECODE", "NVIDIA", "ROCm platform")),
    "cpu-platform": Row(platform="cpu", error=BDE, stage="config",
                        words=("BITDECODE", "NVIDIA", "CPU platform")),
    "value-head-size": Row(layer_kwargs=_cfg(head_size_v=64), error=BDE,
                           words=("V head size 64", "K head size 128")),
    # a model that passes its own backend to Attention (MiMo-V2-Flash and openPangu pass
    # FlashAttention variants)
    "backend-chosen-by-model": Row(layer_kwargs=_cfg(attn_backend="triton"), error=BDE,
                                   stage="layer",
                                   words=("model.layers.0.self_attn.attn",
                                          "TRITON_ATTN", "BITDECODE", "model type")),
    # ... vLLM's own wrappers of the selected backend keep its name (static sinks)
    "backend-wrapped-by-vllm": Row(layer_kwargs=_cfg(attn_backend="wrapped-bitdecode")),
}

# Start-ups that should fail and do not: rows marked xfail(strict=True) with the reason.
GAPS: dict[str, str] = {}


def _params(rows: dict[str, Row]) -> list:
    out = []
    for name, row in rows.items():
        marks = [pytest.mark.xfail(strict=True, reason=GAPS[name])] if name in GAPS else []
        out.append(pytest.param(row, id=name, marks=marks))
    return out


# ---------------------------------------------------------------- the platform stand-in


class _StandInPlatform(Platform):
    """vLLM's CudaPlatform (or RocmPlatform), as far as start-up asks of it."""

    _enum = PlatformEnum.CUDA
    device_name = "cuda"
    device_type = "cuda"
    dispatch_key = "CUDA"
    capability = DeviceCapability(9, 0)

    @classmethod
    def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
        return cls.capability

    @classmethod
    def device_count(cls) -> int:
        return 8  # a node of 8 GPUs: rows with a parallel size pass the world-size check

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        return True  # as CudaPlatform's and RocmPlatform's (vLLM 0.20)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        # the selected-backend branch of CudaPlatform.get_attn_backend_cls (vLLM 0.20);
        # RocmPlatform's is the same. test_stand_in_matches_cuda_platform checks the source.
        device_capability = cls.get_device_capability()
        assert selected_backend is not None, "the rows always select BITDECODE"
        try:
            backend_class = selected_backend.get_class()
            invalid_reasons = backend_class.validate_configuration(
                device_capability=device_capability,
                **attn_selector_config._asdict(),
            )
        except ImportError:
            invalid_reasons = ["ImportError"]
        if invalid_reasons:
            raise ValueError(
                f"Selected backend {selected_backend} is not valid for "
                f"this configuration. Reason: {invalid_reasons}"
            )
        return selected_backend.get_path()


def _swap_platform(old: object, new: object) -> None:
    """Point ``vllm.platforms.current_platform`` and every module that imported it at
    ``new`` (modules bind it at import time)."""
    vllm.platforms.current_platform = new
    for mod in list(sys.modules.values()):
        if mod is not vllm.platforms and getattr(mod, "current_platform", None) is old:
            mod.current_platform = new


@pytest.fixture(scope="module")
def platform():
    """The stand-in platform, installed for this module, then the original restored
    (also in modules first imported while the stand-in was installed)."""
    vllm_bitdecode.register()
    # w8a8_utils computes CUTLASS_FP8_SUPPORTED on import: with the stand-in's capability
    # it would call a CUDA op, which this machine has not loaded (the quantized
    # checkpoint's rows import it first when the file runs alone)
    from vllm.engine.arg_utils import EngineArgs  # noqa: F401  (bind before the swap)
    from vllm.model_executor.layers.attention import attention  # noqa: F401
    from vllm.model_executor.layers.quantization.utils import w8a8_utils  # noqa: F401

    original = vllm.platforms.current_platform
    stand_in = _StandInPlatform()
    _swap_platform(original, stand_in)
    try:
        yield stand_in
    finally:
        _swap_platform(stand_in, original)


@pytest.fixture
def startup(platform, tmp_path, monkeypatch):
    """startup(row) -> (stage that raised, exception, []) or (None, None, KV-cache specs)."""
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends import fa_utils

    # BitDecodeAttentionImpl takes FlashAttention's entry point, which vLLM defines on
    # CUDA platforms only; a stub lets the control rows finish the impl on the CPU
    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", lambda **kw: None, raising=False)
    monkeypatch.setattr(bd_config, "_active", None)
    selector._cached_get_attn_backend.cache_clear()

    def run(row: Row):
        monkeypatch.setattr(type(platform), "capability", DeviceCapability(*row.capability))
        monkeypatch.setattr(type(platform), "_enum", PlatformEnum[row.platform.upper()])
        for key, value in row.env:
            monkeypatch.setenv(key, value)
        try:
            return _startup(row, tmp_path)
        finally:
            selector._cached_get_attn_backend.cache_clear()

    return run


def _model_dir(row: Row, tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({**MODELS[row.model], **dict(row.config)}))
    return path


def _engine_config(row: Row, model: Path, backend: str | None = "BITDECODE"):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm serve"))
    argv = ["--model", str(model), *(("--attention-backend", backend) if backend else ()),
            "--load-format", "dummy", "--skip-tokenizer-init",
            "--max-model-len", str(MAX_MODEL_LEN.get(row.model, 2048)), *row.flags]
    return EngineArgs.from_cli_args(parser.parse_args(argv)).create_engine_config()


def _build_layers(row: Row, vllm_config) -> list:
    """The first attention layer(s) of the row's model, as its vLLM code builds them."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.layers.attention.cross_attention import CrossAttention
    from vllm.model_executor.layers.attention.encoder_only_attention import (
        EncoderOnlyAttention,
    )
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention
    from vllm.v1.attention.backend import AttentionType

    mc, cache = vllm_config.model_config, vllm_config.cache_config
    hf = mc.hf_text_config
    heads = mc.get_num_attention_heads(vllm_config.parallel_config)
    kv_heads = mc.get_num_kv_heads(vllm_config.parallel_config)
    head_size = mc.get_head_size()
    scale = head_size**-0.5
    extra = dict(row.layer_kwargs)
    if extra.get("sinks") == "zeros":
        extra["sinks"] = torch.zeros(heads)
    if extra.get("attn_backend") == "triton":  # (FlashAttention's impl needs CUDA)
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

        extra["attn_backend"] = TritonAttentionBackend
    elif extra.get("attn_backend") == "wrapped-bitdecode":
        from vllm.v1.attention.backend import subclass_attention_backend

        from vllm_bitdecode.backend.backend import BitDecodeAttentionBackend

        extra["attn_backend"] = subclass_attention_backend(
            "Wrapped_", BitDecodeAttentionBackend,
            BitDecodeAttentionBackend.get_builder_cls())
    if row.model in ("llama", "llama-sliding"):  # LlamaAttention
        layer_types = getattr(hf, "layer_types", None)
        window = hf.sliding_window if layer_types and layer_types[0] == "sliding_attention" \
            else None
        return [Attention(heads, head_size, scale, num_kv_heads=kv_heads, cache_config=cache,
                          quant_config=None, per_layer_sliding_window=window,
                          attn_type=AttentionType.DECODER,
                          prefix="model.layers.0.self_attn.attn", **extra)]
    if row.model == "deepseek_v2":  # DeepseekV2MLAAttention -> MLAAttention
        # kv_b_proj is only stored before the backend is chosen
        return [MLAAttention(heads, hf.qk_nope_head_dim**-0.5, hf.qk_nope_head_dim,
                             hf.qk_rope_head_dim, hf.v_head_dim, hf.q_lora_rank,
                             hf.kv_lora_rank, kv_b_proj=None, cache_config=cache,
                             prefix="model.layers.0.self_attn.mla_attn")]
    if row.model == "whisper":  # WhisperDecoderLayer: self-attention, then cross-attention
        self_attn = Attention(heads, head_size, scale, num_kv_heads=heads, cache_config=cache,
                              quant_config=None, prefix="model.decoder.layers.0.self_attn.attn",
                              attn_type=AttentionType.DECODER)
        cross = CrossAttention(heads, head_size, scale, num_kv_heads=heads, cache_config=cache,
                               quant_config=None,
                               prefix="model.decoder.layers.0.encoder_attn.attn",
                               attn_type=AttentionType.ENCODER_DECODER)
        return [self_attn, cross]
    if row.model == "bert":  # BertSelfAttention
        return [EncoderOnlyAttention(num_heads=heads, head_size=head_size, scale=scale,
                                     num_kv_heads=kv_heads, cache_config=cache,
                                     quant_config=None,
                                     prefix="encoder.layer.0.attention.self.attn")]
    raise AssertionError(row.model)


def _model_init_stage(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if any(f.name == "get_attn_backend_cls" for f in frames):
        return "selector"
    if any(f.filename.endswith("vllm_bitdecode/backend/impl.py") for f in frames):
        return "impl"
    return "layer"


def _startup(row: Row, tmp_path: Path):
    from vllm.config import set_current_vllm_config
    from vllm.utils.torch_utils import set_default_torch_dtype

    try:
        vllm_config = _engine_config(row, _model_dir(row, tmp_path))
    except Exception as exc:
        return "config", exc, []
    layers: list = []
    with set_current_vllm_config(vllm_config), \
            set_default_torch_dtype(vllm_config.model_config.dtype):
        try:
            layers = _build_layers(row, vllm_config)
        except Exception as exc:
            return _model_init_stage(exc), exc, []
    try:  # vLLM runs this in the worker after load_model
        type(vllm.platforms.current_platform).update_block_size_for_backend(vllm_config)
    except Exception as exc:
        return "block_size", exc, []
    try:
        specs = [layer.get_kv_cache_spec(vllm_config) for layer in layers]
    except Exception as exc:
        return "kv_cache_spec", exc, []
    return None, None, specs


def _assert_one_clear_line(exc: BaseException, words: tuple[str, ...]) -> None:
    msg = str(exc)
    assert msg.strip() and "\n" not in msg, f"not one line: {msg!r}"
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("row", _params(ROWS))
def test_startup(startup, row):
    stage, exc, specs = startup(row)
    if row.error is None:
        assert exc is None, f"control row failed at {stage}: {exc!r}"
        (spec,) = specs
        assert type(spec) is BitDecodeAttentionSpec, spec  # the packed page, not bf16's
        assert (spec.bits, spec.group_size, spec.block_size) == row.spec
        return
    assert exc is not None, f"start-up passed every stage; expected {row.error.__name__}"
    assert isinstance(exc, row.error), f"{stage}: {exc!r}"
    _assert_one_clear_line(exc, row.words)
    if row.stage is not None:
        assert stage == row.stage, f"raised at {stage}, expected {row.stage}: {exc}"


@pytest.mark.parametrize(("raw", "words"), BAD_SETTINGS + BAD_SECTION_NAMES)
def test_bad_settings_fail_at_startup(startup, raw, words):
    """test_config.BAD_SETTINGS and BAD_SECTION_NAMES, given as ``--additional-config``:
    rejected when vLLM builds its config, with test_config's words."""
    row = Row(flags=("--additional-config", json.dumps(raw)))
    stage, exc, _ = startup(row)
    assert isinstance(exc, BDE), f"{stage}: {exc!r}"
    assert stage == "config"
    _assert_one_clear_line(exc, tuple(words))


@pytest.mark.skipif(not BAD_SPARSE, reason="no sparse settings in this version")
@pytest.mark.parametrize(("raw", "words"), BAD_SPARSE)
def test_bad_sparse_settings_fail_at_startup(startup, raw, words):
    """test_config.BAD_SPARSE, given as ``--additional-config``, the same way."""
    stage, exc, _ = startup(Row(flags=_additional({"sparse": raw})))
    assert isinstance(exc, BDE), f"{stage}: {exc!r}"
    assert stage == "config"
    _assert_one_clear_line(exc, tuple(words))


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(bd_config.BitDecodeConfig)])
def test_every_setting_rejects_a_wrong_type(startup, key):
    """Every key of the ``bitdecode`` section (whatever keys BitDecodeConfig has) rejects a
    value of the wrong type at start-up, naming the key."""
    row = Row(flags=_additional({key: ["not", "a value"]}))
    stage, exc, _ = startup(row)
    assert isinstance(exc, BDE), f"{key}: start-up {stage}: {exc!r}"
    assert stage == "config"
    _assert_one_clear_line(exc, (f"bitdecode.{key}",))


def test_stand_in_matches_cuda_platform():
    """The stand-in's get_attn_backend_cls is CudaPlatform's selected-backend branch, and
    like CudaPlatform it supports the hybrid KV-cache manager."""
    source = (Path(vllm.__file__).parent / "platforms" / "cuda.py").read_text()
    start = source.index("def get_attn_backend_cls(")
    body = source[start:source.index("def ", start + 10)]
    for line in ("if selected_backend is not None:",
                 "backend_class = selected_backend.get_class()",
                 "invalid_reasons = backend_class.validate_configuration(",
                 "device_capability=device_capability,",
                 "**attn_selector_config._asdict(),",
                 'f"Selected backend {selected_backend} is not valid for "',
                 'f"this configuration. Reason: {invalid_reasons}"'):
        assert line in body, f"CudaPlatform.get_attn_backend_cls changed: {line!r} missing"
    assert "def support_hybrid_kv_cache(cls) -> bool:\n        return True\n" in source, (
        "CudaPlatform.support_hybrid_kv_cache no longer returns True")


@pytest.mark.parametrize(("settings", "flags", "warned"), [
    ({"bits": 2}, (), True),
    ({"bits": 2, "k_mode": "channel", "group_size": 32}, ("--block-size", "128"), False),
    ({"bits": 4}, (), False),
])
def test_two_bit_k_per_token_is_warned_about_at_startup(startup, monkeypatch, settings,
                                                        flags, warned):
    """2-bit K per token starts, with one warning line that names the setting that kept
    the shipped model's quality; per-channel 2-bit and 4-bit start without it."""
    from vllm_bitdecode import _registration

    lines: list[str] = []
    monkeypatch.setattr(_registration, "_logger",
                        lambda: type("L", (), {"warning": staticmethod(lines.append)}))
    stage, exc, _ = startup(Row(flags=(*flags, *_additional(settings))))
    # (channel mode's layers make their residual on the GPU, past the config's stage)
    assert exc is None or (settings.get("k_mode") == "channel" and stage == "impl"), \
        f"{stage}: {exc!r}"
    assert len(lines) == int(warned)
    for line in lines:
        assert "\n" not in line and '"k_mode": "channel"' in line and "1579" in line


@pytest.mark.parametrize(("max_num_seqs", "warned"), [(1024, True), (64, False)])
def test_a_large_per_channel_residual_is_warned_about_at_startup(startup, monkeypatch,
                                                                 max_num_seqs, warned):
    """Per-channel K keeps every running request's newest page exact; with 128-token
    pages, 32 layers and 2 KV heads that is 4 MiB a request: 1025 slots (vLLM's default
    max_num_seqs on large GPUs, plus scratch) make 4.0 GiB and get one warning line that
    gives the size and the flag; 65 slots (260 MiB) start quietly."""
    from vllm_bitdecode import _registration

    lines: list[str] = []
    monkeypatch.setattr(_registration, "_logger",
                        lambda: type("L", (), {"warning": staticmethod(lines.append)}))
    settings = {"bits": 4, "k_mode": "channel", "group_size": 32}
    stage, exc, _ = startup(Row(
        flags=("--block-size", "128", "--max-num-seqs", str(max_num_seqs),
               *_additional(settings)),
        config=(("num_hidden_layers", 32),)))
    # (channel mode's layers make their residual on the GPU, past the config's stage)
    assert exc is None or stage == "impl", f"{stage}: {exc!r}"
    assert len(lines) == int(warned)
    for line in lines:
        assert "\n" not in line and "4.0 GiB" in line and "4 MiB a request" in line
        assert "max_num_seqs=1024" in line and "--max-num-seqs" in line


@pytest.mark.parametrize(("backend", "warned"), [
    (None, "left to vLLM"), ("FLASH_ATTN", "FLASH_ATTN"), ("BITDECODE", None)])
def test_settings_without_the_backend_are_warned_about(platform, tmp_path, monkeypatch,
                                                       backend, warned):
    """A `bitdecode` section with another backend (or vLLM's choice) would serve an
    unquantized cache without a word: start-up says, in one line, that the section is
    ignored and which flag uses it. With the backend, the section is simply used."""
    from vllm_bitdecode import _registration

    lines: list[str] = []
    monkeypatch.setattr(_registration, "_logger",
                        lambda: type("L", (), {"warning": staticmethod(lines.append)}))
    row = Row(flags=_additional({"bits": 4}))
    _engine_config(row, _model_dir(row, tmp_path), backend=backend)
    if warned is None:
        assert lines == []
        return
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line and "ignored" in line and warned in line
    assert "--attention-backend BITDECODE" in line


@pytest.mark.parametrize(("settings", "refused"), [
    ({"bits": 4, "k_mode": "channel", "group_size": 32}, True),
    ({"bits": 4}, False)])
def test_streaming_input_requests_are_refused_in_channel_mode(platform, tmp_path, monkeypatch,
                                                              settings, refused):
    """A streaming-input request (an async generator of inputs to ``AsyncLLM``) would hold
    a residual slot of per-channel K while it waits for its next chunk: once a
    channel-mode config is made, ``AsyncLLM`` refuses it with one line, a ValueError for
    that request (a 400 through the server), before it reaches the engine; per-token K
    passes it on. Run on the real ``AsyncLLM`` class, its method wrapped once."""
    import asyncio

    from vllm.v1.engine.async_llm import AsyncLLM

    reached = []

    async def add_streaming(self, request_id, *args, **kwargs):
        reached.append(request_id)
        return "queue"

    add_streaming.__qualname__ = "AsyncLLM._add_streaming_input_request"
    monkeypatch.setattr(AsyncLLM, "_add_streaming_input_request", add_streaming)
    row = Row(flags=("--block-size", "128", *_additional(settings)))
    vllm_config = _engine_config(row, _model_dir(row, tmp_path))
    _engine_config(row, _model_dir(row, tmp_path))  # a second engine: still one wrapper
    wrapped = AsyncLLM._add_streaming_input_request
    assert getattr(wrapped, "_bitdecode", False) is refused
    assert not refused or not getattr(wrapped.__wrapped__, "_bitdecode", False)
    engine = AsyncLLM.__new__(AsyncLLM)  # the attribute the wrapper reads, nothing else
    engine.vllm_config = vllm_config
    call = engine._add_streaming_input_request("session-1", None, None)
    if not refused:
        assert asyncio.run(call) == "queue" and reached == ["session-1"]
        return
    with pytest.raises(ValueError) as info:
        asyncio.run(call)
    message = str(info.value)
    assert "\n" not in message and "streaming-input" in message
    assert "k_mode='token'" in message and reached == []


DRAFTS = [
    # (speculative method, the draft's config.json overrides, tensor-parallel size, words;
    # () passes). EAGLE heads and DFlash drafts cannot be inspected by vLLM without CUDA,
    # nor tensor parallelism set up: test_config.py checks config.check_speculative on
    # those configurations alone.
    ("draft_model", {}, 1, ()),
    ("draft_model", {"head_dim": 64}, 1, ("the draft model", "head size 64")),
    # a bare sliding_window (many configs carry one unused) is no window for a draft's
    # layers, which take one only from layer_types: their cache config is the target's
    ("draft_model", {"sliding_window": 512}, 1, ()),
    ("draft_model", {"sliding_window": 512,
                     "layer_types": ["sliding_attention", "full_attention"]}, 1,
     ("the draft model", "1 sliding-window attention layers", "target model only")),
    ("draft_model", {"num_attention_heads": 32, "num_key_value_heads": 1,
                     "hidden_size": 4096}, 1, ("the draft model", "32 query heads over 1")),
]


@pytest.mark.parametrize(("method", "draft", "tp", "words"), DRAFTS,
                         ids=[f"{m}-{'-'.join(map(str, d.values())) or 'ok'}-tp{t}"
                              for m, d, t, _ in DRAFTS])
def test_the_draft_model_is_checked_before_the_weights_load(startup, tmp_path, method, draft,
                                                             tp, words):
    """A drafter's attention layers run through BITDECODE, but vLLM builds them after the
    target's weights are in GPU memory: its model is refused when vLLM builds the config,
    with a message that says it is the draft's. A drafter without attention (n-gram) is
    not looked at; a draft like the target passes the config stage."""
    path = tmp_path / "draft"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**MODELS["llama"], **draft}))
    spec = {"method": method, "model": str(path), "num_speculative_tokens": 2}
    row = Row(flags=("--speculative-config", json.dumps(spec), "--tensor-parallel-size",
                     str(tp)))
    stage, exc, _ = startup(row)
    if not words:
        assert stage != "config", f"a draft like the target refused: {exc!r}"
        return
    assert isinstance(exc, BDE), f"{stage}: {exc!r}"
    assert stage == "config"
    _assert_one_clear_line(exc, words)
