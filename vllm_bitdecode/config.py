"""The ``bitdecode`` settings, read once from vLLM's ``--additional-config``.

    vllm serve MODEL --attention-backend BITDECODE \\
        --additional-config '{"bitdecode": {"bits": 4, "group_size": 64}}'

(2 bits keep quality only with K per channel: ``{"bits": 2, "k_mode": "channel",
"group_size": 32}`` and ``--block-size 128``; accuracy_warnings says so at start-up.)

Sparse decode (issue #6, docs/sparse-mode-design.md) is a nested section:

    {"bitdecode": {"bits": 4, "sparse": {"enabled": true, "token_budget": 2048}}}

Every problem is reported as :class:`BitDecodeConfigError` with one line naming the
setting, at start-up, before the KV cache or the model weights take GPU memory.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from vllm_bitdecode import page_format

CONFIG_KEY = "bitdecode"


class BitDecodeConfigError(ValueError):
    """A setting or a model property that BITDECODE cannot serve."""


def _section(raw: Any, cls: type, where: str, keys_where: str) -> dict[str, Any]:
    """``raw`` as the keyword arguments of dataclass ``cls``, or one error line naming
    ``where`` (not a dict) or ``keys_where`` (unknown keys)."""
    if not isinstance(raw, Mapping):
        raise BitDecodeConfigError(f"{where} must be a dict, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=repr)  # keys of any type, from the Python API
    if unknown:
        raise BitDecodeConfigError(
            f"unknown {keys_where} setting(s) {_shown(unknown)}; valid settings are "
            f"{sorted(known)}"
        )
    return dict(raw)


def _check_section_name(additional_config: Mapping[str, Any], settings: set[str]) -> None:
    """Settings meant for BITDECODE but not under its key would otherwise leave the
    defaults in place without a word. Other top-level keys are other plugins' and pass;
    refused: the key in another case, and, where there is no ``bitdecode`` section,
    BITDECODE settings at the top level (the nesting forgotten) or a key a typo away."""
    example = f"--additional-config '{{\"{CONFIG_KEY}\": {{\"bits\": 2}}}}'"
    keys = [k for k in additional_config if isinstance(k, str) and k != CONFIG_KEY]
    for key in keys:
        if key.lower() == CONFIG_KEY:
            raise BitDecodeConfigError(
                f"additional_config has a {key!r} section: BITDECODE reads "
                f"'{CONFIG_KEY}' (lower case), e.g. {example}")
    if CONFIG_KEY in additional_config:
        return
    flat = sorted(k for k in keys if k in settings)
    if flat:
        raise BitDecodeConfigError(
            f"additional_config has BITDECODE setting(s) {flat} at its top level; they go "
            f"in a '{CONFIG_KEY}' section, e.g. {example}")
    # typos ("bitdecod", "bit_decode", "bitdecoding", "bit-decode-config"), not a
    # similar word of another plugin's ("decode" scores 0.8)
    def near_miss(key: str) -> bool:
        bare = key.lower().replace("_", "").replace("-", "")
        return (bare.startswith(CONFIG_KEY[:-1])
                or difflib.SequenceMatcher(None, bare, CONFIG_KEY).ratio() >= 0.85)

    near = [k for k in keys if near_miss(k)]
    if near:
        raise BitDecodeConfigError(
            f"additional_config has a section {near[0]!r} and none named '{CONFIG_KEY}': "
            f"BITDECODE reads '{CONFIG_KEY}', e.g. {example}")


# Integer settings end up in the kernels' int32 lengths; layer indices past any model's
# depth are refused before a plan is built over them (a plan walks every index below).
MAX_INT_SETTING = 2**31 - 1
MAX_LAYER_INDEX = 1023


def _shown(value: object, limit: int = 80) -> str:
    """``repr`` for an error line: cut short, and an int too long for Python to print
    (more than 4300 digits) named by its size."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _unsupported(where: str, value: object, allowed: object) -> BitDecodeConfigError:
    return BitDecodeConfigError(f"{where}={_shown(value)} is not supported; allowed: {allowed}")


def _int_in(value: object, low: int, high: int = MAX_INT_SETTING) -> bool:
    """An int (not a bool) within [low, high]."""
    return type(value) is int and low <= value <= high


# ---- sparse decode (issue #6) -----------------------------------------------------------
SPARSE_KEY = "sparse"
AUTO = "auto"
GRANULARITIES = ("token", "page")  # what a selection layer picks
PAGE_TOKENS = page_format.TILE_TOKENS  # a selected page is one tile, at any block size

# Layer roles in sparse mode (see docs/sparse-mode-design.md).
DENSE = "dense"  # full attention, selects nothing
SELECT = "selection"  # full attention, and writes the top-k positions for the layers after it
REUSE = "reuse"  # attends only to the positions the last selection layer wrote

# TidalDecode's defaults: full attention in layers 0 and 1, token selection at layer 2, and
# one re-selection ("correction") layer, layer 13 of Llama-3-8B's 32, the default of the
# paper's code. For other depths the correction layer sits at the same relative depth.
FIRST_SELECTION_LAYER = 2
CORRECTION_LAYER_FRACTION = (13, 32)


def auto_selection_layers(num_layers: int) -> tuple[int, ...]:
    """TidalDecode's selection layers for a model of ``num_layers`` layers: layer 2 and,
    where at least one reuse layer fits on each side of it, the correction layer."""
    num, den = CORRECTION_LAYER_FRACTION
    middle = num_layers * num // den
    if FIRST_SELECTION_LAYER + 2 <= middle < num_layers - 1:
        return (FIRST_SELECTION_LAYER, middle)
    return (FIRST_SELECTION_LAYER,)


