"""Checks of ``vllm_bitdecode.config``: parsing ``--additional-config`` and the model checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_bitdecode.config import (
    BitDecodeConfig,
    BitDecodeConfigError,
    SparseConfig,
    check_model,
    check_platform,
    check_sparse_model,
    check_tensor_parallel,
    check_vllm_config,
    describe_cache,
    layer_index,
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
    ({"bitdecode": {"prefill_window": 64}}, ["prefill_window", "64", "at least 128"]),
    ({"bitdecode": {"prefill_window": 8192.0}}, ["prefill_window", "8192.0"]),
    ({"bitdecode": {"prefill_window": True}}, ["prefill_window", "True"]),
    ({"bitdecode": {"k_mode": "channel", "prefill_window": 8192}},
     ["prefill_window", "k_mode='token' only"]),
]

# settings meant for BITDECODE under another key: an error, not the defaults
BAD_SECTION_NAMES = [
    ({"bits": 2}, ["['bits']", "top level", "'bitdecode' section"]),
    ({"bits": 2, "sparse": {"enabled": True}, "other": {}}, ["['bits', 'sparse']"]),
    ({"BITDECODE": {"bits": 2}}, ["'BITDECODE' section", "lower case"]),
    ({"BitDecode": {}, "bitdecode": {}}, ["'BitDecode' section"]),  # which one is meant?
    ({"bitdecod": {"bits": 2}}, ["'bitdecod'", "none named 'bitdecode'"]),
    ({"bit_decode": {"bits": 2}}, ["'bit_decode'"]),
    ({"bitdecoding": {"bits": 2}}, ["'bitdecoding'"]),
]


@pytest.mark.parametrize(("additional_config", "bits"), [
    ({"decode": {"bits": 2}}, 4),  # another plugin's similar word: the defaults
    ({"kv_transfer": {}, "quant": 1}, 4),
    ({"bitdecode": {"bits": 2}, "bits": 3}, 2),  # with a section, top-level keys are others'
    ({"bitdecode": {"bits": 2}, "bit_decode": 1}, 2),
])
def test_other_plugins_keys_pass(additional_config, bits):
    cfg = BitDecodeConfig.from_additional_config(additional_config)
    assert cfg == BitDecodeConfig(bits=bits)


def test_prefill_window_setting():
    assert BitDecodeConfig.from_additional_config({}).prefill_window == 16384
    raw = {"bitdecode": {"prefill_window": 4096}}
    assert BitDecodeConfig.from_additional_config(raw).prefill_window == 4096


@pytest.mark.parametrize(("raw", "words"), BAD_SETTINGS + BAD_SECTION_NAMES)
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
        {"kv_cache_dtype": "float16", "dtype": torch.float16},
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
    # vLLM turns 'auto' into a checkpoint's FP8 KV-cache quantization before the check:
    # the message says so and names the way out (the model's dtype, explicitly)
    ({"kv_cache_dtype": "fp8"}, "with 'auto' the checkpoint's KV-cache quantization"),
    ({"kv_cache_dtype": "fp8"}, "or the model's dtype (bfloat16 or float16)"),
    # another 16-bit dtype than the model's would be ignored: the pages keep the model's
    ({"kv_cache_dtype": "float16"}, "--kv-cache-dtype float16 with a bfloat16 model"),
    ({"kv_cache_dtype": "bfloat16", "dtype": torch.float16},
     "--kv-cache-dtype bfloat16 with a float16 model"),
    ({"block_size": 8}, "--block-size"),
    ({"block_size": 24}, "--block-size"),
    ({"block_size": 256}, "--block-size"),
    ({"use_mla": True}, "MLA"),
    ({"is_encoder_decoder": True}, "encoder-decoder"),
    ({"sliding_window": 4096}, "sliding"),
    # the head size first: the sliding window's way out would not serve this one
    ({"sliding_window": 4096, "head_size": 256}, "head size 256"),
    ({"is_attention_free": True, "head_size": 0, "num_kv_heads": 0}, "attention-free"),
    ({"is_mm_prefix_lm": True}, "multimodal prefix attends bidirectionally"),
    ({"is_hybrid": True}, "hybrid"),
    ({"attention_chunk_size": 8192}, "chunked local attention"),
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
    is_hybrid=False,
    attention_chunk_size=None,
    kv_transfer_config=None,
    dcp=1,
    pcp=1,
    quant_config=None,
    tp=1,
    speculative_config=None,
    layer_types=None,
):
    parallel = SimpleNamespace(tensor_parallel_size=tp, decode_context_parallel_size=dcp,
                               prefill_context_parallel_size=pcp)

    def per_rank(n):
        def get(parallel_config):
            assert parallel_config is parallel  # the engine's parallel config is passed on
            return n

        return get

    model_config = SimpleNamespace(
        model="/models/m",
        hf_text_config=SimpleNamespace(layer_types=layer_types),
        get_head_size=lambda: head_size,
        dtype=dtype,
        use_mla=False,
        is_encoder_decoder=False,
        get_sliding_window=lambda: sliding_window,
        get_num_attention_heads=per_rank(heads[0]),
        get_num_kv_heads=per_rank(heads[1]),
        get_total_num_kv_heads=lambda: heads[1],
        is_hybrid=is_hybrid,
        attention_chunk_size=attention_chunk_size,
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
        speculative_config=speculative_config,
        kv_transfer_config=kv_transfer_config,
        quant_config=quant_config,
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
        ({"sliding_window": 4096}, "sliding.*--disable-sliding-window"),
        ({"is_hybrid": True}, "hybrid"),
        # context parallelism, in every mode (vLLM's own check asserts after the weights)
        ({"dcp": 2}, "context parallelism .--decode-context-parallel-size 2"),
        ({"pcp": 2}, "context parallelism .--prefill-context-parallel-size 2"),
        # a compressed-tensors checkpoint's kv_cache_scheme forces an fp8 KV cache
        ({"quant_config": SimpleNamespace(kv_cache_scheme={"type": "float", "num_bits": 8})},
         "kv_cache_scheme .*fp8 whatever --kv-cache-dtype says"),
        ({"attention_chunk_size": 8192}, "chunked local attention"),
        ({"heads": (32, 3)}, "KV heads"),
        ({"additional_config": {"bitdecode": {"bits": 3}}}, "bits"),
        # settings are checked even when there is no model config
        ({"additional_config": {"bitdecode": {"bits": 3}}, "model": False}, "bits"),
        # KV connectors: only the CPU offloading one (--kv-offloading-size sets it), and
        # only with per-token K
        ({"kv_transfer_config": SimpleNamespace(kv_connector="OffloadingConnector"),
          "additional_config": {"bitdecode": {"k_mode": "channel"}}},
         "k_mode='channel' cannot move KV pages.*'OffloadingConnector'.*k_mode='token' to"),
        ({"kv_transfer_config": SimpleNamespace(kv_connector="NixlConnector")},
         "only vLLM's CPU offloading connector.*'NixlConnector'"),
        ({"kv_transfer_config": SimpleNamespace(kv_connector="LMCacheConnectorV1"),
          "additional_config": {"bitdecode": {"k_mode": "channel"}}},
         "k_mode='channel' cannot move KV pages.*'LMCacheConnectorV1'.*only vLLM's CPU"),
        ({"kv_transfer_config": SimpleNamespace(kv_connector="NixlConnector"), "model": False},
         "'NixlConnector'"),
        ({"kv_transfer_config": SimpleNamespace(kv_connector="SimpleCPUOffloadConnector")},
         "'SimpleCPUOffloadConnector' .set by VLLM_USE_SIMPLE_KV_OFFLOAD=1"),
    ],
)
def test_check_vllm_config_rejects(kwargs, fragment):
    with pytest.raises(BitDecodeConfigError, match=fragment):
        check_vllm_config(_vllm_config(**kwargs))


def test_channel_k_refuses_a_connector_before_advising_on_it():
    """Channel K can use no connector, so its refusal comes first: not the hybrid
    manager's advice (--disable-hybrid-kv-cache-manager), which would not help."""
    from vllm_bitdecode.config import check_kv_connector

    offloading = SimpleNamespace(kv_connector="OffloadingConnector")
    with pytest.raises(BitDecodeConfigError, match="k_mode='channel' cannot move KV pages"):
        check_kv_connector(offloading, channel_k=True, hybrid_manager_on=True)
    with pytest.raises(BitDecodeConfigError, match="--disable-hybrid-kv-cache-manager"):
        check_kv_connector(offloading, channel_k=False, hybrid_manager_on=True)


