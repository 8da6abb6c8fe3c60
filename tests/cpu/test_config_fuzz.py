"""Seeded random ``--additional-config`` values against an oracle written from the docs.

README's configuration tables and docs/sparse-mode-design.md ("Configuration") say what
each ``bitdecode`` key takes; ``_expect_section`` / ``_expect_sparse`` / ``_expect_plan``
restate that, independently of ``vllm_bitdecode.config``. Each seed makes valid sections
(and a model depth that suits them) and mutations of them: a wrong value for one key
(str for int, bool for int, None, lists, dicts, huge or negative ints, 0, NaN / inf,
other-case strings, JSON text), unknown keys at either level, a ``sparse`` or a whole
section that is not a dict, and random layer lists (repeated, negative, past the depth,
unsorted, empty, non-int). Every case must either parse into the fields the oracle
expects (and, when enabled, give the oracle's layer plan or error in
``check_sparse_model`` and ``check_vllm_config``) or raise one ``BitDecodeConfigError``
line that names the offending key. Any other exception, or an accepted value the docs
refuse, fails.

test_config.py holds the hand-written cases; this file only adds volume. The main fuzz
keeps to what ``vllm serve --additional-config`` can carry (JSON: string keys, ints that
``json.loads`` reads); inputs only the Python API can make are in PYTHON_API_CASES.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vllm_bitdecode.config import (
    BitDecodeConfig,
    BitDecodeConfigError,
    check_sparse_model,
    check_vllm_config,
)

Err = tuple[str, ...]  # words that the message about one problem must all contain
W = "bitdecode.sparse"

TOP_DEFAULTS: dict[str, Any] = {  # README, "Configuration" (rotate_k: False with channel K)
    "bits": 4, "group_size": 128, "rotate_k": True, "sparse": None, "k_mode": "token",
    "k_params": "fp16", "prefill_window": 16384,
}
SPARSE_DEFAULTS: dict[str, Any] = {  # docs/sparse-mode-design.md, "Configuration"
    "enabled": False, "token_budget": 2048, "selection_layers": "auto",
    "dense_layers": "auto", "shared_selection": False, "granularity": "page",
    "min_seq_len": None,
}
LISTS = ("selection_layers", "dense_layers")

# ---------------------------------------------------------------- the oracle


INT_MAX = 2**31 - 1  # integer settings reach the kernels' int32 lengths
LAYER_MAX = 1023  # layer indices past any model's depth are refused at parse


def _int(v: object, low: int, high: int = INT_MAX) -> bool:
    return type(v) is int and low <= v <= high  # bool is an int subclass: refused (docs)


def _is(v: object, allowed: tuple[str, ...]) -> bool:
    return isinstance(v, str) and v in allowed


def _expect_sparse(raw: object) -> tuple[dict[str, Any] | None, list[Err]]:
    """The parsed sparse fields, or the problems the docs name, of a ``sparse`` value."""
    if not isinstance(raw, Mapping):
        return None, [(W, "dict")]
    unknown = [k for k in raw if k not in SPARSE_DEFAULTS]
    if unknown:
        return None, [(repr(k), W, "unknown") for k in unknown]
    if raw and "enabled" not in raw:
        return None, [(W, "'enabled'")]
    f = {**SPARSE_DEFAULTS, **raw}
    errs: list[Err] = []
    for name in LISTS:
        v = f[name]
        if isinstance(v, str) and v == "auto":
            continue
        if (not isinstance(v, (list, tuple)) or not all(_int(i, 0, LAYER_MAX) for i in v)
                or len(set(v)) != len(v) or (name == "selection_layers" and not v)):
            errs.append((f"{W}.{name}",))
        else:
            f[name] = tuple(sorted(v))
    if type(f["enabled"]) is not bool:
        errs.append((f"{W}.enabled",))
    if type(f["shared_selection"]) is not bool:
        errs.append((f"{W}.shared_selection",))
    budget_ok = _int(f["token_budget"], 1)
    if not budget_ok:
        errs.append((f"{W}.token_budget",))
    if not _is(f["granularity"], ("token", "page")):
        errs.append((f"{W}.granularity",))
    elif f["granularity"] == "page" and budget_ok and f["token_budget"] % 16:
        errs.append((f"{W}.token_budget", "multiple of 16"))
    if f["min_seq_len"] is not None and not _int(f["min_seq_len"], 1):
        errs.append((f"{W}.min_seq_len",))
    sel, dense = f["selection_layers"], f["dense_layers"]
    if not errs and isinstance(sel, tuple) and isinstance(dense, tuple):
        # both lists given: the structure is checked without the model (docs)
        if set(sel) & set(dense):
            errs.append((W, "both dense_layers and selection_layers"))
        if any(i not in dense for i in range(sel[0])):
            errs.append((W, "before the first selection layer", "dense_layers"))
    return (None, errs) if errs else (f, [])


def _expect_section(raw: object) -> tuple[dict[str, Any] | None, list[Err]]:
    """The parsed fields, or the problems the docs name, of a ``bitdecode`` value."""
    if not isinstance(raw, Mapping):
        return None, [("bitdecode", "dict")]
    unknown = [k for k in raw if k not in TOP_DEFAULTS]
    if unknown:
        return None, [(repr(k), "bitdecode", "unknown") for k in unknown]
    channel = raw.get("k_mode") == "channel"
    f = {**TOP_DEFAULTS, "rotate_k": not channel, **raw}
    errs: list[Err] = []
    if not (_int(f["bits"], 0) and f["bits"] in (4, 2)):
        errs.append(("bitdecode.bits",))
    if not (_int(f["group_size"], 0) and f["group_size"] in (32, 64, 128)):
        errs.append(("bitdecode.group_size",))
    if type(f["rotate_k"]) is not bool or (channel and f["rotate_k"]):
        errs.append(("bitdecode.rotate_k",))
    if not _is(f["k_mode"], ("token", "channel")):
        errs.append(("bitdecode.k_mode",))
    if (channel and "prefill_window" in raw) or not _int(f["prefill_window"], 128):
        errs.append(("bitdecode.prefill_window",))
    if not _is(f["k_params"], ("fp16", "fp8")) or (f["k_params"] == "fp8" and not channel):
        errs.append(("bitdecode.k_params",))
    sparse, sparse_errs = _expect_sparse(raw.get("sparse", {}))
    errs += sparse_errs
    if channel and sparse is not None and sparse["enabled"] is True:
        errs.append((W, "k_mode='channel'"))
    if errs:
        return None, errs
    f["sparse"] = sparse
    return f, []


def _auto_selection(n: int) -> tuple[int, ...]:
    # layer 2, and a correction layer at 13/32 of the depth if a reuse layer fits on
    # each side of it (docs/sparse-mode-design.md)
    mid = n * 13 // 32
    return (2, mid) if 4 <= mid < n - 1 else (2,)


def _expect_plan(sp: dict[str, Any], n: int, max_len: int | None, tp: int
                 ) -> tuple[tuple[tuple[int, ...], ...] | None, list[Err]]:
    """(dense, selection, reuse) of an enabled sparse section at depth ``n``, or the
    problems ``check_sparse_model`` must name."""
    if sp["shared_selection"] and tp > 1:
        return None, [(f"{W}.shared_selection",)]
    if sp["selection_layers"] == "auto" and n < 4:
        return None, [(W, f"{n} layers", "at least 4")]
    sel = _auto_selection(n) if sp["selection_layers"] == "auto" else sp["selection_layers"]
    dense = tuple(range(sel[0])) if sp["dense_layers"] == "auto" else sp["dense_layers"]
    errs: list[Err] = [(f"{W}.{name}", "beyond") for name, layers in
                       (("selection_layers", sel), ("dense_layers", dense))
                       if any(i >= n for i in layers)]
    if set(sel) & set(dense):
        errs.append((W, "both dense_layers and selection_layers"))
    if any(i not in dense for i in range(sel[0])):
        errs.append((W, "before the first selection layer", "dense_layers"))
    reuse = tuple(i for i in range(n) if i not in sel and i not in dense)
    if not reuse:
        errs.append((W, "every one"))
    if max_len is not None:
        below = 2 * sp["token_budget"] if sp["min_seq_len"] is None else sp["min_seq_len"]
        if below > max_len:
            errs.append((W, f"min_seq_len={below}", "never"))
        if sp["token_budget"] > max_len:
            errs.append((f"{W}.token_budget={sp['token_budget']}",))
    return (None, errs) if errs else ((dense, sel, reuse), [])


# ---------------------------------------------------------------- the generators

WEIRD: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 4, 16, 32, 64, 100, 127, 128, 2048, -16, 10**30,
    -(10**30), 2**63, 4.0, 2048.0, 0.5, math.nan, math.inf, -math.inf, "4", "2048", "true",
    "null", "Channel", "CHANNEL", "Token", "token", "channel", "page", "Page", "PAGE",
    "token ", "fp8", "FP8", "fp16", "Fp16", "auto", "Auto", "AUTO", "", '{"bits": 2}',
    '{"enabled": true}', "[2, 13]", [], [4], [2, 13], ["auto"], {}, {"enabled": True}, (2,),
]
UNKNOWN_TOP = ["Bits", "BITS", "group", "groupSize", "group-size", "rotate", "kmode",
               "K_MODE", "Sparse", "", " bits", "bits ", "token_budget", "enabled"]
UNKNOWN_SPARSE = ["Enabled", "budget", "top_k", "selection", "granularity ", "layers",
                  "k_mode", "bits", "tokenBudget", "sparse"]


def _layers(rng: random.Random, n: int) -> object:
    """A random layer list: often broken (repeated, negative, past depth ``n``, non-int)."""
    out: list[Any] = rng.sample(range(n), rng.randint(0, min(n, 4)))
    for _ in range(rng.randint(0, 2)):
        out.insert(rng.randint(0, len(out)), rng.choice([
            rng.choice(out) if out else 0, -1, -rng.randint(1, 99), n, n + rng.randint(0, 99),
            10**30, True, False, 2.0, "2", None, [2], math.nan]))
    return rng.choice([out, out, out, tuple(out), [], "auto", rng.choice(WEIRD)])


def _valid_sparse(rng: random.Random, n: int) -> dict[str, Any]:
    """A sparse section the docs accept, enabled at depth ``n`` (>= 4)."""
    page = rng.random() < 0.6
    s: dict[str, Any] = {"enabled": rng.random() < 0.85}
    if not page or rng.random() < 0.3:
        s["granularity"] = "page" if page else "token"
    if rng.random() < 0.7:
        s["token_budget"] = 16 * rng.randint(1, 512) if page else rng.randint(1, 8192)
    if rng.random() < 0.3:
        s["min_seq_len"] = rng.choice([None, rng.randint(1, 20000)])
    if rng.random() < 0.3:
        s["shared_selection"] = rng.random() < 0.5
    sel = _auto_selection(n)
    if rng.random() < 0.5:  # explicit selection layers, shuffled (order is free)
        first = rng.randint(0, n - 2)
        sel = (first, *rng.sample(range(first + 1, n - 1), min(rng.randint(0, 2), n - 2 - first)))
        s["selection_layers"] = rng.sample(sel, len(sel))
    if rng.random() < 0.5:  # explicit dense layers: those before the selection and more
        spare = [i for i in range(sel[0] + 1, n) if i not in sel]
        extra = rng.sample(spare, rng.randint(0, max(0, len(spare) - 1)) // 2)
        dense = [*range(sel[0]), *extra]
        s["dense_layers"] = rng.sample(dense, len(dense))
    return s


def _valid_section(rng: random.Random, n: int) -> dict[str, Any]:
    """A ``bitdecode`` section the docs accept (its sparse part fits depth ``n``)."""
    s: dict[str, Any] = {}
    channel = rng.random() < 0.3
    if channel or rng.random() < 0.3:
        s["k_mode"] = "channel" if channel else "token"
    if rng.random() < 0.5:
        s["bits"] = rng.choice([4, 2])
    if rng.random() < 0.5:
        s["group_size"] = rng.choice([32, 64, 128])
    if channel:
        if rng.random() < 0.3:
            s["rotate_k"] = False
        if rng.random() < 0.5:
            s["k_params"] = rng.choice(["fp16", "fp8"])
        if rng.random() < 0.3:
            s["sparse"] = rng.choice([{}, {"enabled": False, "token_budget": 64}])
        return s
    if rng.random() < 0.4:
        s["rotate_k"] = rng.random() < 0.5
    if rng.random() < 0.2:
        s["k_params"] = "fp16"
    if rng.random() < 0.4:
        s["prefill_window"] = rng.choice([128, 129, 4096, 16384, 10**30,
                                          rng.randint(128, 10**6)])
    if rng.random() < 0.6:
        s["sparse"] = _valid_sparse(rng, n)
    return s


def _mutate(rng: random.Random, s: dict[str, Any], n: int) -> object:
    """``s`` with one thing broken (or, by chance, still valid: the oracle decides)."""
    sparse = dict(s.get("sparse") or {"enabled": True})
    kind = rng.randrange(8)
    if kind == 0:
        return {**s, rng.choice(list(TOP_DEFAULTS)): rng.choice(WEIRD)}
    if kind == 1:
        return {**s, "sparse": {**sparse, rng.choice(list(SPARSE_DEFAULTS)): rng.choice(WEIRD)}}
    if kind == 2:
        layers = {name: _layers(rng, n) for name in rng.sample(LISTS, rng.randint(1, 2))}
        return {**s, "sparse": {**sparse, **layers}}
    if kind == 3:
        return {**s, rng.choice(UNKNOWN_TOP): rng.choice(WEIRD)}
    if kind == 4:
        return {**s, "sparse": {**sparse, rng.choice(UNKNOWN_SPARSE): rng.choice(WEIRD)}}
    if kind == 5:
        return {**s, "sparse": rng.choice([True, 1, None, [sparse], "on", '{"enabled": true}'])}
    if kind == 6:  # the whole section not a dict: JSON text, a list, a scalar
        return rng.choice([None, True, 4, "4", '{"bits": 2}', [s], [], list(s)])
    return {**s, **{k: rng.choice(WEIRD) for k in rng.sample(list(TOP_DEFAULTS), 2)}}


def _cases(seed: int, count: int) -> list[tuple[object, int, int | None, int]]:
    """(section, depth, max_model_len, tensor-parallel size), valid ones and mutations."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.choice([4, 5, 6, 8, 16, 32, 80, rng.randint(4, 128)])
        s = _valid_section(rng, n)
        sp = s.get("sparse") or {}
        budget = sp.get("token_budget", 2048)
        fits = max(2 * budget, sp.get("min_seq_len") or 0)
        max_len = rng.choice([None, fits, fits + rng.randint(0, 10**5)])
        case = s if rng.random() < 0.4 else _mutate(rng, s, n)
        if rng.random() < 0.3:  # a depth or a length that may not suit the section
            n, max_len = rng.randint(0, 40), rng.choice([max_len, rng.randint(1, 8192)])
        out.append((case, n, max_len, rng.choice([1, 1, 1, 2])))
    return out