@dataclasses.dataclass(frozen=True)
class SparseLayerPlan:
    """The role of every layer of one model in sparse mode."""

    num_layers: int
    dense: tuple[int, ...]
    selection: tuple[int, ...]
    reuse: tuple[int, ...]

    def role(self, layer: int) -> str:
        if not 0 <= layer < self.num_layers:
            raise BitDecodeConfigError(
                f"layer {layer} is outside the model's {self.num_layers} layers"
            )
        if layer in self.selection:
            return SELECT
        return DENSE if layer in self.dense else REUSE

    def check_layers(self, layer_names: Iterable[str]) -> None:
        """Start-up check of the attention layers one metadata builder serves (one
        KV-cache group): each has its model layer index in its name, inside the model,
        and where the group has reuse layers it also has the first selection layer and
        the selection layer whose positions each reads, the last one before it (the
        layers resolve their roles only at the first decode, which without full CUDA
        graphs is the first request's)."""
        indices = {layer_index(name) for name in layer_names}
        for i in sorted(indices):
            self.role(i)
        if any(i in self.reuse for i in indices) and self.selection[0] not in indices:
            raise BitDecodeConfigError(
                f"the attention layers {sorted(indices)} share a KV-cache group without "
                f"the first selection layer ({self.selection[0]}), whose positions their "
                "reuse layers read; sparse mode needs every attention layer in one group"
            )
        # each reuse layer reads the last selection before it (a correction layer's, past
        # it): from this group's buffers, so that layer must be here too
        for i in sorted(indices.intersection(self.reuse)):
            source = max(s for s in self.selection if s < i)
            if source not in indices:
                raise BitDecodeConfigError(
                    f"reuse layer {i} reads the positions of selection layer {source}, "
                    "which is in another KV-cache group; sparse mode needs every attention "
                    "layer in one group"
                )


def layer_index(layer_name: str) -> int:
    """The model layer of an attention layer, the one integer in its name (as vLLM's
    ``extract_layer_index`` reads it: "model.layers.7.self_attn.attn" -> 7)."""
    ints = [int(part) for part in layer_name.split(".") if part.isdigit()]
    if len(ints) != 1:
        raise BitDecodeConfigError(
            f"{CONFIG_KEY}.{SPARSE_KEY} sets each layer's role by its index, but the "
            f"attention layer name {layer_name!r} has {len(ints)} integers, not one"
        )
    return ints[0]


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """``bitdecode.sparse``: TidalDecode-style top-k decode over the quantized pages."""

    enabled: bool = False
    """Sparse decode on or off. A section that sets anything must say which."""
    token_budget: int = 2048
    """k: tokens per request (and KV head) that the reuse layers attend to, the newest
    token included."""
    selection_layers: tuple[int, ...] | str = AUTO
    """Layers that run full attention and select the top-k positions. "auto": layer 2
    and a correction layer at 13/32 of the depth (layer 13 of 32)."""
    dense_layers: tuple[int, ...] | str = AUTO
    """Layers that run full attention without selecting. "auto": every layer before the
    first selection layer. Every other layer reuses the last selection."""
    shared_selection: bool = False
    """One top-k set per request for all KV heads instead of one per KV head."""
    granularity: str = "page"
    """What the selection layers pick: "page" (16-token pages, each scored by its best
    token, read whole by the reuse layers; the token budget must be a multiple of 16) or
    "token" (TidalDecode: single positions, any budget). Pages are the default: on an
    H200 their selection and reuse layers are faster and their retrieval the same
    (docs/sparse-mode-design.md compares them)."""
    min_seq_len: int | None = None
    """Requests with fewer tokens than this decode densely in every layer.
    None: twice the token budget."""

    @classmethod
    def from_raw(cls, raw: Any) -> SparseConfig:
        where = f"{CONFIG_KEY}.{SPARSE_KEY}"
        raw = _section(raw, cls, where, where)
        if raw and "enabled" not in raw:
            raise BitDecodeConfigError(
                f"{where} sets {sorted(raw)} but not 'enabled'; add \"enabled\": true "
                "(or false)"
            )
        return cls(**raw)

    def __post_init__(self) -> None:
        # every SparseConfig is a checked one, however it was made
        for name in ("selection_layers", "dense_layers"):
            object.__setattr__(self, name, _layer_list(name, getattr(self, name)))
        self._check_values()

    @property
    def selection_unit(self) -> int:
        """Tokens per selected unit: 1, or 16 with page granularity."""
        return PAGE_TOKENS if self.granularity == "page" else 1

    @property
    def unit_budget(self) -> int:
        """The budget in selected units (positions or pages)."""
        return self.token_budget // self.selection_unit

    @property
    def dense_below(self) -> int:
        """Requests shorter than this decode densely (``min_seq_len`` resolved)."""
        return 2 * self.token_budget if self.min_seq_len is None else self.min_seq_len

    def _check_values(self) -> None:
        def bad(name: str, allowed: object) -> BitDecodeConfigError:
            return _unsupported(f"{CONFIG_KEY}.{SPARSE_KEY}.{name}", getattr(self, name),
                                allowed)

        if not isinstance(self.enabled, bool):
            raise bad("enabled", [True, False])
        if not _int_in(self.token_budget, 1):
            raise bad("token_budget", f"an integer > 0 (at most {MAX_INT_SETTING})")
        if not isinstance(self.shared_selection, bool):
            raise bad("shared_selection", [True, False])
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", list(GRANULARITIES))
        if self.granularity == "page" and self.token_budget % PAGE_TOKENS:
            raise bad("token_budget", f"a multiple of {PAGE_TOKENS} with granularity 'page' "
                      "(the default), or any budget with \"granularity\": \"token\"")
        if self.min_seq_len is not None:
            # below token_budget is allowed (the start-up log warns): rows no longer than
            # the budget keep every position, which is dense attention by another path
            if not _int_in(self.min_seq_len, 1):
                raise bad("min_seq_len", f"an integer > 0 (at most {MAX_INT_SETTING}), or null")
        # what can be checked without the model's depth
        if self.selection_layers != AUTO and self.dense_layers != AUTO:
            self._layer_roles(None)

    def layer_plan(self, num_layers: int) -> SparseLayerPlan:
        """Resolve the layer roles for a model of ``num_layers`` layers (at start-up)."""
        return self._layer_roles(num_layers)

    def _layer_roles(self, num_layers: int | None) -> SparseLayerPlan:
        where = f"{CONFIG_KEY}.{SPARSE_KEY}"
        if self.selection_layers == AUTO:
            assert num_layers is not None
            if num_layers < FIRST_SELECTION_LAYER + 2:
                raise BitDecodeConfigError(
                    f"{where}: the model has {num_layers} layers; the default layer plan "
                    f"(dense 0-{FIRST_SELECTION_LAYER - 1}, selection "
                    f"{FIRST_SELECTION_LAYER}, reuse after it) needs at least "
                    f"{FIRST_SELECTION_LAYER + 2}"
                )
            selection = auto_selection_layers(num_layers)
        else:
            selection = tuple(sorted(self.selection_layers))
        first = selection[0]
        if self.dense_layers == AUTO:
            dense = tuple(range(first))
        else:
            dense = tuple(sorted(self.dense_layers))
        if num_layers is not None:
            for name, layers in (("selection_layers", selection), ("dense_layers", dense)):
                beyond = [i for i in layers if i >= num_layers]
                if beyond:
                    raise BitDecodeConfigError(
                        f"{where}.{name} has layer(s) {_shown(beyond)} beyond the model's depth "
                        f"({num_layers} layers: 0-{num_layers - 1})"
                    )
        both = sorted(set(dense) & set(selection))
        if both:
            raise BitDecodeConfigError(
                f"{where}: layer(s) {_shown(both)} are in both dense_layers and "
                "selection_layers"
            )
        early = [i for i in range(first) if i not in dense]
        if early:
            raise BitDecodeConfigError(
                f"{where}: layer(s) {_shown(early)} come before the first selection layer "
                f"({first}) "
                "and are not in dense_layers, so they would have no selection to reuse; "
                "add them to dense_layers"
            )
        if num_layers is None:
            return SparseLayerPlan(-1, dense, selection, ())
        reuse = tuple(i for i in range(num_layers) if i not in dense and i not in selection)
        if not reuse:
            raise BitDecodeConfigError(
                f"{where}: every one of the model's {num_layers} layers is a dense or "
                "selection layer, so sparse mode would read no fewer tokens; leave some "
                "layers out of dense_layers and selection_layers, or disable sparse"
            )
        return SparseLayerPlan(num_layers, dense, selection, reuse)