def _drafter(method, **draft):
    """A speculative config whose draft model is _vllm_config(**draft)'s model."""
    d = _vllm_config(**draft)
    return SimpleNamespace(method=method, draft_model_config=d.model_config,
                           draft_parallel_config=d.parallel_config)


@pytest.mark.parametrize(("spec", "fragment"), [
    (_drafter("draft_model", head_size=64), "the draft model ./models/m.: head size 64"),
    (_drafter("eagle", head_size=64), "the draft model .*head size 64"),
    (_drafter("eagle3", heads=(32, 1)), "the draft model .*32 query heads over 1"),
    (_drafter("draft_model", layer_types=["sliding_attention", "full_attention"]),
     "the draft model .*1 sliding-window attention layers.*target model only"),
    (_drafter("draft_model", dtype=torch.float32), "the draft model .*dtype"),
    (_drafter("mtp", heads=(12, 3), tp=4), "the draft model .*3 KV heads cannot be split"),
    (_drafter("dflash"), "'dflash' drafts.*non-causally"),
])
def test_the_draft_model_is_checked_like_the_target(spec, fragment):
    with pytest.raises(BitDecodeConfigError, match=fragment):
        check_vllm_config(_vllm_config(speculative_config=spec))


@pytest.mark.parametrize("spec", [
    _drafter("draft_model"),
    # a bare sliding_window in a draft's config (many carry one unused): its layers take a
    # window only from layer_types, their cache config being the target's
    _drafter("draft_model", sliding_window=512, layer_types=["full_attention"] * 2),
    _drafter("eagle3", heads=(32, 8), tp=4),
    # drafters without attention layers: their (here unsupported) model is not looked at
    _drafter("ngram", head_size=64),
    _drafter("medusa", head_size=64),
    SimpleNamespace(method="suffix", draft_model_config=None, draft_parallel_config=None),
])
def test_drafters_like_the_target_or_without_attention_pass(spec):
    assert check_vllm_config(_vllm_config(speculative_config=spec)).bits == 4