# ---------------------------------------------------------------- the checks


def _assert_names_one(exc: BitDecodeConfigError, errs: list[Err], case: object) -> None:
    msg = str(exc)
    assert msg.strip() and "\n" not in msg, f"not one line for {case!r}: {msg!r}"
    assert errs, f"refused {case!r}, which the docs accept: {msg}"
    assert any(all(w in msg for w in words) for words in errs), (
        f"{case!r}: {msg!r} names none of {errs}")


def _same(got: object, want: object) -> bool:
    return type(got) is type(want) and got == want  # 1 is not True, 4.0 is not 4


def _check_parse(case: object, n: int, max_len: int | None, tp: int) -> str:
    want, errs = _expect_section(case)
    try:
        cfg = BitDecodeConfig.from_additional_config({"bitdecode": case, "other": 1})
    except BitDecodeConfigError as exc:
        _assert_names_one(exc, errs, case)
        return "refused"
    assert want is not None, f"accepted {case!r}; the docs refuse it: {errs}"
    for key in TOP_DEFAULTS.keys() - {"sparse"}:
        assert _same(getattr(cfg, key), want[key]), (case, key, getattr(cfg, key))
    for key, value in want["sparse"].items():
        assert _same(getattr(cfg.sparse, key), value), (case, key, getattr(cfg.sparse, key))
    if not cfg.sparse.enabled:
        return "accepted"
    plan, errs = _expect_plan(want["sparse"], n, max_len, tp)
    try:
        got = check_sparse_model(cfg.sparse, num_layers=n, max_model_len=max_len,
                                 tensor_parallel_size=tp)
    except BitDecodeConfigError as exc:
        _assert_names_one(exc, errs, (case, n, max_len, tp))
        return "refused by the model"
    assert plan is not None, f"{case!r} at depth {n}: plan accepted, expected {errs}"
    assert (got.dense, got.selection, got.reuse) == plan, (case, n)
    return "planned"