def _layer_list(name: str, value: Any) -> tuple[int, ...] | str:
    where = f"{CONFIG_KEY}.{SPARSE_KEY}.{name}"
    if value == AUTO:
        return AUTO
    if not isinstance(value, (list, tuple)):
        raise _unsupported(where, value, f"a list of layer indices or {AUTO!r}")
    for i in value:
        if not _int_in(i, 0, MAX_LAYER_INDEX):
            raise BitDecodeConfigError(
                f"{where} has {_shown(i)}; layer indices are integers >= 0 (0 is the "
                f"first layer) and at most {MAX_LAYER_INDEX}"
            )
    repeated = sorted(i for i, n in collections.Counter(value).items() if n > 1)
    if repeated:
        raise BitDecodeConfigError(f"{where} lists layer(s) {_shown(repeated)} more than once")
    if name == "selection_layers" and not value:
        raise BitDecodeConfigError(
            f"{where} is empty; sparse mode needs at least one selection layer"
        )
    return tuple(sorted(value))


# speculative methods whose drafts come without attention layers of their own
SPARSE_DRAFT_METHODS = frozenset({"ngram", "ngram_gpu", "suffix"})


def check_sparse_model(
    sparse: SparseConfig,
    *,
    num_layers: int,
    max_model_len: int | None = None,
    pipeline_parallel_size: int = 1,
    tensor_parallel_size: int = 1,
    attention_in_every_layer: bool = True,
    speculative_method: str | None = None,
    max_model_len_fitted: bool = False,
) -> SparseLayerPlan:
    """The start-up checks of sparse mode that need the model; returns its layer plan.
    ``max_model_len_fitted``: the length is what vLLM fitted to the KV cache
    (--max-model-len -1), settled after the memory profile."""
    where = f"{CONFIG_KEY}.{SPARSE_KEY}"
    if speculative_method is not None and speculative_method not in SPARSE_DRAFT_METHODS:
        # a drafter's attention layers run through this backend with the target's layer
        # plan: EAGLE's are numbered past the target's last layer, a draft model's
        # selection and reuse layers would follow a plan made for another model
        why = ("no test has run sparse mode beside it"
               if speculative_method in DRAFTERS_WITHOUT_ATTENTION
               else "the drafter's attention layers are not in the sparse layer plan")
        raise BitDecodeConfigError(
            f"{where} does not support speculative decoding with {speculative_method!r} "
            f"drafts ({why}); use one of {sorted(SPARSE_DRAFT_METHODS)} or disable sparse"
        )
    if not attention_in_every_layer:
        raise BitDecodeConfigError(
            f"{where} needs a model with attention in every layer (not hybrid, "
            "attention-free or with no-op layers): layer roles are set by layer index"
        )
    if pipeline_parallel_size > 1:
        raise BitDecodeConfigError(
            f"{where} does not support pipeline parallelism (--pipeline-parallel-size "
            f"{pipeline_parallel_size}): the selection is passed between layers inside "
            "one process"
        )
    if sparse.shared_selection and tensor_parallel_size > 1:
        raise BitDecodeConfigError(
            f"{where}.shared_selection=true needs all KV heads in one process, but "
            f"--tensor-parallel-size is {tensor_parallel_size}; use per-head selection "
            "(shared_selection: false)"
        )
    plan = sparse.layer_plan(num_layers)
    length = (f"--max-model-len -1 fitted the length to the KV cache: {max_model_len} tokens"
              if max_model_len_fitted else f"--max-model-len is {max_model_len}")
    if max_model_len is not None and sparse.dense_below > max_model_len:
        raise BitDecodeConfigError(
            f"{where}: sequences shorter than min_seq_len={sparse.dense_below} decode "
            f"densely, but {length}, so sparse decode would never run; lower min_seq_len / "
            "token_budget or disable sparse"
        )
    if max_model_len is not None and sparse.token_budget > max_model_len:
        # every row would keep all of its positions, and the per-row position buffers
        # (outside vLLM's KV budget) grow with the budget
        raise BitDecodeConfigError(
            f"{where}.token_budget={sparse.token_budget} is above the longest sequence "
            f"({length}): no sequence is long enough to leave a position out; lower "
            "token_budget or disable sparse"
        )
    return plan