def test_cpu_offloading_connector_is_accepted_with_per_token_k():
    connector = SimpleNamespace(kv_connector="OffloadingConnector")
    cfg = check_vllm_config(_vllm_config({"bitdecode": {"bits": 2}}, kv_transfer_config=connector))
    assert cfg.bits == 2 and not cfg.channel_k


@pytest.mark.parametrize("block_size", [24, 256, 8])
def test_block_size_checked_only_when_user_specified(block_size):
    cfg = check_vllm_config(_vllm_config(block_size=block_size, user_specified_block_size=False))
    assert cfg.bits == 4
    with pytest.raises(BitDecodeConfigError, match="--block-size"):
        check_vllm_config(_vllm_config(block_size=block_size, user_specified_block_size=True))


def test_no_model_config_skips_model_checks():
    cfg = check_vllm_config(_vllm_config({"bitdecode": {"bits": 2}}, head_size=64, model=False))
    assert cfg.bits == 2


# ---------------------------------------------------------------- sparse (issue #6)

LLAMA3_8B_LAYERS = 32


def _sparse(**raw):
    return BitDecodeConfig.from_additional_config({"bitdecode": {"sparse": raw}}).sparse


@pytest.mark.parametrize(
    "additional_config",
    [None, {"bitdecode": {}}, {"bitdecode": {"bits": 2}}, {"bitdecode": {"sparse": {}}}],
)
def test_sparse_is_off_by_default(additional_config):
    cfg = BitDecodeConfig.from_additional_config(additional_config)
    assert cfg.sparse == SparseConfig()
    assert cfg.sparse.enabled is False
    assert (cfg.sparse.token_budget, cfg.sparse.shared_selection) == (2048, False)
    assert cfg.sparse.selection_layers == cfg.sparse.dense_layers == "auto"


GOOD_SPARSE = [
    # (sparse section, (enabled, token_budget, selection, dense, shared, dense_below))
    ({"enabled": True}, (True, 2048, "auto", "auto", False, 4096)),
    ({"enabled": False, "token_budget": 64}, (False, 64, "auto", "auto", False, 128)),
    (
        {"enabled": True, "token_budget": 2048, "selection_layers": [2, 15],
         "dense_layers": [0, 1], "shared_selection": False, "min_seq_len": 2048},
        (True, 2048, (2, 15), (0, 1), False, 2048),
    ),
    ({"enabled": True, "selection_layers": [15, 2]}, (True, 2048, (2, 15), "auto", False, 4096)),
    ({"enabled": True, "selection_layers": "auto", "dense_layers": "auto"},
     (True, 2048, "auto", "auto", False, 4096)),
    ({"enabled": True, "shared_selection": True, "token_budget": 1, "granularity": "token"},
     (True, 1, "auto", "auto", True, 2)),
    ({"enabled": True, "min_seq_len": None}, (True, 2048, "auto", "auto", False, 4096)),
    ({"enabled": True, "token_budget": 256, "min_seq_len": 256},
     (True, 256, "auto", "auto", False, 256)),
    # below the budget: allowed (a warning at start-up), short rows keep every position
    ({"enabled": True, "token_budget": 8192, "min_seq_len": 1},
     (True, 8192, "auto", "auto", False, 1)),
    ({"enabled": True, "selection_layers": [0], "dense_layers": []},
     (True, 2048, (0,), (), False, 4096)),
    ({"enabled": True, "selection_layers": [3], "dense_layers": [0, 1, 2, 7]},
     (True, 2048, (3,), (0, 1, 2, 7), False, 4096)),
]


