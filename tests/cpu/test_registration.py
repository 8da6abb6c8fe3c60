"""How the plugin hooks into the installed vLLM 0.20 (no mocks of vLLM internals).

Covers the ``vllm.general_plugins`` entry point, the ``BITDECODE`` member added to
``AttentionBackendEnum``, the config / engine-args paths that take the backend name,
the ``Attention.get_kv_cache_spec`` and ``EngineArgs.add_cli_args`` patches, and the
KV-cache spec / backend shape arithmetic that vLLM sizes the cache with.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pickle
from enum import Enum
from pathlib import Path

import pytest
import torch
import vllm.plugins
from vllm.config import AttentionConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.attention.attention import Attention
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.core import single_type_kv_cache_manager as managers
from vllm.v1.kv_cache_interface import FullAttentionSpec

import vllm_bitdecode
from vllm_bitdecode import _registration
from vllm_bitdecode import config as bd_config
from vllm_bitdecode.backend.backend import BitDecodeAttentionBackend
from vllm_bitdecode.backend.spec import BitDecodeAttentionSpec
from vllm_bitdecode.page_format import PageFormat

GROUP = "vllm.general_plugins"
FLASH_ATTN_PATH = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Go through vLLM's own plugin loader once, then register twice more (re-entrant)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(vllm.plugins, "plugins_loaded", False)  # force the loader to run here
    try:
        vllm.plugins.load_general_plugins()
    finally:
        mp.undo()
    vllm_bitdecode.register()
    vllm_bitdecode.register()
    return AttentionBackendEnum["BITDECODE"]


@pytest.fixture
def restore_active():
    saved = bd_config._active
    yield
    bd_config._active = saved


# ---------------------------------------------------------------- entry point


def test_entry_point_declared_in_installed_metadata():
    eps = [ep for ep in importlib.metadata.entry_points(group=GROUP) if ep.name == "bitdecode"]
    assert len(eps) == 1
    (ep,) = eps
    assert ep.value == "vllm_bitdecode:register"
    assert ep.dist is not None and ep.dist.name == "vllm-bitdecode"
    assert ep.load() is vllm_bitdecode.register


def test_vllm_plugin_loader_finds_register():
    plugins = vllm.plugins.load_plugins_by_group(GROUP)
    assert plugins.get("bitdecode") is vllm_bitdecode.register


# ---------------------------------------------------------------- the enum member


def test_exactly_one_member_after_repeated_register(registered):
    names_before = list(AttentionBackendEnum._member_names_)
    vllm_bitdecode.register()
    assert list(AttentionBackendEnum._member_names_) == names_before
    assert names_before.count("BITDECODE") == 1
    assert [m.name for m in AttentionBackendEnum].count("BITDECODE") == 1
    assert len(AttentionBackendEnum) == len(names_before)


def test_every_lookup_gives_the_same_member(registered):
    member = registered
    assert isinstance(member, AttentionBackendEnum)
    assert member.name == "BITDECODE"
    assert member.value == vllm_bitdecode.BACKEND_PATH
    assert AttentionBackendEnum["BITDECODE"] is member
    assert AttentionBackendEnum["bitdecode".upper()] is member
    assert AttentionBackendEnum.BITDECODE is member
    assert AttentionBackendEnum(vllm_bitdecode.BACKEND_PATH) is member
    assert AttentionBackendEnum.__members__["BITDECODE"] is member
    assert member in AttentionBackendEnum
    assert [m for m in list(AttentionBackendEnum) if m.name == "BITDECODE"] == [member]
    assert [m for m in list(AttentionBackendEnum) if m is member] == [member]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(member, protocol=protocol)) is member


def test_member_resolves_to_backend_class(registered):
    cls = registered.get_class()
    assert cls is BitDecodeAttentionBackend
    assert cls.get_name() == "BITDECODE"
    assert AttentionBackendEnum[cls.get_name()] is registered  # vLLM's own lookup
    assert not registered.is_overridden()


def test_other_members_untouched(registered):
    flash = AttentionBackendEnum["FLASH_ATTN"]
    assert AttentionBackendEnum.FLASH_ATTN is flash
    assert flash.value == FLASH_ATTN_PATH
    assert flash.get_path() == FLASH_ATTN_PATH
    assert AttentionBackendEnum(FLASH_ATTN_PATH) is flash
    assert AttentionBackendEnum._member_names_[0] == "FLASH_ATTN"
    custom = AttentionBackendEnum["CUSTOM"]
    assert AttentionBackendEnum.CUSTOM is custom
    assert custom.value is None
    assert custom is not registered and flash is not registered
    # BITDECODE is appended, after every built-in member
    assert AttentionBackendEnum._member_names_[-1] == "BITDECODE"
    assert AttentionBackendEnum._member_names_.index("CUSTOM") < len(AttentionBackendEnum) - 1


def test_add_enum_member_on_a_private_enum():
    class Color(Enum):
        RED = "r"

    green = _registration.add_enum_member(Color, "GREEN", "g")
    assert _registration.add_enum_member(Color, "GREEN", "g") is green
    assert [m.name for m in Color] == ["RED", "GREEN"]
    assert Color["GREEN"] is Color.GREEN is Color("g") is green
    with pytest.raises(ValueError, match="GREEN"):
        _registration.add_enum_member(Color, "GREEN", "other")
    assert Color.GREEN.value == "g"


# ---------------------------------------------------------------- config / engine args


@pytest.mark.parametrize("name", ["BITDECODE", "bitdecode", "BitDecode"])
def test_attention_config_accepts_name(registered, name):
    assert AttentionConfig(backend=name).backend is registered


def test_attention_config_still_rejects_unknown_names(registered):
    with pytest.raises(ValueError, match="BITDECODE"):  # listed among the valid options
        AttentionConfig(backend="NOT_A_BACKEND")


def test_engine_args_take_the_string(registered):
    args = EngineArgs(model="x", attention_backend="BITDECODE")
    assert args.attention_backend == "BITDECODE"
    assert AttentionConfig(backend=args.attention_backend).backend is registered


# ---------------------------------------------------------------- patches


def test_wrap_once_wraps_a_method_once_and_passes_the_original():
    import asyncio

    class Base:
        def plain(self, x: int) -> int:
            return x + 1

        @staticmethod
        def static(x: int) -> int:
            return x * 2

        async def later(self, x: int) -> int:
            return x - 1

    calls = []
    for _ in range(2):  # the second round finds the mark and leaves the first wrapper

        @_registration.wrap_once(Base, "plain")
        def plain(original, self, x):
            calls.append("plain")
            return 10 * original(self, x)

        @_registration.wrap_once(Base, "static", static=True)
        def static(original, x):
            return -original(x)

        @_registration.wrap_once(Base, "later")
        async def later(original, self, x):
            return 100 + await original(self, x)

    class Child(Base):
        pass

    @_registration.wrap_once(Child, "plain")  # inherited, already wrapped: left alone
    def child_plain(original, self, x):
        raise AssertionError("a marked method was wrapped again")

    assert Base().plain(1) == 20 and Child().plain(2) == 30 and calls == ["plain"] * 2
    assert "plain" not in Child.__dict__
    assert isinstance(Base.__dict__["static"], staticmethod) and Base.static(3) == -6
    assert asyncio.run(Base().later(5)) == 104
    for name in ("plain", "static", "later"):
        method = getattr(Base, name)
        assert method.__name__ == name and method.__wrapped__.__qualname__.endswith(f"Base.{name}")
        assert not hasattr(method.__wrapped__, "__wrapped__"), "wrapped more than once"


def test_a_non_dict_additional_config_is_left_to_vllm():
    """vLLM's additional_config may be any object with compute_hash(); start-up's check
    for an ignored ``bitdecode`` section must not fail on it (for every engine of a
    process with the plugin, whichever backend it runs)."""

    class HashOnly:
        def compute_hash(self) -> str:
            return "x"

    assert not _registration._has_bitdecode_section(HashOnly())
    assert not _registration._has_bitdecode_section(None)
    assert not _registration._has_bitdecode_section({"other": {}})
    assert _registration._has_bitdecode_section({"bitdecode": {}})
    with pytest.raises(bd_config.BitDecodeConfigError, match="must be a dict"):
        bd_config.BitDecodeConfig.from_additional_config(HashOnly())


def test_kv_cache_spec_patched_exactly_once():
    patched = Attention.get_kv_cache_spec
    assert getattr(patched, "_bitdecode", False) is True
    inner = patched.__wrapped__
    assert not getattr(inner, "_bitdecode", False), "wrapped more than once"
    assert not hasattr(inner, "__wrapped__")
    assert inner.__qualname__ == "Attention.get_kv_cache_spec"
    _registration.patch_kv_cache_spec()
    vllm_bitdecode.register()
    assert Attention.get_kv_cache_spec is patched


def test_scheduler_patched_exactly_once():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    vllm_bitdecode.register()
    patched = (Scheduler.reset_prefix_cache, Scheduler.schedule)
    for method, name in zip(patched, ("reset_prefix_cache", "schedule"), strict=True):
        assert getattr(method, "_bitdecode", False) is True
        assert not getattr(method.__wrapped__, "_bitdecode", False), "wrapped more than once"
        assert method.__wrapped__.__qualname__ == f"Scheduler.{name}"
        assert getattr(AsyncScheduler, name) is method  # the async scheduler inherits both
    _registration.patch_forced_preemption_report()
    vllm_bitdecode.register()
    assert (Scheduler.reset_prefix_cache, Scheduler.schedule) == patched


def test_spec_maps_to_full_attention_manager():
    assert managers.spec_manager_map[BitDecodeAttentionSpec] is managers.FullAttentionManager
    assert managers.spec_manager_map[FullAttentionSpec] is managers.FullAttentionManager


def test_cli_help_patched_exactly_once():
    raw = EngineArgs.__dict__["add_cli_args"]
    assert isinstance(raw, staticmethod)
    patched = EngineArgs.add_cli_args
    assert getattr(patched, "_bitdecode", False) is True
    inner = patched.__wrapped__
    assert not getattr(inner, "_bitdecode", False), "wrapped more than once"
    assert inner.__module__ == "vllm.engine.arg_utils"
    _registration.patch_cli_help()
    vllm_bitdecode.register()
    assert EngineArgs.add_cli_args is patched


@pytest.mark.parametrize("help_text", ["Attention backend to use.", None])
def test_cli_help_lists_backends(monkeypatch, registered, help_text):
    """Run the real wrapper around a stand-in original that builds a plain parser
    (the full vLLM parser cannot be built without a GPU)."""

    def fake_add_cli_args(parser):
        parser.add_argument("--attention-backend", type=str, default=None, help=help_text)
        parser.add_argument("--other", help="Something else.")
        return parser

    monkeypatch.setattr(EngineArgs, "add_cli_args", staticmethod(fake_add_cli_args))
    _registration.patch_cli_help()  # wraps the stand-in (it has no _bitdecode mark)
    wrapper = EngineArgs.add_cli_args
    assert wrapper is not fake_add_cli_args
    assert wrapper.__wrapped__ is fake_add_cli_args

    parser = wrapper(argparse.ArgumentParser(prog="vllm"))
    actions = {a.dest: a for a in parser._actions}
    backend_help = actions["attention_backend"].help
    assert backend_help.startswith(help_text or "Attention backend")
    for name in ("auto", "BITDECODE", "FLASH_ATTN", "TRITON_ATTN"):
        assert name in backend_help
    assert "CUSTOM" not in backend_help
    assert actions["other"].help == "Something else."
    text = parser.format_help()
    assert "BITDECODE" in text and "FLASH_ATTN" in text
    assert parser.parse_args(["--attention-backend", "BITDECODE"]).attention_backend == (
        "BITDECODE"
    )


# ---------------------------------------------------------------- spec arithmetic


def _spec(bits=4, group_size=128, **kw):
    args = dict(block_size=16, num_kv_heads=8, head_size=128, head_size_v=128)
    args.update(kw)
    return BitDecodeAttentionSpec(dtype=torch.uint8, bits=bits, group_size=group_size, **args)


BF16_PAGE = FullAttentionSpec(
    block_size=16, num_kv_heads=8, head_size=128, head_size_v=128, dtype=torch.bfloat16
).page_size_bytes


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 2])
def test_spec_page_size_is_the_packed_page(bits, group_size):
    spec = _spec(bits, group_size)
    expected = PageFormat(128, bits, group_size, 16).page_bytes(8)
    assert spec.page_size_bytes == expected
    assert spec.real_page_size_bytes == expected
    assert spec.page_size_bytes < BF16_PAGE


@pytest.mark.parametrize(("bits", "min_ratio"), [(4, 3.75), (2, 7.0)])
def test_spec_compression_vs_bf16(bits, min_ratio):
    assert BF16_PAGE == 2 * 16 * 8 * 128 * 2
    assert BF16_PAGE / _spec(bits, 128).page_size_bytes > min_ratio


def test_spec_merge_keeps_format():
    a = _spec(bits=2, group_size=64)  # not the defaults, so a lost field shows
    merged = BitDecodeAttentionSpec.merge([a, a])
    assert type(merged) is BitDecodeAttentionSpec
    assert (merged.bits, merged.group_size) == (2, 64)
    assert merged.page_size_bytes == a.page_size_bytes
    assert merged == a


@pytest.mark.parametrize("other", [{"bits": 2, "group_size": 128}, {"bits": 4, "group_size": 64}])
def test_spec_merge_rejects_mixed_formats(other):
    with pytest.raises(ValueError, match="page format"):
        BitDecodeAttentionSpec.merge([_spec(4, 128), _spec(**other)])


# ---------------------------------------------------------------- backend statics


@pytest.mark.parametrize("bits", [2, 4])
def test_kv_cache_shape_uses_active_config(restore_active, bits):
    bd_config.set_active(bd_config.BitDecodeConfig(bits=bits))
    shape = BitDecodeAttentionBackend.get_kv_cache_shape(
        num_blocks=5, block_size=16, num_kv_heads=8, head_size=128
    )
    fmt = PageFormat(128, bits, 128, 16)
    assert shape == (5, 8, fmt.head_region_bytes)
    # one block of the cache tensor (uint8) is exactly the spec's page
    assert shape[1] * shape[2] == _spec(bits, 128).page_size_bytes


def test_kv_cache_shape_follows_the_engine_being_set_up(restore_active):
    """Two engines in one process (vLLM's in-process engine core): the shape asked while
    an engine's config is current (vLLM's worker start-up and KV-cache allocation) is
    that engine's page, whichever engine recorded its settings last."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    def engine(backend: str | None, bits: int) -> VllmConfig:
        return VllmConfig(attention_config=AttentionConfig(backend=backend),
                          device_config=DeviceConfig(device="cpu"),
                          additional_config={"bitdecode": {"bits": bits}})

    def region() -> int:
        return BitDecodeAttentionBackend.get_kv_cache_shape(5, 16, 8, 128)[2]

    bd_config.set_active(bd_config.BitDecodeConfig(bits=4))  # the other engine's
    two_bits, four_bits = (PageFormat(128, b, 128, 16).head_region_bytes for b in (2, 4))
    with set_current_vllm_config(engine("BITDECODE", 2)):
        assert region() == two_bits
    with set_current_vllm_config(engine(None, 2)):  # not BITDECODE's: the recorded one
        assert region() == four_bits
    assert region() == four_bits


