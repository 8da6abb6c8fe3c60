"""How BITDECODE gets into vLLM 0.20 without forking it. Every step is idempotent, and
the steps that wrap a class of a heavy vLLM module (the attention layer, the KV-cache
managers, the input batch, the scheduler) wait until something imports it
(:func:`when_imported`): vLLM runs ``register`` in every process, the API server's and
``vllm serve --help``'s too, which until 2026-12-05 it cost about 700 modules and 1 s.

1. ``AttentionBackendEnum`` is a closed Enum, and vLLM resolves a layer's backend by
   ``AttentionBackendEnum[backend.get_name()]``. A real member named BITDECODE (value:
   our class path) makes the CLI string, ``LLM(attention_backend="BITDECODE")``, the
   config validator and that lookup all work unchanged. (The ``CUSTOM`` slot would make
   users type CUSTOM, and logs would say CUSTOM.) The member pickles by name through
   this module, so a process that has not loaded plugins yet can still unpickle it.
2. ``Attention.get_kv_cache_spec`` builds a ``FullAttentionSpec`` from the bf16 head
   size, which would size pages for bf16. For layers whose backend is BITDECODE it now
   returns :class:`BitDecodeAttentionSpec`, whose page size is the packed page's.
   ``--kv-cache-dtype`` stays ``auto``: the bit width comes from ``--additional-config``.
   The scheduler picks a block manager by the exact spec type, so the spec is mapped
   to vLLM's ``FullAttentionManager`` (prefix caching, preemption: unchanged).
3. ``--attention-backend`` has no choices list in vLLM's help; the help text gains the
   list of backend names, BITDECODE included.
4. ``EngineArgs.create_engine_config`` (``vllm serve``, ``LLM(...)``, ``vllm bench``)
   checks the settings and the model against BITDECODE as soon as the config exists, in
   the process the user started: a bad setting fails there, with one line, before any
   worker starts or takes GPU memory. The layers check again when they are built (the
   properties only a layer knows: ALiBi, soft-capping, sinks, KV sharing, V head size).
   A setting that runs but was measured to cost much accuracy (2-bit K per token) gets
   one warning line there (``config.accuracy_warnings``), and so does per-channel K's
   residual when it is large (``config.memory_warnings``).
5. BITDECODE, like FlashInfer, has vLLM put a step's decodes first in the batch
   (``reorder_batch_threshold``), and vLLM 0.20's ``InputBatch.swap_states`` swaps the
   two rows of the ``allowed_token_ids`` mask through views of them, so both rows end
   up holding the second request's mask (vllm-project/vllm#48419, open): one request
   then samples from the other's allowed tokens. Seen on the H200 with speculative
   decoding and prefix caching (the forced-token job of
   tests/gpu/test_spec_decode.py), and reachable in any serving run whose new request
   takes a freed slot ahead of running decodes. The wrapper copies both rows first and
   writes them back swapped, which is right with or without vLLM's fix.
6. Some models choose a layer's backend themselves and pass it to ``Attention``
   (vLLM 0.20: MiMo-V2-Flash's layers whose V head size differs, openPangu's sink
   layers). Under ``--attention-backend BITDECODE`` such a layer would run that backend
   on bf16 pages, silently. ``Attention.__init__`` now refuses it when the layer is
   built, naming the layer and its backend. Wrappers vLLM makes of BITDECODE itself
   (static sinks, chunked local attention) keep its name and pass here; they are
   refused where their property is.
7. A streaming-input request to ``AsyncLLM`` (an async generator of inputs: a session
   that waits for its next chunk between generations) is refused in per-channel K mode
   with a ValueError for that request (a 400 through the server), before it reaches the
   engine: waiting, it would hold one of the residual slots that running requests need
   (``config.check_streaming_input``), and the worker would run out of slots. Patched
   when a channel-mode config is made (step 4), where the requests arrive.
8. ``Scheduler.reset_prefix_cache(reset_running_requests=True)`` (vLLM pausing or
   sleeping with ``mode="keep"``) preempts every running request outside ``schedule()``,
   and the next ``SchedulerOutput.preempted_req_ids`` does not name them, so in
   per-channel K mode their residual slots stayed taken until they resumed, which
   priority scheduling may put after new requests: the worker then ran out of slots. The
   scheduler of a channel-mode engine now names them in the next output's
   ``preempted_req_ids`` (vLLM's V1 model runner does not read that field; the residual
   slot table does). Other engines' outputs are left as vLLM makes them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_bitdecode.config import BitDecodeConfig

_MARK = "_bitdecode"  # set on every wrapper installed here


def wrap_once(cls: type, name: str, *, static: bool = False) -> Callable[[Callable], Any]:
    """Decorator: replace ``cls.<name>`` by the decorated function, which takes vLLM's
    original as its first argument. Once only: the wrapper is marked, and a class whose
    method already carries the mark (a second ``register()``, another engine, a
    subclass that inherits it) is left as it is. ``static`` for a staticmethod.

        @wrap_once(InputBatch, "swap_states")
        def swap_states(original, self, i1, i2): ...
    """

    def install(fn: Callable) -> Any:
        original = getattr(cls, name)
        if getattr(original, _MARK, False):
            return original
        if inspect.iscoroutinefunction(fn):

            async def wrapper(*args, **kwargs):
                return await fn(original, *args, **kwargs)
        else:

            def wrapper(*args, **kwargs):
                return fn(original, *args, **kwargs)

        wrapper = functools.wraps(original)(wrapper)
        setattr(wrapper, _MARK, True)
        setattr(cls, name, staticmethod(wrapper) if static else wrapper)
        return wrapper

    return install


def vllm_supported(required: str) -> bool:
    """Whether the running vLLM is release ``required`` (local and dev suffixes aside);
    if not, says so once, as an error."""
    import vllm
    from packaging.version import InvalidVersion, Version

    found = getattr(vllm, "__version__", "unknown")
    try:
        ok = Version(found).release[:3] == Version(required).release[:3]
    except InvalidVersion:
        ok = False
    if not ok and not _UNSUPPORTED_SAID:
        _UNSUPPORTED_SAID.append(found)
        _logger().error(
            f"vllm-bitdecode supports vLLM {required} only, and this is vLLM {found}: the "
            f"BITDECODE backend is not registered (other backends run as without the "
            f"plugin); install vllm=={required}, or uninstall vllm-bitdecode")
    return ok


_UNSUPPORTED_SAID: list[str] = []


def register_backend_enum(name: str, class_path: str) -> Enum:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = add_enum_member(AttentionBackendEnum, name, class_path)
    # vLLM pickles its config into the engine-core process, which unpickles it before it
    # loads plugins: by value the member would not exist there yet. Unpickling through
    # _backend_member registers the plugin first.
    member.__reduce_ex__ = _reduce_backend_member
    return member


def _reduce_backend_member(protocol: int):
    return (_backend_member, ())


def _backend_member() -> Enum:
    import vllm_bitdecode

    vllm_bitdecode.register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[vllm_bitdecode.BACKEND_NAME]


def add_enum_member(enum_cls: type[Enum], name: str, value: str) -> Enum:
    """Append a member to an existing Enum class (no-op if it is already there)."""
    existing = enum_cls._member_map_.get(name)
    if existing is not None:
        if existing.value != value:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with {existing.value!r}")
        return existing
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)
    return member


def _is_bitdecode(attn_backend: object) -> bool:
    from vllm_bitdecode import BACKEND_NAME

    get_name = getattr(attn_backend, "get_name", None)
    return get_name is not None and get_name() == BACKEND_NAME


# vLLM's modules whose classes the patches wrap are heavy to import (the attention layer
# and the KV-cache managers: 2.2 s and 900 modules on the CPU machine) and not needed by
# processes that build no engine (the API server, `vllm serve --help`): they are patched
# when something first imports them, not imported here.
ATTENTION_MODULE = "vllm.model_executor.layers.attention.attention"
KV_MANAGER_MODULE = "vllm.v1.core.single_type_kv_cache_manager"
_PENDING: dict[str, list[Callable[[Any], None]]] = {}


def when_imported(module_name: str, fn: Callable[[Any], None]) -> None:
    """``fn(module)`` now if ``module_name`` is imported, else right after its first
    import finishes (a finder at the front of ``sys.meta_path`` wraps that module's
    loader, then steps aside)."""
    import sys

    module = sys.modules.get(module_name)
    if module is not None:
        fn(module)
        return
    pending = _PENDING.setdefault(module_name, [])
    if fn not in pending:  # register() runs again at every unpickling of the enum member
        pending.append(fn)
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


class _PostImportFinder:
    """A ``sys.meta_path`` finder that finds nothing itself: for a module with pending
    patches it asks the other finders and wraps the found loader's ``exec_module``."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        import sys

        if name not in _PENDING:
            return None
        spec = None
        for finder in sys.meta_path:  # the spec the import would have found without us
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module: Any) -> None:
            exec_module(module)
            for fn in _PENDING.pop(name, []):
                fn(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def patch_kv_cache_spec() -> None:
    when_imported(KV_MANAGER_MODULE, _map_spec_to_manager)
    when_imported(ATTENTION_MODULE, _patch_get_kv_cache_spec)


def _map_spec_to_manager(managers: Any) -> None:
    from vllm_bitdecode.backend.spec import BitDecodeAttentionSpec

    managers.spec_manager_map.setdefault(BitDecodeAttentionSpec, managers.FullAttentionManager)


def _patch_get_kv_cache_spec(attention: Any) -> None:
    from vllm_bitdecode.backend.spec import BitDecodeAttentionSpec

    @wrap_once(attention.Attention, "get_kv_cache_spec")
    def get_kv_cache_spec(original, self, vllm_config):
        spec = original(self, vllm_config)
        if spec is None or not _is_bitdecode(self.attn_backend):
            return spec
        from vllm_bitdecode import config

        cfg = config.check_vllm_config(vllm_config)
        head_size_v = getattr(self, "head_size_v", self.head_size)
        if head_size_v != self.head_size:
            raise config.BitDecodeConfigError(
                f"V head size {head_size_v} differs from K head size {self.head_size}: "
                "BITDECODE pages hold K and V of one head size (model type)"
            )
        return BitDecodeAttentionSpec(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size,
            dtype=_uint8(),
            bits=cfg.bits,
            group_size=cfg.group_size,
            k_mode=cfg.k_mode,
            k_param_bits=cfg.k_param_bits,
        )


def _uint8():
    import torch

    return torch.uint8


def patch_cli_help() -> None:
    from vllm.engine.arg_utils import EngineArgs

    @wrap_once(EngineArgs, "add_cli_args", static=True)
    def add_cli_args(original, parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        names = ", ".join(m for m in AttentionBackendEnum.__members__ if m != "CUSTOM")
        for action in parser._actions:
            if "--attention-backend" in action.option_strings:
                action.help = (action.help or "Attention backend to use.") + (
                    f"\n\nChoices: auto, {names}"
                )
        return parser


def patch_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    @wrap_once(EngineArgs, "create_engine_config")
    def create_engine_config(original, self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        from vllm_bitdecode import config

        if _asks_for_bitdecode(vllm_config):
            cfg = config.check_vllm_config(vllm_config)
            if cfg.channel_k:
                patch_streaming_input()
            for line in (*config.accuracy_warnings(cfg),
                         *config.memory_warnings(cfg, vllm_config)):
                _logger().warning(line)
        elif _has_bitdecode_section(getattr(vllm_config, "additional_config", None)):
            # settings for a backend that will not run: say so rather than serve another
            # cache quietly (another backend is a choice, so a warning, not an error)
            backend = getattr(_chosen_backend(vllm_config), "name", None)
            _logger().warning(
                f"BITDECODE: --additional-config has a '{config.CONFIG_KEY}' section, but "
                f"the attention backend is {backend or 'left to vLLM'}: the section is "
                "ignored and the KV cache is not BITDECODE's (add --attention-backend "
                "BITDECODE to use it)")
        return vllm_config


def _has_bitdecode_section(additional_config: object) -> bool:
    # vLLM's additional_config may also be an object with compute_hash(), not a dict
    from collections.abc import Mapping

    from vllm_bitdecode import config

    return isinstance(additional_config, Mapping) and config.CONFIG_KEY in additional_config


def _logger():
    from vllm.logger import init_logger

    # under vllm's logger tree: a logger outside it prints nothing below WARNING in vLLM
    return init_logger(f"vllm.{__name__}")


def patch_layer_backend_check() -> None:
    when_imported(ATTENTION_MODULE, _patch_attention_init)


def _patch_attention_init(attention: Any) -> None:
    @wrap_once(attention.Attention, "__init__")
    def __init__(original, self, *args, **kwargs):
        # a backend the model passes is refused before vLLM builds its impl (whose own
        # checks would otherwise speak first); any other way to it, after
        chosen = kwargs.get("attn_backend")
        if chosen is not None:
            _check_layer_backend(kwargs.get("prefix", ""), chosen)
        original(self, *args, **kwargs)
        _check_layer_backend(self.layer_name, self.attn_backend)


def _check_layer_backend(layer_name: str, attn_backend: object) -> None:
    from vllm.config import get_current_vllm_config_or_none

    # the config the layers are being built under
    if _is_bitdecode(attn_backend) or not _asks_for_bitdecode(get_current_vllm_config_or_none()):
        return
    from vllm_bitdecode import BACKEND_NAME, config

    raise config.BitDecodeConfigError(
        f"layer {layer_name} runs attention backend {attn_backend.get_name()}, which the "
        f"model chooses itself, not the {BACKEND_NAME} that --attention-backend asked for "
        "(model type); serve this model with another --attention-backend"
    )


def _chosen_backend(vllm_config: object) -> object:
    """The attention backend a vLLM config (or None) names; None where vLLM chooses."""
    return getattr(getattr(vllm_config, "attention_config", None), "backend", None)


def _asks_for_bitdecode(vllm_config: object) -> bool:
    """Whether a vLLM config (or None) asks for BITDECODE as its attention backend."""
    return _is_bitdecode_member(_chosen_backend(vllm_config))


def _is_bitdecode_member(backend: object) -> bool:
    from vllm_bitdecode import BACKEND_NAME

    return getattr(backend, "name", None) == BACKEND_NAME


def patch_allowed_token_mask_swap() -> None:
    when_imported("vllm.v1.worker.gpu_input_batch", _patch_swap_states)


def _patch_swap_states(gpu_input_batch: Any) -> None:
    @wrap_once(gpu_input_batch.InputBatch, "swap_states")
    def swap_states(original, self, i1: int, i2: int) -> None:
        mask = self.allowed_token_ids_mask_cpu_tensor  # [max_num_reqs, vocab] bool or None
        ids = self._req_ids
        if mask is not None and not any(  # rows of requests without a mask are all False
                i < len(ids) and ids[i] in self.has_allowed_token_ids for i in (i1, i2)):
            mask = None  # (a copy of a [2, vocab] row pair costs 15-30 us at vocab 152K)
        rows = None if mask is None else mask[[i1, i2]]  # a copy: indexing with a list
        original(self, i1, i2)
        if rows is not None:
            mask[[i2, i1]] = rows


def patch_streaming_input(engine_cls: type | None = None) -> None:
    """Make ``engine_cls._add_streaming_input_request`` (vLLM's ``AsyncLLM`` by default,
    which ``add_request`` calls for an async generator of inputs) refuse the request when
    the engine's BITDECODE settings cannot serve it. Idempotent. Called from
    ``create_engine_config`` for settings that refuse such requests, in the process that
    builds the engine's config (the API server, each of them with --api-server-count, or
    a user's script): the workers, which never take requests, are spared its import."""
    if engine_cls is None:
        from vllm.v1.engine.async_llm import AsyncLLM as engine_cls
    @wrap_once(engine_cls, "_add_streaming_input_request")
    async def _add_streaming_input_request(original, self, *args, **kwargs):
        settings = bitdecode_settings(getattr(self, "vllm_config", None))
        if settings is not None:
            from vllm_bitdecode import config

            config.check_streaming_input(settings)
        return await original(self, *args, **kwargs)


def patch_forced_preemption_report(scheduler_cls: type | None = None) -> None:
    """Step 8: make ``scheduler_cls`` (vLLM's ``Scheduler`` by default, which its
    ``AsyncScheduler`` extends) report the requests that ``reset_prefix_cache`` preempted
    in its next ``schedule()`` output, for per-channel K engines. Idempotent. vLLM's own
    is patched when its module is first imported (the engine core's process)."""
    if scheduler_cls is None:
        when_imported("vllm.v1.core.sched.scheduler", _patch_vllm_scheduler)
        return

    @wrap_once(scheduler_cls, "reset_prefix_cache")
    def reset_prefix_cache(original, self, reset_running_requests: bool = False, *args,
                           **kwargs):
        if reset_running_requests and _reports_forced_preemption(self):
            self.__dict__.setdefault("_bitdecode_forced_preempted", set()).update(
                request.request_id for request in self.running)
        return original(self, reset_running_requests, *args, **kwargs)

    @wrap_once(scheduler_cls, "schedule")
    def schedule(original, self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        forced = self.__dict__.pop("_bitdecode_forced_preempted", None)
        if forced:
            output.preempted_req_ids = (output.preempted_req_ids or set()) | forced
        return output


def _patch_vllm_scheduler(module: Any) -> None:
    patch_forced_preemption_report(module.Scheduler)


def _reports_forced_preemption(scheduler: object) -> bool:
    """Whether a scheduler's engine runs BITDECODE with per-channel K (remembered)."""
    known = scheduler.__dict__.get("_bitdecode_channel_k")
    if known is None:
        settings = bitdecode_settings(getattr(scheduler, "vllm_config", None))
        known = scheduler.__dict__["_bitdecode_channel_k"] = (
            settings is not None and settings.channel_k)
    return known


def bitdecode_settings(vllm_config: object) -> BitDecodeConfig | None:
    """The ``bitdecode`` settings of an engine config that asks for the backend (None
    for another backend or no config), parsed as start-up parsed them."""
    if not _asks_for_bitdecode(vllm_config):
        return None
    from vllm_bitdecode import config

    return config.BitDecodeConfig.from_additional_config(
        getattr(vllm_config, "additional_config", None))