@pytest.mark.parametrize(("granularity", "unit", "unit_budget"),
                         [("token", 1, 2048), ("page", 16, 128)])
def test_sparse_granularity(granularity, unit, unit_budget):
    s = _sparse(enabled=True, granularity=granularity)
    assert (s.granularity, s.selection_unit, s.unit_budget) == (granularity, unit, unit_budget)
    assert _sparse(enabled=True).granularity == "page"  # the default (measured faster)


@pytest.mark.parametrize(("raw", "expected"), GOOD_SPARSE)
def test_sparse_settings_parse(raw, expected):
    s = _sparse(**raw)
    got = (s.enabled, s.token_budget, s.selection_layers, s.dense_layers, s.shared_selection,
           s.dense_below)
    assert got == expected
    assert BitDecodeConfig.from_additional_config(
        {"bitdecode": {"bits": 2, "sparse": raw}}
    ).bits == 2


BAD_SPARSE = [
    # (sparse section, words the one-line message must contain)
    ([True], ["bitdecode.sparse", "dict", "list"]),
    (True, ["bitdecode.sparse", "dict", "bool"]),
    ({"enabled": True, "budget": 64}, ["'budget'", "unknown", "bitdecode.sparse"]),
    ({"enabled": True, "top_k": 64}, ["'top_k'", "unknown"]),
    ({"token_budget": 64}, ["'enabled'", "token_budget"]),  # settings but no on/off
    ({"enabled": "yes"}, ["enabled", "'yes'"]),
    ({"enabled": 1}, ["enabled"]),
    ({"enabled": True, "token_budget": 0}, ["token_budget", "0", "> 0"]),
    ({"enabled": True, "token_budget": -5}, ["token_budget", "-5"]),
    ({"enabled": True, "token_budget": 2048.0}, ["token_budget", "2048.0"]),
    ({"enabled": True, "token_budget": "2048"}, ["token_budget", "'2048'"]),
    ({"enabled": True, "token_budget": True}, ["token_budget", "True"]),
    ({"enabled": True, "token_budget": None}, ["token_budget", "None"]),
    ({"enabled": True, "shared_selection": "no"}, ["shared_selection", "'no'"]),
    ({"enabled": True, "granularity": "pages"}, ["granularity", "'pages'", "'token'", "'page'"]),
    ({"enabled": True, "granularity": "page", "token_budget": 100},
     ["token_budget=100", "multiple of 16", "'page'"]),
    ({"enabled": True, "token_budget": 100},  # the default granularity says how to keep 100
     ["token_budget=100", "multiple of 16", "(the default)", '"granularity": "token"']),
    ({"enabled": True, "min_seq_len": 0}, ["min_seq_len", "0"]),
    ({"enabled": True, "min_seq_len": 4096.0}, ["min_seq_len", "4096.0"]),
    ({"enabled": True, "selection_layers": 2}, ["selection_layers=2", "list"]),
    ({"enabled": True, "selection_layers": "middle"}, ["selection_layers='middle'", "auto"]),
    ({"enabled": True, "selection_layers": [2, -1]}, ["selection_layers", "-1", ">= 0"]),
    ({"enabled": True, "selection_layers": [2, "15"]}, ["selection_layers", "'15'"]),
    ({"enabled": True, "selection_layers": [2, 15.0]}, ["selection_layers", "15.0"]),
    ({"enabled": True, "selection_layers": [True]}, ["selection_layers", "True"]),
    ({"enabled": True, "selection_layers": [2, 2]}, ["selection_layers", "[2]", "more than once"]),
    ({"enabled": True, "selection_layers": []}, ["selection_layers", "empty"]),
    ({"enabled": True, "dense_layers": [-2]}, ["dense_layers", "-2"]),
    ({"enabled": True, "dense_layers": {"0": 1}}, ["dense_layers", "list"]),
    # both lists given: the layer structure is checked before the model is known
    ({"enabled": True, "selection_layers": [2, 15], "dense_layers": [0, 1, 2]},
     ["[2]", "both dense_layers and selection_layers"]),
    ({"enabled": True, "selection_layers": [5], "dense_layers": [0, 1]},
     ["[2, 3, 4]", "before the first selection layer (5)", "dense_layers"]),
    ({"enabled": False, "selection_layers": [2], "dense_layers": [0]},
     ["[1]", "before the first selection layer"]),  # checked even while off
]


