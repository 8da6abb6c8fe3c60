"""Checks of ``vllm_bitdecode.config``: parsing ``--additional-config`` and the model checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_bitdecode.config import (
    BitDecodeConfig,
    BitDecodeConfigError,
    check_model,
    check_vllm_config,
)

# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("additional_config", [None, {}, {"bitdecode": {}}, {"other": {"x": 1}}])
def test_defaults(additional_config):
    cfg = BitDecodeConfig.from_additional_config(additional_config)
    assert (cfg.bits, cfg.group_size, cfg.rotate_k) == (4, 128, True)


@pytest.mark.parametrize("rotate_k", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 2])
def test_valid_settings_parse(bits, group_size, rotate_k):
    raw = {"bitdecode": {"bits": bits, "group_size": group_size, "rotate_k": rotate_k}}
    cfg = BitDecodeConfig.from_additional_config(raw)
    assert (cfg.bits, cfg.group_size, cfg.rotate_k) == (bits, group_size, rotate_k)
    fmt = cfg.page_format(head_size=128, block_size=16)
    assert (fmt.bits, fmt.group_size) == (bits, group_size)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"bits": 2}, (2, 128, True)),
        ({"group_size": 32}, (4, 32, True)),
        ({"rotate_k": False}, (4, 128, False)),
    ],
)
def test_partial_settings_keep_other_defaults(raw, expected):
    cfg = BitDecodeConfig.from_additional_config({"bitdecode": raw, "unrelated": 1})
    assert (cfg.bits, cfg.group_size, cfg.rotate_k) == expected


BAD_SETTINGS = [
    # (additional_config, words the message must contain)
    ({"bitdecode": {"group": 64}}, ["'group'", "unknown"]),
    ({"bitdecode": {"bits": 4, "rotate": True}}, ["'rotate'", "unknown"]),
    ({"bitdecode": {"bits": 3}}, ["bits", "3"]),
    ({"bitdecode": {"bits": 8}}, ["bits", "8"]),
    ({"bitdecode": {"bits": "4"}}, ["bits", "'4'"]),
    ({"bitdecode": {"bits": True}}, ["bits", "True"]),
    ({"bitdecode": {"bits": 4.0}}, ["bits", "4.0"]),
    ({"bitdecode": {"group_size": 16}}, ["group_size", "16"]),
    ({"bitdecode": {"group_size": 256}}, ["group_size", "256"]),
    ({"bitdecode": {"group_size": "64"}}, ["group_size", "'64'"]),
    ({"bitdecode": {"group_size": 64.0}}, ["group_size", "64.0"]),
    ({"bitdecode": {"rotate_k": "yes"}}, ["rotate_k", "'yes'"]),
    ({"bitdecode": {"rotate_k": 1}}, ["rotate_k"]),
    ({"bitdecode": [4]}, ["bitdecode", "dict", "list"]),
]


@pytest.mark.parametrize(("raw", "words"), BAD_SETTINGS)
def test_bad_settings_raise_one_line_naming_the_setting(raw, words):
    with pytest.raises(BitDecodeConfigError) as info:
        BitDecodeConfig.from_additional_config(raw)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)


# ---------------------------------------------------------------- check_model

LLAMA3_8B = dict(
    head_size=128,
    dtype=torch.bfloat16,
    kv_cache_dtype="auto",
    block_size=16,
    num_heads=32,
    num_kv_heads=8,
)


@pytest.mark.parametrize(
    "override",
    [
        {},
        {"dtype": torch.float16},
        {"kv_cache_dtype": None},
        {"kv_cache_dtype": "bfloat16"},
        {"block_size": None},
        {"block_size": 128},
        {"num_heads": 128, "num_kv_heads": 8},  # 16 query heads per KV head: the limit
        {"num_heads": 8, "num_kv_heads": 8},
        {"num_heads": None, "num_kv_heads": None},
    ],
)
def test_check_model_accepts(override):
    assert check_model(**{**LLAMA3_8B, **override}) is None


BAD_MODELS = [
    ({"head_size": 64}, "head size"),
    ({"head_size": 96}, "head size"),
    ({"head_size": 256}, "head size"),
    ({"dtype": torch.float32}, "dtype"),
    ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype"),
    ({"kv_cache_dtype": "fp8_e4m3"}, "--kv-cache-dtype"),
    ({"block_size": 8}, "--block-size"),
    ({"block_size": 24}, "--block-size"),
    ({"block_size": 256}, "--block-size"),
    ({"use_mla": True}, "MLA"),
    ({"is_encoder_decoder": True}, "encoder-decoder"),
    ({"sliding_window": 4096}, "sliding"),
    ({"num_heads": 32, "num_kv_heads": 3}, "KV heads"),
    ({"num_heads": 64, "num_kv_heads": 2}, "KV heads"),  # 32 per KV head > 16
    ({"num_heads": 17, "num_kv_heads": 1}, "KV heads"),
]


@pytest.mark.parametrize(("override", "fragment"), BAD_MODELS)
def test_check_model_rejects(override, fragment):
    with pytest.raises(BitDecodeConfigError) as info:
        check_model(**{**LLAMA3_8B, **override})
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- check_vllm_config


def _vllm_config(
    additional_config=None,
    *,
    head_size=128,
    dtype=torch.bfloat16,
    cache_dtype="auto",
    block_size=16,
    user_specified_block_size=True,
    sliding_window=None,
    heads=(32, 8),
    model=True,
):
    parallel = SimpleNamespace(tensor_parallel_size=1)

    def per_rank(n):
        def get(parallel_config):
            assert parallel_config is parallel  # the engine's parallel config is passed on
            return n

        return get

    model_config = SimpleNamespace(
        get_head_size=lambda: head_size,
        dtype=dtype,
        use_mla=False,
        is_encoder_decoder=False,
        get_sliding_window=lambda: sliding_window,
        get_num_attention_heads=per_rank(heads[0]),
        get_num_kv_heads=per_rank(heads[1]),
    )
    return SimpleNamespace(
        additional_config=additional_config if additional_config is not None else {},
        model_config=model_config if model else None,
        cache_config=SimpleNamespace(
            cache_dtype=cache_dtype,
            block_size=block_size,
            user_specified_block_size=user_specified_block_size,
        ),
        parallel_config=parallel,
    )


@pytest.mark.parametrize(
    ("additional_config", "expected"),
    [
        (None, (4, 128, True)),
        ({"bitdecode": {"bits": 2, "group_size": 64}}, (2, 64, True)),
        ({"bitdecode": {"rotate_k": False}}, (4, 128, False)),
    ],
)
def test_check_vllm_config_returns_settings(additional_config, expected):
    cfg = check_vllm_config(_vllm_config(additional_config))
    assert isinstance(cfg, BitDecodeConfig)
    assert (cfg.bits, cfg.group_size, cfg.rotate_k) == expected


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"head_size": 64}, "head size"),
        ({"dtype": torch.float32}, "dtype"),
        ({"cache_dtype": "fp8"}, "--kv-cache-dtype"),
        ({"block_size": 24}, "--block-size"),
        ({"sliding_window": 4096}, "sliding"),
        ({"heads": (32, 3)}, "KV heads"),
        ({"additional_config": {"bitdecode": {"bits": 3}}}, "bits"),
        # settings are checked even when there is no model config
        ({"additional_config": {"bitdecode": {"bits": 3}}, "model": False}, "bits"),
    ],
)
def test_check_vllm_config_rejects(kwargs, fragment):
    with pytest.raises(BitDecodeConfigError, match=fragment):
        check_vllm_config(_vllm_config(**kwargs))


@pytest.mark.parametrize("block_size", [24, 256, 8])
def test_block_size_checked_only_when_user_specified(block_size):
    cfg = check_vllm_config(_vllm_config(block_size=block_size, user_specified_block_size=False))
    assert cfg.bits == 4
    with pytest.raises(BitDecodeConfigError, match="--block-size"):
        check_vllm_config(_vllm_config(block_size=block_size, user_specified_block_size=True))


def test_no_model_config_skips_model_checks():
    cfg = check_vllm_config(_vllm_config({"bitdecode": {"bits": 2}}, head_size=64, model=False))
    assert cfg.bits == 2