@pytest.mark.parametrize("head_size", [256, 1])
def test_kv_cache_shape_answers_connector_probes(restore_active, head_size):
    """vLLM's KV connectors find the blocks' axis by asking for a shape at a head size
    of their own (256: the offloading connector; 1: NIXL's topology); the kernels have
    no page for it, but the axes must be the same as for a real head size."""
    bd_config.set_active(bd_config.BitDecodeConfig())
    probe = BitDecodeAttentionBackend.get_kv_cache_shape(
        num_blocks=1234, block_size=16, num_kv_heads=1, head_size=head_size)
    real = BitDecodeAttentionBackend.get_kv_cache_shape(
        num_blocks=1234, block_size=16, num_kv_heads=1, head_size=128)
    assert probe.index(1234) == real.index(1234) == 0
    assert len(probe) == len(real)


def test_cross_layer_cache_from_vllm_allocator(restore_active):
    """The cross-layer KV cache that vLLM allocates when a connector prefers it
    (KVConnectorModelRunnerMixin.allocate_uniform_kv_caches, run here on the CPU): one
    block holds every layer's page, and each layer's view has the shape the backend
    reports with its pages `layers` pages apart, which the kernels accept
    (tests/gpu/test_kernels.py runs them on such views)."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

    bd_config.set_active(bd_config.BitDecodeConfig())
    spec, layers, num_blocks = _spec(), 3, 10
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=num_blocks * spec.page_size_bytes, shared_by=[n])
                          for n in names],
        kv_cache_groups=[KVCacheGroupSpec(layer_names=names, kv_cache_spec=spec)])
    group = argparse.Namespace(kv_cache_spec=spec, backend=BitDecodeAttentionBackend)
    caches, whole, backend = KVConnectorModelRunnerMixin.allocate_uniform_kv_caches(
        config, [[group]], "auto", torch.device("cpu"), [16])
    assert backend is BitDecodeAttentionBackend
    assert whole.shape[0] == num_blocks  # blocks outermost: one copy moves a block
    shape = BitDecodeAttentionBackend.get_kv_cache_shape(num_blocks, 16, 8, 128)
    page = spec.page_size_bytes
    for i, name in enumerate(names):
        view = caches[name]
        assert view.shape == shape and view.dtype == torch.uint8
        assert view.stride() == (layers * page, shape[2], 1)
        assert view.data_ptr() - whole.data_ptr() == i * page
    # the layer order the offloading connector asserts (register_cross_layers_kv_cache)
    order = BitDecodeAttentionBackend.get_kv_cache_stride_order(include_num_layers_dimension=True)
    assert order.index(shape.index(num_blocks) + 1) == 0


def test_kv_cache_shape_without_config_fails(restore_active):
    bd_config._active = None
    with pytest.raises(bd_config.BitDecodeConfigError, match="not configured"):
        BitDecodeAttentionBackend.get_kv_cache_shape(5, 16, 8, 128)


GOOD = dict(
    head_size=128,
    dtype=torch.bfloat16,
    kv_cache_dtype="auto",
    block_size=16,
    use_mla=False,
    has_sink=False,
    use_sparse=False,
    use_mm_prefix=False,
    use_per_head_quant_scales=False,
    device_capability=DeviceCapability(9, 0),
    attn_type=AttentionType.DECODER,
)


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({}, None),
        ({"dtype": torch.float16}, None),
        ({"block_size": 64}, None),
        ({"head_size": 64}, "head_size not supported"),
        ({"dtype": torch.float32}, "dtype not supported"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype not supported"),
        ({"device_capability": DeviceCapability(8, 0)}, "compute capability not supported"),
        ({"device_capability": DeviceCapability(10, 0)}, "compute capability not supported"),
        ({"block_size": 8}, "block_size not supported"),
        ({"use_mla": True}, "MLA not supported"),
    ],
)
def test_validate_configuration(override, reason):
    reasons = BitDecodeAttentionBackend.validate_configuration(**{**GOOD, **override})
    assert reasons == ([] if reason is None else [reason])


def test_start_up_log_lines_go_through_vllms_logger():
    """The plugin's INFO lines (sparse mode's layer plan) reach vLLM's handler: a logger
    outside the "vllm" tree would print nothing below WARNING in a vLLM process."""
    import logging

    from vllm_bitdecode.backend import metadata

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    vllm_logger = logging.getLogger("vllm")
    handler = Keep(level=logging.INFO)
    vllm_logger.addHandler(handler)
    try:
        metadata.logger.info("BITDECODE probe %d", 7)
    finally:
        vllm_logger.removeHandler(handler)
    assert seen == ["BITDECODE probe 7"]


# ---------------------------------------------------------------- allowed-token masks


def _request(req_id: str, allowed: list[int] | None):
    from vllm import SamplingParams
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    return CachedRequestState(
        req_id=req_id, prompt_token_ids=[1, 2, 3], mm_features=[],
        sampling_params=SamplingParams(allowed_token_ids=allowed), generator=None,
        block_ids=([],), num_computed_tokens=0, output_token_ids=[])


@pytest.mark.parametrize("allowed", [([5], [7]), ([5], None), ([3, 4], [9]), (None, None)],
                         ids=["both-forced", "one-forced", "sets", "neither"])
def test_reordering_swaps_allowed_token_masks(allowed):
    """vLLM's reorder for decode-first backends (ours included) swaps two requests'
    states; each must keep its own allowed-token mask (vLLM 0.20 copies one over the
    other: vllm-project/vllm#48419), and swapping back restores the first order."""
    from vllm.v1.worker.gpu_input_batch import InputBatch

    vocab = 16
    batch = InputBatch(max_num_reqs=4, max_model_len=32, max_num_batched_tokens=32,
                       device=torch.device("cpu"), pin_memory=False, vocab_size=vocab,
                       block_sizes=[16], kernel_block_sizes=[16])
    for i, ids in enumerate(allowed):
        batch.add_request(_request(f"r{i}", ids))
    batch.add_request(_request("r2", [1]))  # a third row that must stay as it is

    def mask_of(req_id: str) -> torch.Tensor:
        return batch.allowed_token_ids_mask_cpu_tensor[batch.req_id_to_index[req_id]].clone()

    before = {r: mask_of(r) for r in ("r0", "r1", "r2")}
    for ids, r in zip(allowed, ("r0", "r1"), strict=True):  # the mask hides what is not allowed
        assert before[r].sum() == (vocab - len(ids) if ids else 0)
    batch.swap_states(0, 1)
    assert batch.req_ids[:3] == ["r1", "r0", "r2"]
    for r in before:
        assert torch.equal(mask_of(r), before[r]), r
    batch.swap_states(1, 0)
    assert batch.req_ids[:3] == ["r0", "r1", "r2"]
    for r in before:
        assert torch.equal(mask_of(r), before[r]), r


def test_streaming_input_wrapper_refuses_only_bitdecode_channel_mode():
    """patch_streaming_input on a stand-in engine class: a request reaches the original
    unless the engine's config asks for BITDECODE in per-channel K mode, where the wrapper
    raises the config's one-line ValueError. Idempotent."""
    import asyncio
    import types

    from vllm_bitdecode import _registration, config

    class Engine:
        async def _add_streaming_input_request(self, request_id, *args, **kwargs):
            return request_id

    _registration.patch_streaming_input(Engine)
    _registration.patch_streaming_input(Engine)
    assert not getattr(Engine._add_streaming_input_request.__wrapped__, "_bitdecode", False)

    def engine(backend, settings):
        e = Engine()
        e.vllm_config = types.SimpleNamespace(
            attention_config=types.SimpleNamespace(backend=backend),
            additional_config={"bitdecode": settings})
        return e

    from vllm_bitdecode._registration import _backend_member

    channel = {"bits": 4, "k_mode": "channel"}
    assert asyncio.run(engine(_backend_member(), {"bits": 4})
                       ._add_streaming_input_request("a")) == "a"
    assert asyncio.run(engine(None, channel)._add_streaming_input_request("b")) == "b"
    with pytest.raises(config.BitDecodeConfigError, match="streaming-input"):
        asyncio.run(engine(_backend_member(), channel)._add_streaming_input_request("c"))


@pytest.mark.parametrize(("found", "ok"), [("0.20.0", True), ("0.20.0+cu130", True),
                                           ("0.20.0.dev3", True), ("0.20.1", False),
                                           ("0.21.0", False), ("garbage", False)])
def test_another_vllm_version_gets_no_wrappers(monkeypatch, found, ok):
    """Under another vLLM, register() installs nothing (vLLM runs it in every engine's
    processes, and a renamed private method would break engines that never asked for
    BITDECODE) and says why, once, as an error."""
    import vllm

    import vllm_bitdecode
    from vllm_bitdecode import _registration

    monkeypatch.setattr(vllm, "__version__", found)
    monkeypatch.setattr(_registration, "_UNSUPPORTED_SAID", [])
    errors: list[str] = []
    monkeypatch.setattr(_registration, "_logger",
                        lambda: type("L", (), {"error": staticmethod(errors.append)}))
    installed: list[str] = []
    monkeypatch.setattr(_registration, "register_backend_enum",
                        lambda *a: installed.append("enum"))
    for name in ("patch_kv_cache_spec", "patch_cli_help", "patch_engine_config",
                 "patch_allowed_token_mask_swap", "patch_layer_backend_check",
                 "patch_forced_preemption_report"):
        monkeypatch.setattr(_registration, name, lambda name=name: installed.append(name))
    vllm_bitdecode.register()
    vllm_bitdecode.register()
    assert bool(installed) == ok
    assert len(installed) == (14 if ok else 0)  # 7 steps, twice
    assert len(errors) == (0 if ok else 1)  # said once
    if not ok:
        assert f"this is vLLM {found}" in errors[0] and "vllm==0.20.0" in errors[0]


def test_register_patches_heavy_modules_when_they_are_imported_not_before():
    """register() runs in every vLLM process, the API server's and `vllm serve --help`'s
    included: it imports neither vLLM's attention layer module nor the KV-cache managers
    (2.2 s and about 900 modules on the CPU machine), and patches them once something
    imports them, as a process that builds a model does."""
    import subprocess
    import sys

    code = """
import sys
import vllm_bitdecode
from vllm_bitdecode import _registration as r
vllm_bitdecode.register()
vllm_bitdecode.register()  # (as an unpickling of the member does): each patch pending once
assert all(len(set(fns)) == len(fns) for fns in r._PENDING.values()), r._PENDING
heavy = (r.ATTENTION_MODULE, r.KV_MANAGER_MODULE)
assert not any(m in sys.modules for m in heavy), [m for m in heavy if m in sys.modules]
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.core import single_type_kv_cache_manager as managers
from vllm_bitdecode.backend.spec import BitDecodeAttentionSpec
assert getattr(Attention.__init__, "_bitdecode", False)
assert getattr(Attention.get_kv_cache_spec, "_bitdecode", False)
assert managers.spec_manager_map[BitDecodeAttentionSpec] is managers.FullAttentionManager
vllm_bitdecode.register()  # again, with the modules imported: nothing wrapped twice
assert not getattr(Attention.__init__.__wrapped__, "_bitdecode", False)
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=str(Path(__file__).resolve().parents[2]))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