@pytest.mark.parametrize(("raw", "words"), BAD_SPARSE)
def test_bad_sparse_settings_raise_one_line(raw, words):
    with pytest.raises(BitDecodeConfigError) as info:
        BitDecodeConfig.from_additional_config({"bitdecode": {"sparse": raw}})
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)


LAYER_PLANS = [
    # (sparse section, num_layers, (dense, selection, reuse))
    ({}, 32, ((0, 1), (2, 13), tuple(i for i in range(3, 32) if i != 13))),  # TidalDecode
    ({}, 80, ((0, 1), (2, 32), tuple(i for i in range(3, 80) if i != 32))),
    ({}, 16, ((0, 1), (2, 6), (3, 4, 5, *range(7, 16)))),
    ({}, 10, ((0, 1), (2, 4), (3, *range(5, 10)))),
    ({}, 8, ((0, 1), (2,), tuple(range(3, 8)))),  # too shallow for a correction layer
    ({}, 4, ((0, 1), (2,), (3,))),
    ({"selection_layers": [2, 15], "dense_layers": [0, 1]}, 32,
     ((0, 1), (2, 15), tuple(i for i in range(3, 32) if i != 15))),
    ({"selection_layers": [4]}, 6, ((0, 1, 2, 3), (4,), (5,))),
    ({"selection_layers": [0]}, 2, ((), (0,), (1,))),
    ({"selection_layers": [2, 13], "dense_layers": [0, 1, 31]}, 32,
     ((0, 1, 31), (2, 13), tuple(i for i in range(3, 31) if i != 13))),
    ({"dense_layers": [0, 1, 5]}, 32, ((0, 1, 5), (2, 13), tuple(
        i for i in range(3, 32) if i not in (5, 13)))),
]


@pytest.mark.parametrize(("raw", "num_layers", "expected"), LAYER_PLANS)
def test_layer_plan(raw, num_layers, expected):
    plan = _sparse(enabled=True, **raw).layer_plan(num_layers)
    assert (plan.dense, plan.selection, plan.reuse) == expected
    roles = [plan.role(i) for i in range(num_layers)]
    assert roles.count("selection") == len(expected[1])
    assert all(roles[i] == "dense" for i in expected[0])
    assert all(roles[i] == "reuse" for i in expected[2])
    first = min(expected[1])
    assert all(r == "dense" for r in roles[:first])  # nothing reuses before a selection
    with pytest.raises(BitDecodeConfigError, match="outside"):
        plan.role(num_layers)