def _vllm_config(case: object, n: int, max_len: int | None, tp: int) -> SimpleNamespace:
    """A VllmConfig as far as check_vllm_config reads it: Llama-3-8B heads, depth ``n``."""
    model = SimpleNamespace(
        get_head_size=lambda: 128, dtype=torch.bfloat16, use_mla=False,
        is_encoder_decoder=False, get_sliding_window=lambda: None,
        get_num_attention_heads=lambda p: 32 // tp, get_num_kv_heads=lambda p: 8 // tp,
        get_total_num_kv_heads=lambda: 8, is_hybrid=False, attention_chunk_size=None,
        get_total_num_hidden_layers=lambda: n, max_model_len=max_len or 131072,
        is_attention_free=False, has_noops=False)
    return SimpleNamespace(
        additional_config={"bitdecode": case}, model_config=model, kv_transfer_config=None,
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=16,
                                     user_specified_block_size=True),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1,
                                        decode_context_parallel_size=1),
        speculative_config=None)


def _check_startup(case: object, n: int, max_len: int | None, tp: int) -> None:
    """check_vllm_config (the start-up entry point) gives the same answer."""
    want, errs = _expect_section(case)
    if want is not None and want["sparse"]["enabled"]:
        errs = _expect_plan(want["sparse"], n, max_len or 131072, tp)[1]
    try:
        check_vllm_config(_vllm_config(case, n, max_len, tp))
    except BitDecodeConfigError as exc:
        _assert_names_one(exc, errs, (case, n, max_len, tp))
        return
    assert not errs, f"start-up accepted {(case, n, max_len, tp)!r}; expected {errs}"