# Per-token K prefill reads a longer context back in windows of about this many tokens
# (the prefill_window setting), so that its workspace does not grow with max_model_len:
# 64 MiB at 8 KV heads x 128 in bf16, where a whole 128K context took 512 MiB of KV cache.
PREFILL_WINDOW_TOKENS = 16384
MIN_PREFILL_WINDOW = page_format.LARGEST_BLOCK_SIZE  # a window starts on a page

# K modes (issue #7, docs/per-channel-k-design.md)
TOKEN_K = "token"
CHANNEL_K = "channel"
K_MODES = (TOKEN_K, CHANNEL_K)
# what per-channel pages store the K (scale, zc) in: bits of one parameter
K_PARAMS = {"fp16": 16, "fp8": 8}
# the largest page the per-channel write quantizes (kc_write_kernel.cuh)
MAX_CHANNEL_BLOCK_SIZE = 128


@dataclasses.dataclass(frozen=True)
class BitDecodeConfig:
    bits: int = 4
    """Code width of K and V: 4 or 2."""
    group_size: int = 128
    """Channels sharing one scale and zero point (per token): 32, 64 or 128."""
    rotate_k: bool = True
    """Rotate K and Q per head by a fixed randomized Hadamard transform before
    quantizing, which spreads outlier channels over the head (see docs/)."""
    sparse: SparseConfig = dataclasses.field(default_factory=SparseConfig)
    """TidalDecode-style sparse decode (off by default)."""
    k_mode: str = TOKEN_K
    """How K is quantized: "token" (per token and group of channels, like V) or "channel"
    (per channel over each page, the newest page kept exact in a residual buffer; K is
    then never rotated, and group_size applies to V)."""
    k_params: str = "fp16"
    """With k_mode "channel": the per-channel K scale and zero point in "fp16" or "fp8"
    (e4m3: 16 fewer bytes per token and KV head, keys must stay within +-448;
    docs/per-channel-k-design.md, section 12)."""
    prefill_window: int = PREFILL_WINDOW_TOKENS
    """With k_mode "token": the tokens of context a prefill reads back from the pages at
    a time. A longer context is read in windows whose results are merged by LSE, so the
    prefill workspace (taken off the KV cache) holds about this many rows, or a step's
    tokens and a page if that is more, instead of max_model_len's."""

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> BitDecodeConfig:
        if additional_config is not None and not isinstance(additional_config, Mapping):
            # vLLM also takes an object with compute_hash(): it holds no section to read
            raise BitDecodeConfigError(
                f"additional_config must be a dict holding a '{CONFIG_KEY}' section for "
                f"BITDECODE, got {type(additional_config).__name__}")
        _check_section_name(additional_config or {}, {f.name for f in dataclasses.fields(cls)})
        raw = (additional_config or {}).get(CONFIG_KEY, {})
        values = _section(raw, cls, f"additional_config['{CONFIG_KEY}']", CONFIG_KEY)
        if SPARSE_KEY in values:
            values[SPARSE_KEY] = SparseConfig.from_raw(values[SPARSE_KEY])
        if values.get("k_mode") == CHANNEL_K:
            if "prefill_window" in values:
                raise BitDecodeConfigError(
                    f"{CONFIG_KEY}.prefill_window applies to k_mode='token' only: channel "
                    "mode's prefill reads each request's context whole")
            if values.get("rotate_k") is True:
                raise BitDecodeConfigError(
                    f"{CONFIG_KEY}.rotate_k=true cannot be combined with k_mode='channel': "
                    "per-channel scales take the outlier channels that the rotation would "
                    "spread; leave rotate_k out"
                )
            values.setdefault("rotate_k", False)
        cfg = cls(**values)
        cfg._check_values()
        return cfg

    def _check_values(self) -> None:
        def bad(name: str, allowed: object) -> BitDecodeConfigError:
            return _unsupported(f"{CONFIG_KEY}.{name}", getattr(self, name), allowed)

        if type(self.bits) is not int or self.bits not in page_format.SUPPORTED_BITS:
            raise bad("bits", list(page_format.SUPPORTED_BITS))
        groups = page_format.SUPPORTED_GROUP_SIZES
        if type(self.group_size) is not int or self.group_size not in groups:
            raise bad("group_size", list(page_format.SUPPORTED_GROUP_SIZES))
        if not isinstance(self.rotate_k, bool):
            raise bad("rotate_k", [True, False])
        if not isinstance(self.sparse, SparseConfig):
            raise bad("sparse", "a dict of sparse settings")
        if self.k_mode not in K_MODES:
            raise bad("k_mode", list(K_MODES))
        if self.channel_k and self.rotate_k:
            raise BitDecodeConfigError(
                f"{CONFIG_KEY}.k_mode='channel' stores K unrotated; rotate_k must be false")
        window = self.prefill_window
        if not _int_in(window, MIN_PREFILL_WINDOW):
            raise bad("prefill_window",
                      f"an int of at least {MIN_PREFILL_WINDOW} tokens (at most "
                      f"{MAX_INT_SETTING})")
        if not isinstance(self.k_params, str) or self.k_params not in K_PARAMS:
            raise bad("k_params", list(K_PARAMS))
        if self.k_params != "fp16" and not self.channel_k:
            raise BitDecodeConfigError(
                f"{CONFIG_KEY}.k_params={self.k_params!r} applies to k_mode='channel' only; "
                "per-token pages store their parameters in the model dtype")
        if self.channel_k and self.sparse.enabled:
            raise BitDecodeConfigError(
                f"{CONFIG_KEY}.sparse cannot be combined with k_mode='channel' yet: the "
                "selection and sparse decode kernels read per-token pages"
            )

    @property
    def channel_k(self) -> bool:
        return self.k_mode == CHANNEL_K

    @property
    def k_param_bits(self) -> int:
        """Bits of one stored per-channel K parameter: 16 or 8."""
        return K_PARAMS[self.k_params]

    def head_region_bytes(self, head_size: int, block_size: int) -> int:
        """Bytes of one KV head's share of a page, in this K mode."""
        fmt = self.page_format(head_size, block_size)
        if self.channel_k:
            from vllm_bitdecode.reference_kc import KCPageLayout

            return KCPageLayout(fmt, self.k_param_bits).head_region_bytes
        return fmt.head_region_bytes

    def block_size_of(self, head_size: int, head_region_bytes: int) -> int:
        """Tokens per page, recovered from a head region's size (the inverse of
        head_region_bytes)."""
        for block_size in page_format.SUPPORTED_BLOCK_SIZES:
            if self.head_region_bytes(head_size, block_size) == head_region_bytes:
                return block_size
        raise BitDecodeConfigError(
            f"a head region of {head_region_bytes} bytes matches no block size of "
            f"{self.bits}-bit {self.k_mode}-mode pages"
        )

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
    is_hybrid: bool = False,
    attention_chunk_size: int | None = None,
    is_attention_free: bool = False,
    is_mm_prefix_lm: bool = False,
) -> None:
    """Raise BitDecodeConfigError for a model or cache setting BITDECODE cannot serve."""
    if is_attention_free:
        # Mamba-style models: vLLM reports head size 0 and no KV heads for them
        raise BitDecodeConfigError(
            "attention-free models (Mamba and other state-space models) have no attention "
            "layers for BITDECODE to serve (model type); serve them without "
            "--attention-backend")
    if use_mla:
        raise BitDecodeConfigError("MLA models are not supported by BITDECODE (model type)")
    if is_encoder_decoder:
        raise BitDecodeConfigError(
            "encoder-decoder models are not supported by BITDECODE (model type)"
        )
    if is_hybrid:
        # vLLM pads the state layers' pages to the attention page size, in bf16 multiples;
        # the packed pages are not one, and vLLM would fail after loading the weights
        raise BitDecodeConfigError(
            "hybrid models (attention beside Mamba or linear-attention layers) are not "
            "supported by BITDECODE (model type)"
        )
    if is_mm_prefix_lm:
        # the image / video prefix attends bidirectionally within itself
        raise BitDecodeConfigError(
            "models whose multimodal prefix attends bidirectionally are not supported by "
            "BITDECODE (model type): its kernels are causal only")
    if attention_chunk_size:
        # Llama 4: its chunked layers keep a KV cache of their own kind, not these pages
        raise BitDecodeConfigError(
            f"chunked local attention (attention_chunk_size {attention_chunk_size}) is not "
            "supported by BITDECODE"
        )
    if head_size not in page_format.SUPPORTED_HEAD_SIZES:
        raise BitDecodeConfigError(
            f"head size {head_size} is not supported by BITDECODE; supported: "
            f"{list(page_format.SUPPORTED_HEAD_SIZES)}"
        )
    # after the head size: --disable-sliding-window serves only a head size that passes
    if sliding_window is not None:
        raise BitDecodeConfigError(
            f"sliding-window attention (window {sliding_window}) is not supported by "
            "BITDECODE; --disable-sliding-window serves such a model with full attention, "
            "--max-model-len then capped at the window"
        )
    if dtype not in page_format.SUPPORTED_DTYPES:
        raise BitDecodeConfigError(
            f"dtype {dtype} is not supported by BITDECODE; use --dtype bfloat16 or float16"
        )
    if kv_cache_dtype not in (None, "auto", "bfloat16", "float16"):
        # vLLM turns 'auto' into the checkpoint's KV-cache quantization (e.g. a ModelOpt
        # checkpoint's kv_cache_quant_algo FP8) before this runs; the model's own dtype,
        # named explicitly, keeps it out
        raise BitDecodeConfigError(
            f"--kv-cache-dtype {kv_cache_dtype} (the flag, or with 'auto' the checkpoint's "
            "KV-cache quantization) cannot be combined with BITDECODE, which stores its own "
            "4/2-bit pages; pass --kv-cache-dtype auto, or the model's dtype (bfloat16 or "
            "float16) for a ModelOpt checkpoint with KV-cache quantization, and set "
            f"--additional-config '{{\"{CONFIG_KEY}\": {{\"bits\": 4}}}}'"
        )
    named = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(kv_cache_dtype or "")
    if named is not None and dtype in page_format.SUPPORTED_DTYPES and named != dtype:
        # the pages' scales and zero points, the residual and the prefill workspace are in
        # the model dtype: another 16-bit dtype named here would be silently ignored
        raise BitDecodeConfigError(
            f"--kv-cache-dtype {kv_cache_dtype} with a {str(dtype).removeprefix('torch.')} "
            "model: BITDECODE keeps its page parameters in the model's dtype; pass "
            "--kv-cache-dtype auto (or the model's dtype), or --dtype to change the model's"
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


def check_context_parallel(decode_context_parallel_size: int,
                           prefill_context_parallel_size: int) -> None:
    """Context parallelism interleaves a sequence's pages across ranks and merges their
    softmax by LSE; the decode kernels return no LSE and walk whole page lists, so every
    mode refuses it here, before the weights load (vLLM's own check asserts after)."""
    for size, flag in ((decode_context_parallel_size, "--decode-context-parallel-size"),
                       (prefill_context_parallel_size, "--prefill-context-parallel-size")):
        if size > 1:
            raise BitDecodeConfigError(
                f"BITDECODE does not support context parallelism ({flag} {size}): its "
                "decode kernels read each sequence's pages in one process")


def check_kv_cache_scheme(quant_config: Any) -> None:
    """A checkpoint whose quantization config carries a ``kv_cache_scheme``
    (llm-compressor's compressed-tensors FP8-KV checkpoints) makes every attention layer
    store fp8 KV whatever --kv-cache-dtype says (vLLM 0.20, Attention.__init__); refused
    here in one line, where vLLM would say only that the backend does not support
    kv_cache_dtype fp8."""
    scheme = getattr(quant_config, "kv_cache_scheme", None)
    if scheme is not None:
        raise BitDecodeConfigError(
            f"this checkpoint's quantization config ({type(quant_config).__name__}) has a "
            f"kv_cache_scheme ({_shown(scheme)}), which makes vLLM store the KV cache in "
            "fp8 whatever --kv-cache-dtype says; BITDECODE stores its own 4/2-bit pages. "
            "Use a checkpoint without KV-cache quantization, or another attention backend")


def check_tensor_parallel(total_kv_heads: int, tensor_parallel_size: int) -> None:
    """Each rank keeps whole KV heads: its share of them, or a copy of one."""
    tp = tensor_parallel_size
    if total_kv_heads < 1:  # an attention-free model: check_model says so
        return
    if tp > 1 and (total_kv_heads % tp if total_kv_heads >= tp else tp % total_kv_heads):
        raise BitDecodeConfigError(
            f"{total_kv_heads} KV heads cannot be split over --tensor-parallel-size {tp}: "
            "each rank needs whole KV heads, so the tensor-parallel size must divide the "
            "number of KV heads or be a multiple of it"
        )


def accuracy_warnings(cfg: BitDecodeConfig) -> list[str]:
    """Settings that start and run but were measured to cost much accuracy, one line each;
    logged once at start-up, in the process the user started (_registration)."""
    lines = []
    if cfg.bits == 2 and not cfg.channel_k:
        lines.append(
            "BITDECODE: 2-bit K per token lost the shipped model's quality (perplexity 1579 "
            "against 8.69 in bf16 at 2K, pass-key retrieval 12.7%); 2-bit K per channel "
            "kept it (+4.7%): add \"k_mode\": \"channel\", \"group_size\": 32 and --block-size 128 "
            "(README, quality table)")
    return lines


def describe_cache(cfg: BitDecodeConfig, head_size: int, block_size: int,
                   dtype_bytes: int = 2) -> str:
    """One start-up line saying what the KV cache holds, to read beside vLLM's "GPU KV
    cache size" (logged once per engine by the metadata builder, where the page's size
    is settled)."""
    per_token = cfg.head_region_bytes(head_size, block_size) / block_size
    if cfg.channel_k:
        k = (f"K per channel over {page_format.TILE_TOKENS}-token groups ({cfg.k_params} "
             "scale and zero point), each request's newest page exact in a residual")
    else:
        k = (f"K per token in groups of {cfg.group_size}"
             + (", Hadamard-rotated" if cfg.rotate_k else ""))
    return (f"BITDECODE KV cache: {cfg.bits}-bit codes in pages of {block_size} tokens; "
            f"{k}; V per token in groups of {cfg.group_size}; {per_token:g} B per token "
            f"and KV head against {2 * head_size * dtype_bytes} B in the model dtype "
            f"({2 * head_size * dtype_bytes / per_token:.2f}x the tokens per GiB)")


# Per-channel K's residual (impl._residual) is made for every possible running request;
# past this size on one GPU, start-up says how large it is and how to make it smaller.
RESIDUAL_WARN_BYTES = 2 * 2**30


def residual_shape(vllm_config: Any, num_kv_heads: int, head_size: int
                   ) -> tuple[int, int, int, int, int]:
    """One layer's per-channel K residual, in the model dtype: [max_num_seqs + 1, 2, kv
    heads, block_size, head_size], the exact K and V rows of each live request's newest
    page, and a scratch slot for batch rows of no request (residual_slots)."""
    return (vllm_config.scheduler_config.max_num_seqs + 1, 2, num_kv_heads,
            vllm_config.cache_config.block_size, head_size)


def residual_bytes(vllm_config: Any) -> tuple[int, int] | None:
    """Per-channel K mode's residual on one GPU, every layer's (residual_shape): all of
    it, and one request's. None where the config does not say yet (no model or block
    size)."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    if model is None or cache.block_size is None:
        return None
    parallel = vllm_config.parallel_config
    slots, *slot_shape = residual_shape(vllm_config, model.get_num_kv_heads(parallel),
                                        model.get_head_size())
    per_request = (model.get_num_layers(parallel) * model.dtype.itemsize
                   * math.prod(slot_shape))
    return slots * per_request, per_request


def memory_warnings(cfg: BitDecodeConfig, vllm_config: Any) -> list[str]:
    """Memory BITDECODE sets aside that a user may not expect, one line each; logged once
    at start-up beside accuracy_warnings. vLLM's default max_num_seqs is 1024 on GPUs of
    70 GiB or more, which at 128-token pages makes per-channel K's residual 16 GiB for a
    Llama-3-8B shape, all of it taken from the KV cache."""
    sizes = residual_bytes(vllm_config) if cfg.channel_k else None
    if sizes is None or sizes[0] < RESIDUAL_WARN_BYTES:
        return []
    total, per_request = sizes
    seqs = vllm_config.scheduler_config.max_num_seqs
    return [
        f"BITDECODE: {CONFIG_KEY}.k_mode='channel' keeps each running request's newest "
        f"page exact, in {total / 2**30:.1f} GiB per GPU for max_num_seqs={seqs} "
        f"({per_request / 2**20:.0f} MiB a request), which the KV cache gives up; "
        "--max-num-seqs lowers it (vLLM's default is 1024 on GPUs of 70 GiB or more, A100s "
        "excepted)"]


OFFLOADING_CONNECTOR = "OffloadingConnector"  # vLLM's CPU offloading (--kv-offloading-size)


def check_kv_connector(kv_transfer_config: Any, channel_k: bool,
                       hybrid_manager_on: bool = False) -> None:
    """Which KV connector may move BITDECODE's pages: vLLM's CPU offloading connector
    (--kv-offloading-size, or --kv-transfer-config naming it), with per-token K only.

    A per-token page holds everything its tokens need (codes and parameters), so a byte
    copy of it to the CPU and back restores them exactly; the offloading connector moves
    whole pages as bytes (tests/gpu/test_serving.py: a hit loaded from the CPU into a
    poisoned GPU cache gives the cold run's tokens). Per-channel K keeps each request's
    newest K rows outside its pages, which no connector moves. Other connectors (NIXL,
    Mooncake, LMCache, P2P) are untested and refused: NIXL's and Mooncake's topology
    probes ask for the cache shape at head size 1, and a remote instance would have to
    share the page format. Refused here, before the weights load.

    vLLM 0.20 turns its hybrid KV-cache manager off for a connector set by
    --kv-transfer-config but not for --kv-offloading-size, whose connector then refuses to
    start after the cache is allocated (for every backend); said here instead, at once."""
    if kv_transfer_config is None:
        return
    connector = getattr(kv_transfer_config, "kv_connector", None)
    if channel_k:  # first: no connector would do, so no advice about one
        advice = ("; use k_mode='token' to offload" if connector == OFFLOADING_CONNECTOR
                  else f" (with k_mode='token', only vLLM's CPU offloading connector, "
                  f"'{OFFLOADING_CONNECTOR}')")
        raise BitDecodeConfigError(
            f"{CONFIG_KEY}.k_mode='channel' cannot move KV pages through a KV connector "
            f"({connector!r}; --kv-offloading-size or --kv-transfer-config): each "
            f"request's newest K rows live outside its pages{advice}")
    if connector != OFFLOADING_CONNECTOR:
        # VLLM_USE_SIMPLE_KV_OFFLOAD=1 swaps in another connector behind the same flag
        why = (" (set by VLLM_USE_SIMPLE_KV_OFFLOAD=1; unset it)"
               if connector == "SimpleCPUOffloadConnector" else "")
        raise BitDecodeConfigError(
            f"BITDECODE supports only vLLM's CPU offloading connector "
            f"(--kv-offloading-size, or --kv-transfer-config with kv_connector "
            f"'{OFFLOADING_CONNECTOR}'), not KV connector {connector!r}{why}")
    if hybrid_manager_on:
        raise BitDecodeConfigError(
            "vLLM's offloading connector needs --disable-hybrid-kv-cache-manager beside "
            "--kv-offloading-size (vLLM 0.20 leaves the hybrid KV-cache manager on for it, "
            "and the connector then fails after the KV cache is allocated)")


def check_platform(platform: Any) -> None:
    """The kernels are NVIDIA sm_90a code. On vLLM's CPU build the platform would pick its
    own backend for every layer (with an info line only), and the first layer built would
    then be refused as if the model had chosen it; ROCm and XPU refuse in their selectors
    with reasons that do not say this. An unspecified platform (a config built without a
    GPU, as the tests do) is left to the selector."""
    if platform.is_cuda() or platform.is_unspecified():
        return
    kind = next((name for name, test in (("CPU", platform.is_cpu), ("ROCm", platform.is_rocm),
                                         ("XPU", platform.is_xpu), ("TPU", platform.is_tpu))
                 if test()), type(platform).__name__)
    raise BitDecodeConfigError(
        f"BITDECODE runs on NVIDIA H100 / H200 GPUs (CUDA, sm_90) only; this vLLM runs on "
        f"the {kind} platform: serve the model without --attention-backend BITDECODE")


def check_vllm_config(vllm_config: Any) -> BitDecodeConfig:
    """Validate everything BITDECODE needs from a VllmConfig; return the parsed settings."""
    from vllm.platforms import current_platform

    check_platform(current_platform)
    cfg = BitDecodeConfig.from_additional_config(vllm_config.additional_config)
    scheduler = getattr(vllm_config, "scheduler_config", None)
    hybrid_manager_on = getattr(scheduler, "disable_hybrid_kv_cache_manager", True) is False
    check_kv_connector(getattr(vllm_config, "kv_transfer_config", None), cfg.channel_k,
                       hybrid_manager_on)
    model = vllm_config.model_config
    if model is None:
        return cfg
    parallel = vllm_config.parallel_config
    check_context_parallel(getattr(parallel, "decode_context_parallel_size", 1),
                           getattr(parallel, "prefill_context_parallel_size", 1))
    check_kv_cache_scheme(getattr(vllm_config, "quant_config", None))
    cache = vllm_config.cache_config
    _check_model_config(model, parallel, cache.cache_dtype,
                        cache.block_size if cache.user_specified_block_size else None)
    check_speculative(getattr(vllm_config, "speculative_config", None), parallel)
    if cfg.channel_k:
        check_channel_k(vllm_config)
    if cfg.sparse.enabled:
        check_sparse_model(
            cfg.sparse,
            num_layers=model.get_total_num_hidden_layers(),
            max_model_len=model.max_model_len,
            pipeline_parallel_size=parallel.pipeline_parallel_size,
            tensor_parallel_size=parallel.tensor_parallel_size,
            attention_in_every_layer=not (
                model.is_hybrid or model.is_attention_free or model.has_noops
            ),
            speculative_method=getattr(vllm_config.speculative_config, "method", None),
            max_model_len_fitted=getattr(model, "original_max_model_len", None) == -1,
        )
    return cfg


def _check_model_config(model: Any, parallel: Any, kv_cache_dtype: str | None,
                        block_size: int | None, check_window: bool = True) -> None:
    """check_tensor_parallel and check_model on a vLLM ModelConfig and ParallelConfig."""
    check_tensor_parallel(model.get_total_num_kv_heads(), parallel.tensor_parallel_size)
    check_model(
        head_size=model.get_head_size(),
        dtype=model.dtype,
        kv_cache_dtype=kv_cache_dtype,
        block_size=block_size,
        use_mla=model.use_mla,
        is_encoder_decoder=model.is_encoder_decoder,
        sliding_window=model.get_sliding_window() if check_window else None,
        num_heads=model.get_num_attention_heads(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        is_hybrid=model.is_hybrid,
        attention_chunk_size=model.attention_chunk_size,
        is_attention_free=bool(getattr(model, "is_attention_free", False)),
        is_mm_prefix_lm=bool(getattr(model, "is_mm_prefix_lm", False)),
    )


# speculative methods whose drafter has no attention layers (n-gram and suffix lookups,
# Medusa's and MLP speculators' heads) or reuses the target's hidden states only
DRAFTERS_WITHOUT_ATTENTION = ("ngram", "ngram_gpu", "suffix", "medusa", "mlp_speculator",
                              "extract_hidden_states")


def check_speculative(speculative_config: Any, target_parallel: Any) -> None:
    """The drafter's attention layers run through this backend too, but vLLM builds them
    only after the target's weights have loaded: its model is checked here as the
    target's is (head size, heads, sliding window, dtype, ...), with the draft's own
    tensor-parallel size. DFlash drafts attend non-causally, which the kernels do not."""
    if speculative_config is None:
        return
    method = getattr(speculative_config, "method", None)
    if method == "dflash":
        raise BitDecodeConfigError(
            "speculative decoding with 'dflash' drafts is not supported by BITDECODE: vLLM "
            "then runs every attention layer non-causally, which its kernels do not")
    draft = getattr(speculative_config, "draft_model_config", None)
    if method in DRAFTERS_WITHOUT_ATTENTION or draft is None:
        return
    # A drafter's layers take a window only from its config's layer_types (their cache
    # config is the target's): a bare sliding_window there, which many configs carry
    # unused, is not one. --disable-sliding-window does not reach the draft's config.
    layer_types = getattr(getattr(draft, "hf_text_config", None), "layer_types", None) or ()
    sliding = sum(t == "sliding_attention" for t in layer_types)
    if sliding:
        raise BitDecodeConfigError(
            f"the draft model ({draft.model}) has {sliding} sliding-window attention layers "
            "(its config's layer_types), which BITDECODE does not support; "
            "--disable-sliding-window applies to the target model only")
    parallel = getattr(speculative_config, "draft_parallel_config", None) or target_parallel
    try:  # the cache's settings are the target's
        _check_model_config(draft, parallel, None, None, check_window=False)
    except BitDecodeConfigError as e:
        raise BitDecodeConfigError(f"the draft model ({draft.model}): {e}") from None


def drafter_query_extension(vllm_config: Any) -> int:
    """How many tokens a drafter's first pass may add to a request's query beyond what
    the scheduler gave it, an upper bound: vLLM 0.20 lengthens every query by the
    draft's extra slots (parallel drafting: k - 1; a draft model: one more), at most k =
    num_speculative_tokens. 0 without a drafter that has attention layers."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or getattr(spec, "method", None) in DRAFTERS_WITHOUT_ATTENTION:
        return 0
    return int(getattr(spec, "num_speculative_tokens", None) or 0)


def check_channel_k(vllm_config: Any) -> None:
    """What per-channel K mode refuses (docs/per-channel-k-design.md, section 10): the
    paths that roll positions back, move pages outside the write, or keep request state
    where the residual-slot hook cannot see it."""
    import os

    where = f"{CONFIG_KEY}.k_mode='channel'"
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    refusals = [
        (vllm_config.speculative_config is not None,
         "speculative decoding (rejected draft tokens would roll back positions whose page "
         "was already quantized)"),
        (bool(getattr(parallel, "enable_dbo", False)), "dual-batch overlap (--enable-dbo)"),
        # parsed as vllm.envs parses it: an integer, on when not 0 ("00" is off)
        (int(os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").strip() or "0") != 0,
         "VLLM_USE_V2_MODEL_RUNNER=1 (the residual-slot hook is for GPUModelRunner)"),
        (cache.block_size is not None and cache.block_size > MAX_CHANNEL_BLOCK_SIZE,
         f"--block-size {cache.block_size} (at most {MAX_CHANNEL_BLOCK_SIZE} in this mode)"),
    ]
    for refused, what in refusals:
        if refused:
            raise BitDecodeConfigError(f"{where} does not support {what}")


def check_streaming_input(cfg: BitDecodeConfig) -> None:
    """A streaming-input request (``AsyncLLM.generate`` given an async generator of
    inputs, a session that waits for its next chunk between generations), refused per
    request in per-channel K mode: while it waits it holds a residual slot (its newest
    page's exact rows, still needed) without running, and there are only
    ``max_num_seqs`` slots, so waiting sessions would leave running requests none."""
    if cfg.channel_k:
        raise BitDecodeConfigError(
            f"{CONFIG_KEY}.k_mode='channel' does not take streaming-input requests: a "
            "session waiting for its next input keeps its newest page's exact rows in one "
            "of --max-num-seqs residual slots without running; serve them with "
            "k_mode='token'")


# The settings of this process's latest engine. vLLM asks the backend for its cache
# shape through static methods that carry no config; they read the config vLLM makes
# current where it has one (backend._engine_settings) and else this, which the impl and
# the metadata builder record when they are built.
_active: BitDecodeConfig | None = None


def set_active(cfg: BitDecodeConfig) -> None:
    global _active
    _active = cfg


def get_active() -> BitDecodeConfig:
    if _active is None:
        raise BitDecodeConfigError("BITDECODE was not configured in this process")
    return _active