BAD_SPARSE_MODELS = [
    # (sparse section, check_sparse_model arguments, words of the message)
    ({"selection_layers": [2, 40]}, {"num_layers": 32},
     ["selection_layers", "[40]", "beyond the model's depth", "32 layers"]),
    ({"selection_layers": [32]}, {"num_layers": 32}, ["[32]", "beyond"]),
    ({"dense_layers": [0, 1, 32]}, {"num_layers": 32}, ["dense_layers", "[32]", "beyond"]),
    ({}, {"num_layers": 3}, ["3 layers", "at least 4"]),
    ({}, {"num_layers": 1}, ["1 layers", "at least 4"]),
    ({"dense_layers": [0, 1, 2]}, {"num_layers": 32}, ["[2]", "both"]),  # auto selection: 2
    ({"dense_layers": [0]}, {"num_layers": 32}, ["[1]", "before the first selection layer (2)"]),
    ({"selection_layers": [2, 3]}, {"num_layers": 4}, ["every one", "4 layers"]),
    ({"selection_layers": [1], "dense_layers": [0, 2, 3]}, {"num_layers": 4}, ["every one"]),
    ({}, {"num_layers": 32, "pipeline_parallel_size": 2}, ["pipeline", "2"]),
    ({"shared_selection": True}, {"num_layers": 32, "tensor_parallel_size": 2},
     ["shared_selection", "tensor-parallel-size is 2"]),
    ({}, {"num_layers": 32, "attention_in_every_layer": False}, ["hybrid"]),
    ({}, {"num_layers": 32, "max_model_len": 4000}, ["min_seq_len=4096", "4000", "never"]),
    ({"token_budget": 512, "min_seq_len": 9000}, {"num_layers": 32, "max_model_len": 8192},
     ["min_seq_len=9000", "8192"]),
    # a budget no sequence reaches (its position buffers would still be allocated)
    ({"token_budget": 131072, "min_seq_len": 1024}, {"num_layers": 32, "max_model_len": 8192},
     ["token_budget=131072", "8192", "lower token_budget"]),
    # drafters with attention layers of their own (EAGLE's past the target's last layer)
    ({}, {"num_layers": 32, "speculative_method": "eagle"},
     ["'eagle' drafts", "ngram", "disable sparse"]),
    ({}, {"num_layers": 32, "speculative_method": "eagle3"}, ["'eagle3' drafts"]),
    ({}, {"num_layers": 32, "speculative_method": "draft_model"}, ["'draft_model' drafts"]),
    ({}, {"num_layers": 32, "speculative_method": "mtp"}, ["'mtp' drafts", "not in the sparse"]),
    # drafters without attention that no test has run beside sparse mode
    ({}, {"num_layers": 32, "speculative_method": "medusa"}, ["'medusa' drafts", "no test"]),
]