SEEDS = [0, 1, 2, 3]
CASES_PER_SEED = 3000


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sections_parse_or_name_the_key(seed, monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)  # a channel-K refusal
    outcomes: dict[str, int] = {}
    for case, n, max_len, tp in _cases(seed, CASES_PER_SEED):
        try:
            outcome = _check_parse(case, n, max_len, tp)
            _check_startup(case, n, max_len, tp)
        except AssertionError:
            raise
        except Exception as exc:  # any other type breaks the one-error rule
            raise AssertionError(f"{case!r} (depth {n}, max_model_len {max_len}, tp {tp}) "
                                 f"raised {type(exc).__name__}: {exc}") from exc
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the generators must keep reaching every outcome, or the fuzz checks little
    for outcome in ("accepted", "planned", "refused", "refused by the model"):
        assert outcomes.get(outcome, 0) >= CASES_PER_SEED // 50, outcomes


def test_the_oracle_agrees_with_the_hand_written_tables():
    """The oracle itself, on test_config's tables: it refuses their bad sections."""
    from . import test_config

    for raw, _ in test_config.BAD_SETTINGS:
        assert _expect_section(raw["bitdecode"])[1], raw
    for raw, _ in test_config.BAD_SPARSE:
        assert _expect_section({"sparse": raw})[1], raw
    for raw, _ in test_config.GOOD_SPARSE:
        assert not _expect_section({"sparse": raw})[1], raw


# ---------------------------------------------------------------- Python-API inputs
# What ``vllm serve`` cannot send (json.loads gives string keys and reads no int of more
# than 4300 digits) but LLM(additional_config=...) can; each raised another exception
# type until the fuzz above found them (2026-12-05). Also two inputs JSON can carry
# whose checks walked every index or pair: a first selection layer of 10**30 with
# explicit dense layers, and a layer list of 100,000 entries.

_BIG = 10 ** max(sys.get_int_max_str_digits(), 4300)  # str(_BIG) is refused by Python


class _HashOnly:
    """What VllmConfig.additional_config also accepts (``dict | SupportsHash``)."""

    def compute_hash(self) -> str:
        return "x"


def _parse(additional_config: Any) -> BitDecodeConfig:
    return BitDecodeConfig.from_additional_config(additional_config)


def _plan(sparse: dict[str, Any], **kwargs: Any) -> object:
    cfg = _parse({"bitdecode": {"sparse": {"enabled": True, **sparse}}})
    return check_sparse_model(cfg.sparse, **kwargs)


def _api_case(call: Any, words: tuple[str, ...], why: str, id: str) -> Any:
    """One input and the words its error must hold; ``why``: what it raised before."""
    return pytest.param(call, words, id=id)


PYTHON_API_CASES = [
    _api_case(lambda: _parse({"bitdecode": {1: 4, "bitz": 4}}), ("unknown", "'bitz'"),
              "TypeError: _section sorts unknown keys of mixed types", "unknown-keys-int-and-str"),
    _api_case(lambda: _parse({"bitdecode": {"sparse": {"enabled": True, 0: 1, "top_k": 64}}}),
              ("unknown", W, "'top_k'"), "TypeError: the same sort, in the sparse section",
              "sparse-unknown-keys-int-and-str"),
    _api_case(lambda: _parse({"bitdecode": {"bits": _BIG}}), ("bitdecode.bits",),
              "ValueError: _unsupported formats the value with repr (int-to-str digit limit)",
              "bits-over-4300-digits"),
    _api_case(lambda: _parse({"bitdecode": {"sparse": {"enabled": True,
                                                       "selection_layers": [-_BIG]}}}),
              (f"{W}.selection_layers",), "ValueError: _layer_list formats the index with repr",
              "negative-layer-over-4300-digits"),
    _api_case(lambda: _plan({"selection_layers": [2, _BIG]}, num_layers=32),
              (f"{W}.selection_layers", "too large to print", "at most 1023"),
              "ValueError: accepted at parse, then the beyond-depth message formats it",
              "layer-over-4300-digits-past-depth"),
    _api_case(lambda: _plan({"token_budget": 16 * _BIG}, num_layers=32, max_model_len=4096),
              (W, "token_budget"),
              "ValueError: accepted at parse, then the max-model-len message formats it",
              "budget-over-4300-digits"),
    _api_case(lambda: _parse(_HashOnly()), ("additional_config",),
              "AttributeError: from_additional_config calls .get on a non-dict additional_config",
              "additional-config-supports-hash"),
    _api_case(lambda: _parse({"bitdecode": {"sparse": {
        "enabled": True, "selection_layers": [10**30], "dense_layers": []}}}),
              (f"{W}.selection_layers", "at most 1023"),
              "hung: the check listed every layer below the first selection layer",
              "first-selection-layer-10-to-the-30"),
    _api_case(lambda: _parse({"bitdecode": {"sparse": {"enabled": True,
                                                       "selection_layers": [2] * 100_000}}}),
              (f"{W}.selection_layers", "[2]", "more than once"),
              "quadratic: list.count per entry", "selection-layers-100000-entries"),
    _api_case(lambda: _parse({"bitdecode": {"prefill_window": 2**31}}),
              ("bitdecode.prefill_window", "2147483647"), "accepted past int32",
              "prefill-window-past-int32"),
]


@pytest.mark.parametrize(("call", "words"), PYTHON_API_CASES)
def test_python_api_inputs_get_one_clear_error(call, words):
    with pytest.raises(BitDecodeConfigError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