@pytest.mark.parametrize(("raw", "kwargs", "words"), BAD_SPARSE_MODELS)
def test_check_sparse_model_rejects(raw, kwargs, words):
    sparse = _sparse(enabled=True, **raw)
    with pytest.raises(BitDecodeConfigError) as info:
        check_sparse_model(sparse, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize(
    ("raw", "kwargs"),
    [
        ({}, {"num_layers": 32}),
        ({}, {"num_layers": 32, "max_model_len": 4096}),  # exactly min_seq_len: fine
        ({}, {"num_layers": 32, "tensor_parallel_size": 8}),  # per-head selection and TP
        ({"token_budget": 256}, {"num_layers": 4, "max_model_len": 512}),
        ({"token_budget": 512, "min_seq_len": 256}, {"num_layers": 4, "max_model_len": 512}),
        ({"shared_selection": True}, {"num_layers": 32, "tensor_parallel_size": 1}),
        ({}, {"num_layers": 32, "speculative_method": "ngram"}),  # drafts as rows
        ({}, {"num_layers": 32, "speculative_method": "ngram_gpu"}),
    ],
)
def test_check_sparse_model_accepts(raw, kwargs):
    plan = check_sparse_model(_sparse(enabled=True, **raw), **kwargs)
    assert plan.num_layers == kwargs["num_layers"]


@pytest.mark.parametrize(("name", "index"), [
    ("model.layers.7.self_attn.attn", 7), ("layers.0.attn", 0), ("2.self_attn", 2)])
def test_layer_index(name, index):
    assert layer_index(name) == index


@pytest.mark.parametrize("name", ["model.layers.3.attn.0", "model.attn", "lm_head"])
def test_layer_index_refuses_names_without_one_integer(name):
    with pytest.raises(BitDecodeConfigError, match=f"{name!r} has [02] integers, not one"):
        layer_index(name)


def _names(indices):
    return [f"model.layers.{i}.self_attn.attn" for i in indices]


def test_sparse_plan_checks_the_builders_layers_at_startup():
    plan = check_sparse_model(_sparse(enabled=True), num_layers=32)  # selection 2, 13
    plan.check_layers(_names(range(32)))
    plan.check_layers(_names([0, 1]))  # a group of dense layers only
    plan.check_layers(_names([2, 5, 13]))
    with pytest.raises(BitDecodeConfigError, match="outside the model's 32 layers"):
        plan.check_layers(_names([0, 32]))
    with pytest.raises(BitDecodeConfigError, match="has 2 integers"):
        plan.check_layers(["model.layers.3.attn.0"])
    with pytest.raises(BitDecodeConfigError, match=r"without the first selection layer \(2\)"):
        plan.check_layers(_names([13, 14, 15]))  # reuse layers away from layer 2
    # the correction layer (13) in a group of its own: 14-31 would read layer 2's positions
    with pytest.raises(BitDecodeConfigError,
                       match=r"reuse layer 14 reads the positions of selection layer 13"):
        plan.check_layers(_names([*range(13), *range(14, 32)]))
    plan.check_layers(_names(range(13)))  # layers 0-12 alone read only layer 2's


@pytest.mark.parametrize(("kv_heads", "tp", "ok"), [
    (8, 1, True), (8, 2, True), (8, 8, True), (1, 4, True), (2, 8, True),  # split / copied
    (6, 4, False), (3, 4, False), (8, 3, False), (8, 12, False),
    (0, 2, True),  # an attention-free model: check_model refuses it (no ZeroDivisionError)
])
def test_tensor_parallel_needs_whole_kv_heads_per_rank(kv_heads, tp, ok):
    if ok:
        check_tensor_parallel(kv_heads, tp)
        return
    with pytest.raises(BitDecodeConfigError) as err:
        check_tensor_parallel(kv_heads, tp)
    msg = str(err.value)
    assert "\n" not in msg and f"{kv_heads} KV heads" in msg
    assert f"--tensor-parallel-size {tp}" in msg


def test_check_vllm_config_checks_the_tensor_parallel_split():
    vc = _vllm_config(heads=(48, 6))
    vc.parallel_config.tensor_parallel_size = 4
    with pytest.raises(BitDecodeConfigError, match="6 KV heads cannot be split"):
        check_vllm_config(vc)


def _sparse_vllm_config(sparse, *, num_layers=LLAMA3_8B_LAYERS, max_model_len=131072, pp=1,
                        tp=1, dcp=1, hybrid=False, speculative=None, fitted=False, **kwargs):
    vc = _vllm_config({"bitdecode": {"bits": 4, "sparse": sparse}}, **kwargs)
    # --max-model-len -1: vLLM fits the length to the KV cache after the memory profile
    vc.model_config.original_max_model_len = -1 if fitted else max_model_len
    if speculative is not None:
        vc.speculative_config = SimpleNamespace(method=speculative)
    vc.model_config.get_total_num_hidden_layers = lambda: num_layers
    vc.model_config.max_model_len = max_model_len
    vc.model_config.is_hybrid = hybrid
    vc.model_config.is_attention_free = False
    vc.model_config.has_noops = False
    vc.parallel_config.pipeline_parallel_size = pp
    vc.parallel_config.tensor_parallel_size = tp
    vc.parallel_config.decode_context_parallel_size = dcp
    return vc


def test_check_vllm_config_accepts_a_valid_sparse_section():
    """A valid sparse section passes every check and starts sparse decode."""
    vc = _sparse_vllm_config({"enabled": True, "token_budget": 1024})
    cfg = check_vllm_config(vc)
    assert cfg.sparse.enabled and cfg.sparse.token_budget == 1024
    assert cfg.sparse.layer_plan(LLAMA3_8B_LAYERS).selection == (2, 13)
    off = check_vllm_config(_sparse_vllm_config({"enabled": False, "token_budget": 1024}))
    assert not off.sparse.enabled


@pytest.mark.parametrize(
    ("sparse", "kwargs", "fragment"),
    [
        ({"enabled": True, "selection_layers": [2, 40]}, {}, "beyond the model's depth"),
        ({"enabled": True}, {"num_layers": 3}, "at least 4"),
        ({"enabled": True}, {"pp": 2}, "pipeline"),
        ({"enabled": True}, {"dcp": 2}, "context parallel"),
        ({"enabled": True, "shared_selection": True}, {"tp": 2}, "shared_selection"),
        ({"enabled": True}, {"hybrid": True}, "hybrid"),
        ({"enabled": True}, {"max_model_len": 2048}, "--max-model-len is 2048.*never"),
        # the builder checks again once vLLM has fitted the length: the message says so
        ({"enabled": True}, {"max_model_len": 2048, "fitted": True},
         "--max-model-len -1 fitted the length to the KV cache: 2048 tokens.*never"),
        ({"enabled": True, "token_budget": 4096, "min_seq_len": 1024},
         {"max_model_len": 3000, "fitted": True}, "token_budget=4096 .*fitted.*3000 tokens"),
        ({"enabled": True}, {"speculative": "eagle"}, "'eagle' drafts"),
        ({"enabled": True, "token_budget": 0}, {}, "token_budget"),
        # settings are checked even without a model config
        ({"enabled": True, "token_budget": 0}, {"model": False}, "token_budget"),
        # the model checks of the existing settings still come first
        ({"enabled": True}, {"head_size": 64}, "head size"),
    ],
)
def test_check_vllm_config_rejects_sparse(sparse, kwargs, fragment):
    if kwargs.get("model") is False:
        vc = _vllm_config({"bitdecode": {"sparse": sparse}}, model=False)
    else:
        vc = _sparse_vllm_config(sparse, **kwargs)
    with pytest.raises(BitDecodeConfigError, match=fragment):
        check_vllm_config(vc)


@pytest.mark.parametrize("sparse", [None, {}, {"enabled": False, "selection_layers": [2, 99]}])
def test_sparse_off_does_not_consult_the_model_depth(sparse):
    """With sparse off, nothing about the model's layers is asked or checked (layer 99 of
    a 32-layer model is only an error once sparse is enabled)."""
    raw = {"bitdecode": {} if sparse is None else {"sparse": sparse}}
    vc = _vllm_config(raw)

    def depth():
        raise AssertionError("depth asked with sparse off")

    vc.model_config.get_total_num_hidden_layers = depth
    assert check_vllm_config(vc).sparse.enabled is False


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"token_budget": 0}, "token_budget"),
        ({"selection_layers": [3, 3]}, "more than once"),
        ({"selection_layers": (4,), "dense_layers": (0, 1)}, "before the first selection"),
        ({"min_seq_len": -10, "token_budget": 16}, "min_seq_len=-10"),
    ],
)
def test_sparse_config_made_directly_is_checked_too(kwargs, fragment):
    with pytest.raises(BitDecodeConfigError, match=fragment):
        SparseConfig(enabled=True, **kwargs)
    assert SparseConfig(enabled=True, selection_layers=[9, 2]).selection_layers == (2, 9)


# ---------------------------------------------------------------- start-up line


@pytest.mark.parametrize(("settings", "block_size", "bytes_per_token", "ratio", "k_words"), [
    ({}, 16, "136 B", "3.76x", "K per token in groups of 128, Hadamard-rotated"),
    ({"bits": 2, "group_size": 32, "rotate_k": False}, 16, "96 B", "5.33x",
     "K per token in groups of 32;"),
    ({"k_mode": "channel"}, 128, "164 B", "3.12x", "fp16 scale and zero point"),
    ({"k_mode": "channel", "k_params": "fp8"}, 128, "148 B", "3.46x", "fp8 scale"),
])
def test_start_up_line_says_what_a_token_costs(settings, block_size, bytes_per_token, ratio,
                                               k_words):
    """The builder's start-up line (README's byte counts: 136 B per token and KV head at
    4 bits per token, 164 / 148 B with K per channel), read beside vLLM's KV cache size."""
    cfg = BitDecodeConfig.from_additional_config({"bitdecode": settings})
    line = describe_cache(cfg, head_size=128, block_size=block_size)
    assert (f"{bytes_per_token} per token and KV head against 512 B in the model dtype "
            f"({ratio} the tokens per GiB)") in line
    assert k_words in line and f"pages of {block_size} tokens" in line
    per_token = cfg.head_region_bytes(128, block_size) / block_size
    assert ratio == f"{2 * 128 * 2 / per_token:.2f}x"


@pytest.mark.parametrize(("spec", "extension"), [
    (None, 0),
    (SimpleNamespace(method="ngram", num_speculative_tokens=5), 0),
    (SimpleNamespace(method="suffix", num_speculative_tokens=None), 0),
    (SimpleNamespace(method="draft_model", num_speculative_tokens=3), 3),
    (SimpleNamespace(method="eagle3", num_speculative_tokens=4), 4),
])
def test_drafter_query_extension_bounds_the_first_pass(spec, extension):
    from vllm_bitdecode.config import drafter_query_extension

    assert drafter_query_extension(SimpleNamespace(speculative_config=spec)) == extension


class _Platform:
    """vLLM's Platform predicates for one platform kind."""

    def __init__(self, kind: str):
        self.kind = kind

    def __getattr__(self, name: str):
        if name.startswith("is_"):
            return lambda: name == f"is_{self.kind}"
        raise AttributeError(name)


@pytest.mark.parametrize("kind", ["cuda", "unspecified"])
def test_cuda_and_an_unspecified_platform_pass(kind):
    check_platform(_Platform(kind))


@pytest.mark.parametrize(("kind", "name"), [("cpu", "CPU"), ("rocm", "ROCm"), ("xpu", "XPU"),
                                            ("tpu", "TPU"), ("out_of_tree", "_Platform")])
def test_other_platforms_are_refused_by_name(kind, name):
    with pytest.raises(BitDecodeConfigError, match=f"runs on the {name} platform"):
        check_platform(_Platform(kind))
