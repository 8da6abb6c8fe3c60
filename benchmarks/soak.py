"""Soak test of the real ``vllm serve --attention-backend BITDECODE`` under bounded load (#8).

The script starts ``vllm serve`` on loopback (by default on a dummy-weight 2-layer Llama,
8 query / 2 KV heads of d=128, written by ``python -m vllm_bitdecode.testing make-model
DIR --tiny``; vLLM's defaults otherwise: CUDA graphs, chunked prefill, prefix caching), then:

1. runs a fixed probe set of greedy prompts, one at a time after a prefix-cache reset;
2. runs ``--clients`` concurrent clients for ``--duration`` seconds, each sending requests
   back to back: ``/v1/completions`` and ``/v1/chat/completions``, streamed and not, short
   and long prompts (some sharing long prefixes, for prefix-cache reuse), temperature 0,
   ``ignore_eos`` and a bounded ``max_tokens``; a share of the streams is closed after a
   few chunks, and a few unstreamed requests are dropped before they complete
   (cancellations). Every completed response is validated: well-formed JSON or
   server-sent events ending in ``[DONE]``, ``finish_reason`` "length", token counts
   (exact prompt-token counts with the dummy model's word-level tokenizer);
3. samples GPU memory (NVML, else nvidia-smi) every few seconds from before the server
   starts until after it exits, and checks it is flat after the warm-up;
4. runs the probe set again and requires the same tokens and text;
5. stops the server with SIGTERM and checks that it and its engine process exit and
   that the GPU memory is given back.

With ``--preemption-storm`` the server's KV cache is cut (``--num-gpu-blocks-override``,
with an explicit ``--block-size``) to 1.5 times the longest request the load or the probes
can send: every request fits on its own, so none can wait forever, but the clients need
several times more, so vLLM preempts (and recomputes) requests over and over. The checks
add: vLLM's ``vllm:num_preemptions_total`` is positive, the server's "GPU KV cache size"
is the planned one, and the probe set, run once more during the storm (batched and
preempted with the load), gives the same greedy tokens as before it, but for near ties.

Every wait has a timeout, and the whole run from the server's launch is stopped after
``--max-wall-s``; a ``--num-gpu-blocks-override`` too small for the longest request (which
vLLM would queue forever) is refused before the server starts.

Figures and checks go to ``benchmarks/results/soak_<gpu>.json`` (``soak_<gpu>_quick.json``
with ``--quick``, ``..._storm.json`` with ``--preemption-storm``), the server log next to
it; the exit status is 1 if any check failed.

    python benchmarks/soak.py                 # 64 clients, 300 s (about 7-8 minutes)
    python benchmarks/soak.py --quick         # 16 clients, 20 s (about 2-3 minutes)
    python benchmarks/soak.py --preemption-storm  # 64 clients, 300 s, a KV cache of ~12k tokens

Only the standard library plus aiohttp (a vLLM dependency; ``--transport threads`` uses
urllib-style http.client in threads instead) and, if present, pynvml and psutil.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import http.client
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # vllm_bitdecode without an install, as in quality.py
    sys.path.insert(0, str(ROOT))

from vllm_bitdecode.provenance import git_commit, gpu_slug  # noqa: E402
from vllm_bitdecode.testing.comparisons import TIE_LOGPROB  # noqa: E402
from vllm_bitdecode.testing.engine import parse_kv_cache_tokens  # noqa: E402
from vllm_bitdecode.testing.model_dir import TINY_LLAMA, write_model_dir  # noqa: E402
from vllm_bitdecode.testing.server import (  # noqa: E402
    child_processes,
    free_port,
    parse_prometheus,
    stop_server,
)

RESULTS = ROOT / "benchmarks" / "results"
SERVED_NAME = "bitdecode-soak"

# ---------------------------------------------------------------- the request mix

# Words of the dummy model's word-level tokenizer: one token each ("w<id>", see
# vllm_bitdecode.testing.model_dir.tokenizer_vocab); ids below 20 are special tokens and
# English words.
DUMMY_WORDS = tuple(f"w{i}" for i in range(20, 32000))
# Words for a model with its own tokenizer (--model PATH): each one to a few tokens.
TEXT_WORDS = tuple(
    "the a of to and in is it that for on with as was at by this be from or have an are "
    "not but what all were when we there can if will one each which do how their other "
    "about many then them these so some her would make like him into time has look two "
    "more write go see number no way could people my than first water been call who "
    "import def return class self none true false print len range list dict str int "
    "value key data file path name text line open read write error result index item "
    "os sys json time math random string re socket thread queue test assert yield "
    "pass key remember while break continue lambda global try except finally raise "
    "with for in elif else not and or is async await from as".split()
)


@dataclasses.dataclass(frozen=True)
class Mix:
    """Shares and ranges of the generated requests (all ranges inclusive)."""

    p_chat: float = 0.5
    p_stream: float = 0.5
    p_long: float = 0.25
    p_shared_prefix: float = 0.25  # of all requests: prompt starts with a shared prefix
    p_cancel_stream: float = 0.25  # of streamed requests: closed after a few events
    p_cancel_plain: float = 0.05  # of unstreamed requests: dropped before the answer
    short_words: tuple[int, int] = (4, 64)
    long_words: tuple[int, int] = (1024, 6000)
    short_max_tokens: tuple[int, int] = (1, 128)
    long_max_tokens: tuple[int, int] = (1, 64)
    cancel_after_events: tuple[int, int] = (2, 5)
    cancel_after_s: tuple[float, float] = (0.02, 0.5)
    num_prefixes: int = 4
    prefix_words: tuple[int, int] = (512, 2048)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One request of the mix; its prompt is a pure function of these fields."""

    key: str  # "client.index", or "probe.i"
    endpoint: str  # "completions" or "chat"
    stream: bool
    kind: str  # "short" or "long"
    words: int  # own prompt words (after the shared prefix, if any)
    prefix: int | None  # index of the shared prefix, or None
    max_tokens: int
    seed: int
    cancel_after_events: int | None = None  # streams: close after this many events
    cancel_after_s: float | None = None  # unstreamed: close after this many seconds
    logprobs: int | None = None  # completions: top logprobs per token (probes)

    @property
    def cancels(self) -> bool:
        return self.cancel_after_events is not None or self.cancel_after_s is not None


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """Turns a Spec into prompt text."""

    words: tuple[str, ...] = DUMMY_WORDS
    tokens_per_word: int = 1  # upper bound, to keep prompts inside max_model_len
    exact_tokens: bool = True  # the word-level tokenizer: one token per word
    prefix_seed: int = 1234
    mix: Mix = Mix()

    def _words(self, seed: int, n: int) -> list[str]:
        rng = random.Random(seed)
        return [rng.choice(self.words) for _ in range(n)]

    def prefix_words(self, index: int) -> list[str]:
        rng = random.Random(self.prefix_seed * 7919 + index)
        lo, hi = self.mix.prefix_words
        return self._words(self.prefix_seed * 104729 + index, rng.randint(lo, hi))

    def text(self, spec: Spec) -> tuple[str | None, str]:
        """(shared prefix text or None, own text)."""
        own = " ".join(self._words(spec.seed, spec.words))
        if spec.prefix is None:
            return None, own
        return " ".join(self.prefix_words(spec.prefix)), own

    def prompt_words(self, spec: Spec) -> int:
        pre = 0 if spec.prefix is None else len(self.prefix_words(spec.prefix))
        return pre + spec.words


def expected_prompt_tokens(spec: Spec, source: PromptSource) -> int | None:
    """Prompt tokens the server must report, where the tokenizer makes it known: with
    the dummy model's word-level tokenizer, one per word; chat adds "role :" per message
    and "assistant :" (vllm_bitdecode.testing.model_dir.CHAT_TEMPLATE)."""
    if not source.exact_tokens:
        return None
    if spec.endpoint == "completions":
        return source.prompt_words(spec)
    messages = 1 if spec.prefix is None else 2
    return source.prompt_words(spec) + 2 * messages + 2


def words_budget(max_model_len: int, max_tokens: int, source: PromptSource) -> int:
    """Most prompt words (prefix included) that fit with ``max_tokens`` new tokens."""
    return max(1, (max_model_len - max_tokens - 16) // source.tokens_per_word)


def next_spec(rng: random.Random, key: str, source: PromptSource,
              max_model_len: int) -> Spec:
    """One request of the mix, drawn from ``rng``."""
    mix = source.mix
    endpoint = "chat" if rng.random() < mix.p_chat else "completions"
    stream = rng.random() < mix.p_stream
    kind = "long" if rng.random() < mix.p_long else "short"
    lo, hi = mix.long_words if kind == "long" else mix.short_words
    words = rng.randint(lo, hi)
    prefix = rng.randrange(mix.num_prefixes) if rng.random() < mix.p_shared_prefix else None
    tlo, thi = mix.long_max_tokens if kind == "long" else mix.short_max_tokens
    max_tokens = rng.randint(tlo, thi)
    seed = rng.getrandbits(48)
    cancel_events = cancel_s = None
    if stream and max_tokens >= 16 and rng.random() < mix.p_cancel_stream:
        cancel_events = rng.randint(*mix.cancel_after_events)
    elif not stream and rng.random() < mix.p_cancel_plain:
        cancel_s = round(rng.uniform(*mix.cancel_after_s), 3)
    budget = words_budget(max_model_len, max_tokens, source)
    pre = 0 if prefix is None else len(source.prefix_words(prefix))
    if pre + words > budget:
        if pre >= budget:
            prefix, pre = None, 0
        words = max(1, min(words, budget - pre))
    return Spec(key=key, endpoint=endpoint, stream=stream, kind=kind, words=words,
                prefix=prefix, max_tokens=max_tokens, seed=seed,
                cancel_after_events=cancel_events, cancel_after_s=cancel_s)


def make_mix(seed: int, count: int, source: PromptSource, max_model_len: int) -> list[Spec]:
    rng = random.Random(seed)
    return [next_spec(rng, f"0.{i}", source, max_model_len) for i in range(count)]


PROBE_WORDS = (5, 17, 33, 129, 700, 1500, 3000, 6000)
PROBE_MAX_TOKENS = 24


def probe_specs(source: PromptSource, max_model_len: int,
                max_tokens: int = PROBE_MAX_TOKENS) -> list[Spec]:
    """The fixed probe set: greedy completions of fixed prompts, with top-2 logprobs."""
    budget = words_budget(max_model_len, max_tokens, source)
    return [Spec(key=f"probe.{i}", endpoint="completions", stream=False,
                 kind="long" if n >= 700 else "short", words=min(n, budget), prefix=None,
                 max_tokens=max_tokens, seed=900_000 + i, logprobs=2)
            for i, n in enumerate(PROBE_WORDS)]


def request_body(spec: Spec, model: str, source: PromptSource) -> dict[str, Any]:
    prefix, own = source.text(spec)
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "temperature": 0.0,
                            "ignore_eos": True}
    if spec.endpoint == "completions":
        body["prompt"] = own if prefix is None else f"{prefix} {own}"
        if not spec.stream:
            body["return_token_ids"] = True
        if spec.logprobs is not None:
            body["logprobs"] = spec.logprobs
    else:
        messages = [] if prefix is None else [{"role": "system", "content": prefix}]
        body["messages"] = [*messages, {"role": "user", "content": own}]
    if spec.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def endpoint_path(spec: Spec) -> str:
    return "/v1/completions" if spec.endpoint == "completions" else "/v1/chat/completions"


# ---------------------------------------------------------------- the KV cache (preemption storm)

# The server's KV block size: vLLM's default (CacheConfig.DEFAULT_BLOCK_SIZE), which
# BITDECODE keeps, its get_preferred_block_size returning vLLM's default when that is one of
# its page sizes (page_format.SUPPORTED_BLOCK_SIZES). The storm passes it as --block-size all
# the same, and checks the server's "GPU KV cache size" line against it.
SERVER_BLOCK_SIZE = 16
STORM_MARGIN = 1.5  # the storm's KV cache: this many times the longest request
CHAT_TEMPLATE_TOKENS = 64  # most tokens a chat template adds (the dummy model's: 6)


def request_tokens_bound(spec: Spec, source: PromptSource) -> int:
    """Most KV-cache tokens one request holds: its prompt tokens (exact with the dummy
    model's tokenizer, else an upper bound) plus ``max_tokens``."""
    prompt = expected_prompt_tokens(spec, source)
    if prompt is None:
        prompt = source.prompt_words(spec) * source.tokens_per_word + \
            (CHAT_TEMPLATE_TOKENS if spec.endpoint == "chat" else 0)
    return prompt + spec.max_tokens


def longest_request_tokens(source: PromptSource, max_model_len: int) -> int:
    """An upper bound of :func:`request_tokens_bound` over every request the load
    (:func:`next_spec`) or the probes can send, from the mix's ranges; at most
    ``max_model_len``, which vLLM enforces."""
    mix = source.mix
    words = max(mix.short_words[1], mix.long_words[1]) + mix.prefix_words[1]
    new = max(mix.short_max_tokens[1], mix.long_max_tokens[1])
    load = words * source.tokens_per_word + CHAT_TEMPLATE_TOKENS + new
    probes = max(PROBE_WORDS) * source.tokens_per_word + PROBE_MAX_TOKENS
    return min(max_model_len, max(load, probes))


def blocks_needed(tokens: int, block_size: int) -> int:
    """--num-gpu-blocks-override that holds one request of ``tokens`` tokens: its blocks
    plus the one block vLLM's block pool keeps aside (its null block)."""
    return math.ceil(tokens / block_size) + 1


def storm_plan(source: PromptSource, max_model_len: int, clients: int, block_size: int,
               margin: float = STORM_MARGIN, seed: int = 0) -> dict[str, Any]:
    """The KV cache of a preemption storm: room for ``margin`` times the longest request
    (so every request can run, alone if need be: none waits forever), and what
    ``clients`` concurrent clients would need (each holding a request of the mix's mean
    size, prefix sharing left out), many times more: vLLM preempts over and over."""
    if not margin > 1:
        raise ValueError(f"--storm-margin {margin}: must be more than 1 (the longest request "
                         "must fit, with room to spare)")
    longest = longest_request_tokens(source, max_model_len)
    blocks = blocks_needed(math.ceil(margin * longest), block_size)
    sample = make_mix(seed, 1000, source, max_model_len)
    mean_blocks = sum(math.ceil(request_tokens_bound(s, source) / block_size)
                      for s in sample) / len(sample)
    need = clients * mean_blocks
    return {"block_size": block_size, "margin": margin, "longest_request_tokens": longest,
            "longest_request_blocks": math.ceil(longest / block_size),
            "num_gpu_blocks": blocks, "kv_cache_tokens": blocks * block_size,
            "clients": clients, "mean_request_blocks": round(mean_blocks, 1),
            "clients_need_blocks": round(need), "oversubscription": round(need / (blocks - 1), 2)}


def server_flag(server_args: list[str], flag: str) -> str | None:
    """The value of ``flag`` (e.g. "--block-size") among extra ``vllm serve`` arguments,
    given as ``--flag=value`` or as ``--flag value``, with dashes or underscores (vLLM
    takes both); the last one wins; None if absent."""
    value = None
    for i, arg in enumerate(server_args):
        name, eq, rest = arg.partition("=")
        if not name.startswith("--") or "--" + name[2:].replace("_", "-") != flag:
            continue
        if eq:
            value = rest
        elif i + 1 < len(server_args):
            value = server_args[i + 1]
    return value


def kv_cache_plan(args: argparse.Namespace, source: PromptSource) -> dict[str, Any] | None:
    """The storm's KV cache (:func:`storm_plan`; None without --preemption-storm).

    ValueError for settings that would make the soak hang: a --num-gpu-blocks-override
    (--server-arg) too small for the longest request, which vLLM would queue forever
    without rejecting it; or one given together with --preemption-storm, which picks it."""
    given_blocks = server_flag(args.server_arg, "--num-gpu-blocks-override")
    given_block_size = server_flag(args.server_arg, "--block-size")
    try:
        block_size = SERVER_BLOCK_SIZE if given_block_size is None else int(given_block_size)
        blocks = None if given_blocks is None else int(given_blocks)
    except ValueError:
        raise ValueError(f"--server-arg: --block-size {given_block_size!r} / "
                         f"--num-gpu-blocks-override {given_blocks!r}: not a number") from None
    if block_size <= 0:
        raise ValueError(f"--server-arg: --block-size {block_size}")
    longest = longest_request_tokens(source, args.max_model_len)
    if args.preemption_storm:
        if blocks is not None:
            raise ValueError("--preemption-storm picks --num-gpu-blocks-override itself; "
                             "leave it out of --server-arg")
        plan = storm_plan(source, args.max_model_len, args.clients, block_size,
                          args.storm_margin, args.seed)
        plan["block_size_from"] = "default" if given_block_size is None else "--server-arg"
        return plan
    need = blocks_needed(longest, block_size)
    if blocks is not None and blocks < need:
        raise ValueError(
            f"--num-gpu-blocks-override={blocks} cannot hold the longest request ({longest} "
            f"tokens: {need} blocks of {block_size}, with vLLM's null block); vLLM would "
            f"queue it forever. Give at least {need}, or use --preemption-storm")
    return None


# ---------------------------------------------------------------- validation


class SSEParser:
    """Server-sent events as vLLM's OpenAI server writes them: ``data: {json}`` lines,
    blank lines between events, ``data: [DONE]`` last."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.problems: list[str] = []

    def feed(self, raw: bytes | str) -> dict[str, Any] | None:
        """One line; returns the event it completes, if any."""
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line or line.startswith(":"):
            return None
        if self.done:
            self.problems.append(f"data after [DONE]: {line[:80]!r}")
            return None
        if not line.startswith("data:"):
            self.problems.append(f"not an SSE data line: {line[:80]!r}")
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return None
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            self.problems.append(f"bad JSON in event: {data[:80]!r}")
            return None
        if not isinstance(event, dict):
            self.problems.append(f"event is not an object: {data[:80]!r}")
            return None
        self.events.append(event)
        return event


def _check_usage(usage: Any, spec: Spec, expected_prompt: int | None) -> list[str]:
    if not isinstance(usage, dict):
        return [f"no usage: {usage!r}"]
    problems = []
    completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    if completion != spec.max_tokens:
        problems.append(f"completion_tokens {completion} != max_tokens {spec.max_tokens}")
    if not isinstance(prompt, int) or prompt <= 0:
        problems.append(f"prompt_tokens {prompt!r}")
    elif expected_prompt is not None and prompt != expected_prompt:
        problems.append(f"prompt_tokens {prompt} != {expected_prompt}")
    if isinstance(prompt, int) and isinstance(completion, int) and \
            usage.get("total_tokens") != prompt + completion:
        problems.append(f"total_tokens {usage.get('total_tokens')} != {prompt} + {completion}")
    return problems


def check_response(obj: Any, spec: Spec, expected_prompt: int | None) -> list[str]:
    """Problems with an unstreamed answer (empty list: well-formed)."""
    if not isinstance(obj, dict):
        return [f"answer is not a JSON object: {str(obj)[:80]!r}"]
    if "error" in obj:
        return [f"error object: {str(obj['error'])[:200]}"]
    want = "text_completion" if spec.endpoint == "completions" else "chat.completion"
    problems = [] if obj.get("object") == want else [f"object {obj.get('object')!r} != {want}"]
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return [*problems, f"choices: {str(choices)[:120]}"]
    choice = choices[0]
    if choice.get("finish_reason") != "length":
        problems.append(f"finish_reason {choice.get('finish_reason')!r} != 'length'")
    if spec.endpoint == "completions":
        if not isinstance(choice.get("text"), str):
            problems.append("no text")
        ids = choice.get("token_ids")
        if ids is not None and len(ids) != spec.max_tokens:
            problems.append(f"{len(ids)} token_ids != max_tokens {spec.max_tokens}")
        if spec.logprobs is not None:
            lp = choice.get("logprobs") or {}
            if len(lp.get("top_logprobs") or []) != spec.max_tokens:
                problems.append("top_logprobs missing or of the wrong length")
    else:
        message = choice.get("message") or {}
        if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
            problems.append(f"message: {str(message)[:120]}")
    return problems + _check_usage(obj.get("usage"), spec, expected_prompt)


def check_stream(parser: SSEParser, spec: Spec, expected_prompt: int | None) -> list[str]:
    """Problems with a complete event stream (empty list: well-formed)."""
    problems = list(parser.problems)
    events = parser.events
    if not parser.done:
        problems.append("stream ended without [DONE]")
    if not events:
        return [*problems, "no events"]
    want = "text_completion" if spec.endpoint == "completions" else "chat.completion.chunk"
    errors = [e for e in events if "error" in e]
    if errors:
        problems.append(f"error event: {str(errors[0]['error'])[:200]}")
    objects = {e.get("object") for e in events if "error" not in e}
    if objects != {want}:
        problems.append(f"objects {sorted(map(str, objects))} != [{want!r}]")
    if len({e.get("id") for e in events}) != 1:
        problems.append("events carry different ids")
    chunks = [e for e in events if e.get("choices")]
    if any(len(e["choices"]) != 1 or e["choices"][0].get("index", 0) != 0 for e in chunks):
        problems.append("a chunk with other than one choice")
    finishes = [e["choices"][0].get("finish_reason") for e in chunks
                if e["choices"][0].get("finish_reason") is not None]
    if finishes != ["length"]:
        problems.append(f"finish reasons {finishes} != ['length']")
    pieces = 0
    for e in chunks:
        c = e["choices"][0]
        piece = c.get("text") if spec.endpoint == "completions" else \
            (c.get("delta") or {}).get("content")
        if piece is not None and not isinstance(piece, str):
            problems.append(f"content piece {piece!r}")
        pieces += bool(piece)
    if pieces > spec.max_tokens:
        problems.append(f"{pieces} content pieces > max_tokens {spec.max_tokens}")
    if spec.endpoint == "chat" and chunks and \
            (chunks[0]["choices"][0].get("delta") or {}).get("role") != "assistant":
        problems.append("first chat chunk has no assistant role")
    return problems + _check_usage(events[-1].get("usage"), spec, expected_prompt)


# ---------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolating linearly between order statistics
    (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_figures(values: list[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else None}


def _median(xs: list[float]) -> float:
    return percentile(xs, 50)  # type: ignore[return-value]


def memory_flatness(samples: list[tuple[float, float]], start: float, end: float,
                    warmup_s: float, tol_mib: float,
                    growth_tol_mib: float | None = None) -> dict[str, Any]:
    """GPU memory (MiB) sampled at times ``t`` is flat over [start + warmup_s, end] if its
    spread (max - min) is at most ``tol_mib`` and it does not creep up: the median of the
    last third of the samples exceeds that of the first third by at most
    ``growth_tol_mib`` (``tol_mib / 4`` by default). Also reports a least-squares slope."""
    growth_tol = tol_mib / 4 if growth_tol_mib is None else growth_tol_mib
    window = [(t, m) for t, m in samples if start + warmup_s <= t <= end]
    out: dict[str, Any] = {"samples": len(window), "warmup_s": warmup_s, "tol_mib": tol_mib,
                           "growth_tol_mib": growth_tol}
    if len(window) < 3:
        return {**out, "ok": False, "reason": f"{len(window)} samples after the warm-up"}
    ts, ms = [t for t, _ in window], [m for _, m in window]
    t_mean, m_mean = sum(ts) / len(ts), sum(ms) / len(ms)
    var = sum((t - t_mean) ** 2 for t in ts)
    slope = sum((t - t_mean) * (m - m_mean) for t, m in window) / var if var else 0.0
    spread = max(ms) - min(ms)
    third = max(1, len(ms) // 3)
    growth = _median(ms[-third:]) - _median(ms[:third])
    return {**out, "ok": spread <= tol_mib and growth <= growth_tol,
            "first_mib": ms[0], "last_mib": ms[-1], "min_mib": min(ms), "max_mib": max(ms),
            "spread_mib": spread, "growth_mib": growth, "slope_mib_per_min": slope * 60.0}


METRICS_KEPT = ("vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_hits_total", "vllm:request_success_total",
                "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                "vllm:num_requests_running", "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc")


def _near_tie(top: dict[str, float] | None, tie_logprob: float) -> bool:
    """The two best log-probabilities of a step are closer than ``tie_logprob``."""
    best = sorted((top or {}).values(), reverse=True)
    return len(best) >= 2 and best[0] - best[1] < tie_logprob


def compare_probes(before: list[dict], after: list[dict],
                   tie_logprob: float | None = None) -> dict[str, Any]:
    """Greedy tokens and text of each probe, before vs after the soak.

    With ``tie_logprob``, for probes batched with other requests (the storm's): a probe may
    differ from a step where its two best log-probabilities ``before`` were closer than
    that, a near tie that another batch's summation order may break (the rule of
    vllm_bitdecode.testing.comparisons.assert_greedy_equal_up_to_ties): such probes are listed in
    ``ties``, not in ``mismatches``, and ``identical_up_to_ties`` allows one probe in 8
    (at least one) to do so. Log-probabilities are compared up to a probe's first
    different token (its context differs from there on)."""
    mismatches, ties = [], []
    max_lp_diff = 0.0
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        if a.get("error") or b.get("error"):
            mismatches.append({"probe": i, "error": a.get("error") or b.get("error")})
            continue
        same_steps = len(a["token_ids"])
        if a["token_ids"] != b["token_ids"] or a["text"] != b["text"]:
            step = next((s for s, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"],
                                                          strict=False)) if x != y),
                        min(len(a["token_ids"]), len(b["token_ids"])))
            tops = a.get("top_logprobs") or []
            top = tops[step] if step < len(tops) else None
            entry = {
                "probe": i, "first_different_step": step,
                "before": a["token_ids"][step:step + 4], "after": b["token_ids"][step:step + 4],
                "before_top_logprobs": top,
            }
            tie = tie_logprob is not None and step < min(len(a["token_ids"]),
                                                         len(b["token_ids"])) \
                and _near_tie(top, tie_logprob)
            (ties if tie else mismatches).append(entry)
            same_steps = step
        for x, y in zip((a.get("top_logprobs") or [])[:same_steps],
                        (b.get("top_logprobs") or [])[:same_steps], strict=False):
            for tok in set(x) & set(y):
                max_lp_diff = max(max_lp_diff, abs(x[tok] - y[tok]))
    complete = len(before) == len(after)
    out = {"n": len(before), "identical": not mismatches and not ties and complete,
           "mismatches": mismatches, "max_logprob_diff": max_lp_diff,
           "cached_tokens_before": [p.get("cached_tokens") for p in before],
           "cached_tokens_after": [p.get("cached_tokens") for p in after]}
    if tie_logprob is not None:
        out.update(ties=ties, tie_logprob=tie_logprob,
                   identical_up_to_ties=not mismatches and complete
                   and len(ties) <= max(1, len(before) // 8))
    return out


# ---------------------------------------------------------------- HTTP clients

OUTCOMES = ("ok", "cancelled", "malformed", "http_4xx", "http_5xx", "stream_error",
            "connection_error", "timeout")
# A stream_error is an ``{"error": ...}`` event inside a 200 stream: how vLLM reports a
# failure after the response has started.
SERVER_ERRORS = ("http_5xx", "stream_error", "connection_error", "timeout")


@dataclasses.dataclass
class Record:
    spec: Spec
    outcome: str
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int | None = None
    detail: str = ""
    answer: dict[str, Any] | None = None  # unstreamed answers, kept for probes only


class _Exchange:
    """What both clients do with one response, whatever reads the bytes."""

    def __init__(self, spec: Spec, expected_prompt: int | None, t0: float) -> None:
        self.spec, self.expected, self.t0 = spec, expected_prompt, t0
        self.parser = SSEParser()
        self.ttft: float | None = None

    def status(self, code: int, body: bytes) -> Record:
        """The record of a response other than 200."""
        kind = "http_5xx" if code >= 500 else "http_4xx"
        return self.record(kind, f"HTTP {code}: {body[:200]!r}")

    def line(self, raw: bytes) -> bool:
        """Feed one SSE line; True when the stream should be closed now (cancellation)."""
        event = self.parser.feed(raw)
        if event is not None and self.ttft is None:
            self.ttft = time.perf_counter() - self.t0
        limit = self.spec.cancel_after_events
        return limit is not None and not self.parser.done and len(self.parser.events) >= limit

    def stream_end(self, cancelled: bool) -> Record:
        errors = [str(e["error"])[:200] for e in self.parser.events if "error" in e]
        if errors:
            return self.record("stream_error", "; ".join(errors[:3]))
        if cancelled:
            bad = self.parser.problems
            return self.record("malformed" if bad else "cancelled", "; ".join(bad))
        problems = check_stream(self.parser, self.spec, self.expected)
        usage = self.parser.events[-1].get("usage") if self.parser.events else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return self.record("malformed" if problems else "ok", "; ".join(problems[:5]),
                           completion_tokens=tokens)

    def body(self, raw: bytes, keep: bool) -> Record:
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self.record("malformed", f"bad JSON: {raw[:120]!r}")
        problems = check_response(obj, self.spec, self.expected)
        usage = obj.get("usage") if isinstance(obj, dict) else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return self.record("malformed" if problems else "ok", "; ".join(problems[:5]),
                           completion_tokens=tokens, answer=obj if keep else None)

    def record(self, outcome: str, detail: str = "", **kw: Any) -> Record:
        return Record(self.spec, outcome, time.perf_counter() - self.t0, self.ttft,
                      detail=detail, **kw)


class AiohttpClient:
    name = "aiohttp"

    def __init__(self, base: str, connections: int) -> None:
        self.base, self.connections = base, connections
        self.session = None

    async def __aenter__(self) -> AiohttpClient:
        import aiohttp

        self._aiohttp = aiohttp
        connector = aiohttp.TCPConnector(limit=self.connections + 8, force_close=False)
        self.session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        async with self.session.get(self.base + path,
                                    timeout=self._aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.read()

    async def post(self, path: str, body: dict | None = None,
                   timeout: float = 60) -> tuple[int, bytes]:
        async with self.session.post(self.base + path, json=body,
                                     timeout=self._aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.read()

    async def request(self, spec: Spec, body: dict, expected: int | None, timeout: float,
                      keep: bool = False) -> Record:
        aiohttp = self._aiohttp
        ex = _Exchange(spec, expected, time.perf_counter())
        try:
            if spec.cancel_after_s is not None and not spec.stream:
                # headers come with the whole answer: drop the request if it takes longer
                try:
                    return await asyncio.wait_for(self._exchange(ex, body, timeout, keep),
                                                  spec.cancel_after_s)
                except asyncio.TimeoutError:
                    return ex.record("cancelled")
            return await self._exchange(ex, body, timeout, keep)
        except asyncio.TimeoutError:
            return ex.record("timeout", f"no answer within {timeout} s")
        except (aiohttp.ClientError, ConnectionError, OSError) as e:
            return ex.record("connection_error", f"{type(e).__name__}: {e}"[:300])

    async def _exchange(self, ex: _Exchange, body: dict, timeout: float,
                        keep: bool) -> Record:
        spec = ex.spec
        async with self.session.post(self.base + endpoint_path(spec), json=body,
                                     timeout=self._aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return ex.status(resp.status, await resp.read())
            if not spec.stream:
                return ex.body(await resp.read(), keep)
            async for raw in resp.content:
                if ex.line(raw):
                    resp.close()  # the server sees the disconnect and aborts the request
                    return ex.stream_end(cancelled=True)
            return ex.stream_end(cancelled=False)


class ThreadClient:
    """http.client in threads, one connection per request (no aiohttp needed)."""

    name = "threads"

    def __init__(self, base: str, connections: int) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.connections = connections

    async def __aenter__(self) -> ThreadClient:
        from concurrent.futures import ThreadPoolExecutor

        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=self.connections + 8))
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def _simple(self, method: str, path: str, body: dict | None, timeout: float):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    async def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        return await asyncio.to_thread(self._simple, "GET", path, None, timeout)

    async def post(self, path: str, body: dict | None = None,
                   timeout: float = 60) -> tuple[int, bytes]:
        return await asyncio.to_thread(self._simple, "POST", path, body, timeout)

    def _request(self, spec: Spec, body: dict, expected: int | None, timeout: float,
                 keep: bool) -> Record:
        ex = _Exchange(spec, expected, time.perf_counter())
        cancel_s = spec.cancel_after_s if not spec.stream else None
        conn = http.client.HTTPConnection(self.host, self.port,
                                          timeout=timeout if cancel_s is None else cancel_s)
        try:
            try:
                conn.request("POST", endpoint_path(spec), body=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
            except TimeoutError:
                if cancel_s is not None:  # dropped before the answer came
                    return ex.record("cancelled")
                raise
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            if resp.status != 200:
                return ex.status(resp.status, resp.read())
            if not spec.stream:
                return ex.body(resp.read(), keep)
            while True:
                raw = resp.readline()
                if not raw:
                    return ex.stream_end(cancelled=False)
                if ex.line(raw):
                    return ex.stream_end(cancelled=True)  # the finally closes the socket
        except TimeoutError:
            return ex.record("timeout", f"no answer within {timeout} s")
        except (http.client.HTTPException, ConnectionError, OSError) as e:
            return ex.record("connection_error", f"{type(e).__name__}: {e}"[:300])
        finally:
            conn.close()

    async def request(self, spec: Spec, body: dict, expected: int | None, timeout: float,
                      keep: bool = False) -> Record:
        return await asyncio.to_thread(self._request, spec, body, expected, timeout, keep)


def make_client(kind: str, base: str, connections: int):
    if kind == "auto":
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            kind = "threads"
        else:
            kind = "aiohttp"
    return AiohttpClient(base, connections) if kind == "aiohttp" else \
        ThreadClient(base, connections)


# ---------------------------------------------------------------- load and probes


async def run_load(client, *, clients: int, duration_s: float, seed: int,
                   source: PromptSource, model: str, max_model_len: int,
                   request_timeout: float) -> dict[str, Any]:
    """``clients`` concurrent clients sending requests back to back until the deadline
    (requests in flight then finish). Returns the records and the peak concurrency."""
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    deadline = t_start + duration_s
    records: list[Record] = []
    state = {"in_flight": 0, "peak": 0}

    async def one_client(cid: int) -> None:
        rng = random.Random(seed * 100_003 + cid)
        i = 0
        while loop.time() < deadline:
            spec = next_spec(rng, f"{cid}.{i}", source, max_model_len)
            i += 1
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
            try:
                rec = await client.request(spec, request_body(spec, model, source),
                                           expected_prompt_tokens(spec, source),
                                           request_timeout)
            finally:
                state["in_flight"] -= 1
            records.append(rec)

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    return {"records": records, "peak_in_flight": state["peak"],
            "wall_s": loop.time() - t_start}


def summarize_load(load: dict[str, Any], duration_s: float) -> dict[str, Any]:
    records: list[Record] = load["records"]
    counts = {o: 0 for o in OUTCOMES}
    for r in records:
        counts[r.outcome] += 1
    ok = [r for r in records if r.outcome == "ok"]
    by_kind: dict[str, dict[str, int]] = {}
    for r in records:
        key = f"{r.spec.endpoint}/{'stream' if r.spec.stream else 'plain'}/{r.spec.kind}"
        by_kind.setdefault(key, {o: 0 for o in ("requests", "ok", "cancelled")})
        by_kind[key]["requests"] += 1
        if r.outcome in ("ok", "cancelled"):
            by_kind[key][r.outcome] += 1
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    wall = load.get("wall_s") or duration_s
    return {
        "requests": len(records),
        "outcomes": counts,
        "server_errors": sum(counts[o] for o in SERVER_ERRORS),
        "cancellations_requested": sum(r.spec.cancels for r in records),
        "peak_in_flight": load["peak_in_flight"],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else None,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall if wall else None,
        "latency_s": latency_figures([r.latency_s for r in ok]),
        "latency_s_short": latency_figures([r.latency_s for r in ok if r.spec.kind == "short"]),
        "latency_s_long": latency_figures([r.latency_s for r in ok if r.spec.kind == "long"]),
        "ttft_s_stream": latency_figures([r.ttft_s for r in ok
                                          if r.spec.stream and r.ttft_s is not None]),
        "by_kind": dict(sorted(by_kind.items())),
        "problems": [{"key": r.spec.key, "outcome": r.outcome, "detail": r.detail}
                     for r in records if r.outcome not in ("ok", "cancelled")][:30],
    }


async def wait_idle(client, timeout: float = 120) -> bool:
    """Until vLLM's gauges say no request is running or waiting (cancelled requests are
    aborted asynchronously)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            status, raw = await client.get("/metrics")
        except Exception:  # noqa: BLE001 - the server may be busy; try again
            status, raw = 0, b""
        if status == 200:
            m = parse_prometheus(raw.decode("utf-8", "replace"))
            if m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0) == 0:
                return True
        elif status == 404:
            await asyncio.sleep(2)
            return False
        await asyncio.sleep(0.5)
    return False


async def poll_gauges(client, interval_s: float, out: list[dict[str, float]]) -> None:
    """vLLM's running / waiting / KV-usage gauges every ``interval_s`` until cancelled."""
    keep = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
    while True:
        try:
            status, raw = await client.get("/metrics")
            if status == 200:
                m = parse_prometheus(raw.decode("utf-8", "replace"))
                out.append({k: m[k] for k in keep if k in m})
        except Exception:  # noqa: BLE001 - a missed sample is no failure
            pass
        await asyncio.sleep(interval_s)


async def probe_answers(client, specs: list[Spec], source: PromptSource, model: str,
                        timeout: float) -> list[dict[str, Any]]:
    """The probe set's answers, one request at a time. After a probe times out the rest
    are skipped (errors too): the server is stuck, and waiting for each would only add
    their timeouts up."""
    answers: list[dict[str, Any]] = []
    for spec in specs:
        if answers and answers[-1].get("error", "").startswith(("timeout", "skipped")):
            answers.append({"error": f"skipped: a probe before {spec.key} timed out"})
            continue
        rec = await client.request(spec, request_body(spec, model, source),
                                   expected_prompt_tokens(spec, source), timeout, keep=True)
        if rec.outcome != "ok" or rec.answer is None:
            answers.append({"error": f"{rec.outcome}: {rec.detail}"})
            continue
        choice = rec.answer["choices"][0]
        details = (rec.answer.get("usage") or {}).get("prompt_tokens_details") or {}
        answers.append({
            "token_ids": choice.get("token_ids"), "text": choice.get("text"),
            "top_logprobs": (choice.get("logprobs") or {}).get("top_logprobs"),
            "cached_tokens": details.get("cached_tokens"),
        })
    return answers


async def run_probes(client, specs: list[Spec], source: PromptSource, model: str,
                     timeout: float) -> dict[str, Any]:
    """The probe set, one request at a time, after the server is idle and its prefix
    cache reset (VLLM_SERVER_DEV_MODE's /reset_prefix_cache), so that every pass runs the
    same computation."""
    idle = await wait_idle(client)
    try:
        reset_status, _ = await client.post("/reset_prefix_cache")
    except Exception as e:  # noqa: BLE001
        reset_status = f"{type(e).__name__}"
    answers = await probe_answers(client, specs, source, model, timeout)
    return {"answers": answers, "server_idle": idle, "prefix_cache_reset": reset_status}


async def probes_during_load(client, specs: list[Spec], source: PromptSource, model: str,
                             timeout: float, delay_s: float) -> dict[str, Any]:
    """The probe set once more, one request at a time, ``delay_s`` into the load (once the
    KV cache has filled): batched, and preempted, with the load's requests."""
    await asyncio.sleep(delay_s)
    t0 = time.monotonic()
    answers = await probe_answers(client, specs, source, model, timeout)
    return {"answers": answers, "delay_s": delay_s, "wall_s": time.monotonic() - t0}


# ---------------------------------------------------------------- GPU memory


def _gpu_index() -> int:
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


class GpuMemory:
    """memory.used of the server's GPU (MiB) through NVML, else nvidia-smi."""

    def __init__(self, index: int | None = None) -> None:
        self.index = _gpu_index() if index is None else index
        self.how = None
        self.name = "unknown"
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self._nvml = pynvml
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self.how = "nvml"
        except Exception:  # noqa: BLE001 - no NVML: try the command line
            try:
                out = self._smi("name")
                self.name, self.how = out, "nvidia-smi"
            except (OSError, subprocess.SubprocessError, ValueError):
                self.how = None

    def _smi(self, field: str) -> str:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits",
                              "-i", str(self.index)], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
        if not out:
            raise ValueError("nvidia-smi printed nothing")
        return out.splitlines()[0].strip()

    @property
    def available(self) -> bool:
        return self.how is not None

    def used_mib(self) -> float:
        if self.how == "nvml":
            return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
        return float(self._smi("memory.used"))


class MemorySampler:
    """Samples GpuMemory every ``interval_s`` in a thread: [(monotonic time, MiB)]."""

    def __init__(self, gpu: GpuMemory, interval_s: float) -> None:
        self.gpu, self.interval_s = gpu, interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), self.gpu.used_mib()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        if self.gpu.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def between(self, t0: float, t1: float) -> list[float]:
        return [m for t, m in self.samples if t0 <= t <= t1]


# ---------------------------------------------------------------- the server


def server_command(args: argparse.Namespace, model_dir: str, port: int) -> list[str]:
    if args.server_cmd:
        return shlex.split(args.server_cmd.format(port=port, model=model_dir))
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
           "--attention-backend", "BITDECODE", "--additional-config",
           json.dumps({"bitdecode": json.loads(args.bitdecode)}),
           "--served-model-name", SERVED_NAME, "--max-model-len", str(args.max_model_len),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization),
           "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log",
           "--enable-prompt-tokens-details"]
    if args.model == "dummy":
        cmd += ["--load-format", "dummy"]
    elif not _has_chat_template(Path(model_dir)):
        # the chat endpoint needs a template; the dummy model's is generic enough
        from vllm_bitdecode.testing.model_dir import CHAT_TEMPLATE

        cmd += ["--chat-template", CHAT_TEMPLATE]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    storm = getattr(args, "storm", None)
    if storm:
        cmd += ["--num-gpu-blocks-override", str(storm["num_gpu_blocks"])]
        if storm["block_size_from"] == "default":
            cmd += ["--block-size", str(storm["block_size"])]
    return cmd + list(args.server_arg)


def _has_chat_template(model_dir: Path) -> bool:
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("chat_template")) or (model_dir / "chat_template.jinja").exists()


def scan_log(text: str) -> dict[str, Any]:
    """Tracebacks and ERROR lines in the server log."""
    lines = text.splitlines()
    tracebacks = [i for i, ln in enumerate(lines) if ln.startswith("Traceback")
                  or "Traceback (most recent call last)" in ln]
    errors = [ln for ln in lines if re.search(r"\bERROR\b", ln)]
    return {"tracebacks": len(tracebacks), "error_lines": len(errors),
            "first_errors": errors[:10],
            "first_traceback": "\n".join(lines[tracebacks[0]:tracebacks[0] + 30])
            if tracebacks else None}


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 clients, 20 s, 5 s warm-up, 1 s memory samples")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (300)")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (64)")
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="seconds of load before memory must be flat (60)")
    ap.add_argument("--mem-interval-s", type=float, default=None,
                    help="seconds between GPU memory samples (5)")
    ap.add_argument("--mem-tol-mib", type=float, default=256.0,
                    help="largest allowed spread of GPU memory after the warm-up")
    ap.add_argument("--no-gpu-memory", action="store_true",
                    help="do not sample GPU memory (its checks are skipped)")
    ap.add_argument("--model", default="dummy",
                    help="'dummy' (a dummy-weight tiny Llama) or a model directory with weights")
    ap.add_argument("--model-dir", default=None, help="where to write the dummy model")
    ap.add_argument("--bitdecode", default='{"bits": 4}', help="the bitdecode settings (JSON)")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="one more vllm serve argument (repeat; use --server-arg=--flag=value)")
    ap.add_argument("--server-cmd", default=None,
                    help="run this command instead of vllm serve ({port}, {model} "
                         "substituted); for testing the harness")
    ap.add_argument("--preemption-storm", action="store_true",
                    help="a KV cache (--num-gpu-blocks-override, --block-size) that holds the "
                         "longest request --storm-margin times, far less than the clients "
                         "need, so that vLLM preempts over and over; checks that it did, and "
                         "runs the probes during the storm too; results *_storm.json")
    ap.add_argument("--storm-margin", type=float, default=STORM_MARGIN,
                    help="the storm's KV cache in longest requests (1.5)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--max-wall-s", type=float, default=None,
                    help="stop (and fail) a run not finished this long after the server's "
                         "launch (start-up and request timeouts, duration, 600 s)")
    ap.add_argument("--transport", choices=("auto", "aiohttp", "threads"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results JSON (benchmarks/results/soak_<gpu>.json)")
    ap.add_argument("--server-log", default=None, help="server log (next to --out)")
    args = ap.parse_args(argv)
    quick = dict(duration=20.0, clients=16, warmup_s=5.0, mem_interval_s=1.0)
    full = dict(duration=300.0, clients=64, warmup_s=60.0, mem_interval_s=5.0)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    json.loads(args.bitdecode)  # fail early on bad JSON
    try:
        args.storm = kv_cache_plan(args, prompt_source(args))
    except ValueError as e:
        ap.error(str(e))
    if args.max_wall_s is None:
        args.max_wall_s = wall_limit_s(args)
    return args


def wall_limit_s(args: argparse.Namespace) -> float:
    """Seconds from the server's launch after which the run is stopped, whatever it waits
    for: each wait has its own timeout, and a legitimate run stays well within their sum
    (start-up, the load and its last requests, a timed-out probe in each of up to three
    probe passes, the idle waits)."""
    return args.startup_timeout + args.duration + 4 * args.request_timeout + 600


def results_path(args: argparse.Namespace, slug: str) -> Path:
    """--out, else benchmarks/results/soak_<gpu>[_quick][_storm].json."""
    if args.out:
        return Path(args.out)
    suffix = ("_quick" if args.quick else "") + ("_storm" if args.preemption_storm else "")
    return RESULTS / f"soak_{slug}{suffix}.json"


def prompt_source(args: argparse.Namespace) -> PromptSource:
    if args.model == "dummy":
        return PromptSource()
    # a real tokenizer: up to ~3 tokens per word; long prompts scaled to fit
    mix = Mix(long_words=(256, 2000), prefix_words=(128, 512))
    return PromptSource(words=TEXT_WORDS, tokens_per_word=3, exact_tokens=False, mix=mix)


def _vllm_version() -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version("vllm")
    except Exception:  # noqa: BLE001
        return None


def evaluate(result: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every check: {"ok": bool, "detail": str}; "skipped" checks count as passed."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks[name] = {"ok": bool(ok), "detail": detail}

    if not result.get("server_started"):
        check("server_started", False, result.get("startup_error", ""))
        return checks
    check("server_started", True, f"{result['startup_s']:.1f} s")
    check("run_completed", "error" not in result, result.get("error", ""))
    load = result.get("load") or {}
    oc = load.get("outcomes", {})
    check("no_server_errors", load.get("server_errors", 1) == 0,
          ", ".join(f"{o} {oc.get(o, 0)}" for o in SERVER_ERRORS))
    check("no_rejected_requests", oc.get("http_4xx", 1) == 0, f"http_4xx {oc.get('http_4xx')}")
    check("every_completed_request_well_formed", oc.get("malformed", 1) == 0,
          f"malformed {oc.get('malformed')}")
    check("load_reached_concurrency", load.get("peak_in_flight", 0) >= args.clients,
          f"peak {load.get('peak_in_flight')} of {args.clients} clients")
    kinds = load.get("by_kind", {})
    missing = [k for k in (f"{e}/{s}/{n}" for e in ("completions", "chat")
                           for s in ("stream", "plain") for n in ("short", "long"))
               if kinds.get(k, {}).get("ok", 0) == 0]
    check("mix_covered", not missing, f"no completed request of {missing}" if missing else "")
    check("cancellations_exercised", oc.get("cancelled", 0) > 0,
          f"{oc.get('cancelled', 0)} cancelled")
    check("server_alive_after_load", result.get("server_alive_after_load", False))
    probes = result.get("probes") or {}
    check("probes_identical", probes.get("identical", False),
          json.dumps(probes.get("mismatches", []))[:500])
    log = result.get("server_log_scan") or {}
    check("server_log_clean", log.get("tracebacks", 1) == 0 and log.get("error_lines", 1) == 0,
          f"{log.get('tracebacks')} tracebacks, {log.get('error_lines')} ERROR lines")
    shutdown = result.get("shutdown") or {}
    check("shutdown_on_sigterm", shutdown.get("clean", False),
          f"exit {shutdown.get('exit_code')} in {shutdown.get('exit_s', 0):.1f} s, "
          f"{shutdown.get('children_left')} children left, killed {shutdown.get('killed', False)}")
    mem = result.get("gpu_memory") or {}
    if args.no_gpu_memory:
        check("gpu_memory_flat", True, "skipped (--no-gpu-memory)")
        check("gpu_memory_released", True, "skipped (--no-gpu-memory)")
    elif not mem.get("sampler"):
        check("gpu_memory_flat", False, "GPU memory could not be sampled (no NVML/nvidia-smi)")
        check("gpu_memory_released", False, "GPU memory could not be sampled")
    else:
        flat = mem.get("flatness") or {}
        check("gpu_memory_flat", flat.get("ok", False),
              f"spread {flat.get('spread_mib')} MiB over {flat.get('samples')} samples "
              f"(tolerance {flat.get('tol_mib')})" if "spread_mib" in flat
              else flat.get("reason", ""))
        before, after = mem.get("before_start_mib"), mem.get("after_shutdown_mib")
        released = before is not None and after is not None and after <= before + args.mem_tol_mib
        check("gpu_memory_released", released,
              f"{after} MiB after shutdown vs {before} MiB before start")
    if args.preemption_storm:
        storm = result.get("storm") or {}
        preemptions = (result.get("vllm_metrics") or {}).get("vllm:num_preemptions_total")
        check("preemptions_happened", bool(preemptions and preemptions > 0),
              f"vllm:num_preemptions_total {preemptions}")
        logged, planned = storm.get("kv_cache_tokens_logged"), storm.get("kv_cache_tokens")
        check("kv_cache_as_planned", logged is not None and logged == planned,
              f"server's GPU KV cache size {logged} tokens; planned {planned} "
              f"({storm.get('num_gpu_blocks')} blocks of {storm.get('block_size')})")
        during = result.get("probes_during_storm") or {}
        check("probes_during_storm_match", during.get("identical_up_to_ties", False),
              f"{len(during.get('ties', []))} at near ties; mismatches "
              + json.dumps(during.get("mismatches", "not run"))[:500])
    return checks


async def _soak(args: argparse.Namespace, result: dict[str, Any], base: str,
                proc: subprocess.Popen, log_path: Path, source: PromptSource) -> None:
    client_cm = make_client(args.transport, base, args.clients)
    result["settings"]["transport"] = client_cm.name
    async with client_cm as client:
        t_wait = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} during start-up")
            try:
                status, _ = await client.get("/health", timeout=5)
                if status == 200:
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() - t_wait > args.startup_timeout:
                raise RuntimeError(f"server not healthy after {args.startup_timeout} s")
            await asyncio.sleep(1)
        result["server_started"] = True
        result["_log_at_healthy"] = log_path.stat().st_size
        result["startup_s"] = time.monotonic() - result["_t_launch"]
        print(f"[soak] server up in {result['startup_s']:.1f} s", flush=True)
        result["_children"] = child_processes(proc.pid)

        specs = probe_specs(source, args.max_model_len)
        before = await run_probes(client, specs, source, SERVED_NAME, args.request_timeout)
        print(f"[soak] probes before: {sum('error' not in a for a in before['answers'])}"
              f"/{len(specs)} answered", flush=True)

        t0 = time.monotonic()
        result["_soak_window"] = [t0, None]
        print(f"[soak] {args.clients} clients for {args.duration:.0f} s ...", flush=True)
        gauges: list[dict[str, float]] = []
        poller = asyncio.create_task(poll_gauges(client, args.mem_interval_s, gauges))
        storm_probes = asyncio.create_task(probes_during_load(
            client, specs, source, SERVED_NAME, args.request_timeout,
            delay_s=args.duration / 4)) if args.preemption_storm else None
        try:
            load = await run_load(client, clients=args.clients, duration_s=args.duration,
                                  seed=args.seed, source=source, model=SERVED_NAME,
                                  max_model_len=args.max_model_len,
                                  request_timeout=args.request_timeout)
            during = await storm_probes if storm_probes is not None else None
        finally:
            for task in (poller, storm_probes):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        result["_soak_window"][1] = time.monotonic()
        if during is not None:
            result["probes_during_storm"] = {
                **compare_probes(before["answers"], during["answers"], TIE_LOGPROB),
                "delay_s": during["delay_s"], "wall_s": during["wall_s"]}
            print(f"[soak] probes during the storm match up to near ties: "
                  f"{result['probes_during_storm']['identical_up_to_ties']}", flush=True)
        result["server_concurrency"] = {
            "samples": len(gauges),
            "max_running": max((g.get("vllm:num_requests_running", 0) for g in gauges),
                               default=None),
            "max_waiting": max((g.get("vllm:num_requests_waiting", 0) for g in gauges),
                               default=None),
            "max_kv_cache_usage": max((g.get("vllm:kv_cache_usage_perc", 0) for g in gauges),
                                      default=None),
        }
        result["load"] = summarize_load(load, args.duration)
        lo = result["load"]
        print(f"[soak] {lo['requests']} requests: {lo['outcomes']}; latency p50 "
              f"{lo['latency_s']['p50']} s, p99 {lo['latency_s']['p99']} s", flush=True)
        result["server_alive_after_load"] = proc.poll() is None

        after = await run_probes(client, specs, source, SERVED_NAME, args.request_timeout)
        result["probes"] = {**compare_probes(before["answers"], after["answers"]),
                            "before": {k: v for k, v in before.items() if k != "answers"},
                            "after": {k: v for k, v in after.items() if k != "answers"},
                            "token_ids_before": [a.get("token_ids") for a in before["answers"]]}
        print(f"[soak] probes identical: {result['probes']['identical']}", flush=True)
        try:
            status, raw = await client.get("/metrics")
            metrics = parse_prometheus(raw.decode("utf-8", "replace")) if status == 200 else {}
        except Exception:  # noqa: BLE001
            metrics = {}
        result["vllm_metrics"] = {k: metrics[k] for k in METRICS_KEPT if k in metrics}


async def _soak_within(limit_s: float, *soak_args: Any) -> None:
    """:func:`_soak`, stopped after ``limit_s`` seconds (--max-wall-s)."""
    try:
        await asyncio.wait_for(_soak(*soak_args), limit_s)
    except asyncio.TimeoutError:
        raise RuntimeError(f"not finished within {limit_s:.0f} s (--max-wall-s); "
                           "stopped") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = None if args.no_gpu_memory else GpuMemory()
    device = gpu.name if gpu and gpu.available else "unknown"
    slug = gpu_slug(device) if device != "unknown" else "unknown"
    out = results_path(args, slug)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.server_log) if args.server_log else out.with_name(out.stem + "_server.log")
    source = prompt_source(args)
    result: dict[str, Any] = {
        "benchmark": "soak", "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "vllm": _vllm_version(),
        "settings": {
            "quick": args.quick, "duration_s": args.duration, "clients": args.clients,
            "warmup_s": args.warmup_s, "mem_interval_s": args.mem_interval_s,
            "mem_tol_mib": args.mem_tol_mib, "model": args.model,
            "bitdecode": json.loads(args.bitdecode),
            "max_model_len": args.max_model_len,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "enforce_eager": args.enforce_eager, "server_args": args.server_arg,
            "seed": args.seed, "request_timeout_s": args.request_timeout,
            "mix": dataclasses.asdict(source.mix), "probe_words": list(PROBE_WORDS),
            "probe_max_tokens": PROBE_MAX_TOKENS, "preemption_storm": args.storm,
            "max_wall_s": args.max_wall_s,
        },
        "server_log": str(log_path), "server_started": False,
    }
    tmp = None
    log_at_sigterm = 0
    if args.model == "dummy" and not args.server_cmd:
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="soak-model-")
            model_dir = Path(tmp.name) / "tiny-llama"
        write_model_dir(model_dir, **TINY_LLAMA)
    else:
        model_dir = Path(args.model)
    port = free_port()
    cmd = server_command(args, str(model_dir), port)
    result["server_command"] = shlex.join(cmd)
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", PYTHONUNBUFFERED="1")
    sampler = MemorySampler(gpu, args.mem_interval_s) if gpu and gpu.available else None
    proc = None
    with open(log_path, "w") as log, (sampler or contextlib.nullcontext()):
        try:
            if sampler is not None:
                time.sleep(min(3.0, 2 * args.mem_interval_s))  # baseline samples
            t_before = time.monotonic()
            result["_t_launch"] = t_before
            print(f"[soak] starting: {result['server_command']}", flush=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(ROOT))
            asyncio.run(_soak_within(args.max_wall_s, args, result, f"http://127.0.0.1:{port}",
                                     proc, log_path, source))
        except Exception as e:  # noqa: BLE001 - recorded, and the checks fail
            result.setdefault("startup_error", f"{type(e).__name__}: {e}")
            result["error"] = f"{type(e).__name__}: {e}"
            print(f"[soak] error: {result['error']}", flush=True)
        finally:
            if proc is not None:
                log.flush()
                log_at_sigterm = log_path.stat().st_size
                result["shutdown"] = stop_server(proc, result.pop("_children", []) or
                                                 child_processes(proc.pid))
                print(f"[soak] server stopped: {result['shutdown']}", flush=True)
            if sampler is not None:
                end = time.monotonic() + 30
                base_mib = sampler.between(0, t_before)
                while time.monotonic() < end:  # the driver frees memory a moment later
                    time.sleep(args.mem_interval_s)
                    last = sampler.samples[-1][1] if sampler.samples else None
                    if base_mib and last is not None and \
                            last <= min(base_mib) + args.mem_tol_mib:
                        break
    raw_log = log_path.read_bytes()
    log_text = raw_log.decode("utf-8", "replace")
    # errors while serving (from healthy to SIGTERM) fail the soak; what the start-up and
    # the shutdown log is reported
    up = result.get("_log_at_healthy", 0)
    down = log_at_sigterm if proc is not None else len(raw_log)
    segments = {"server_log_scan_startup": (0, up), "server_log_scan": (up, down),
                "server_log_scan_shutdown": (down, len(raw_log))}
    for key, (a, b) in segments.items():
        result[key] = scan_log(raw_log[a:max(a, b)].decode("utf-8", "replace"))
    if sampler is not None:
        t_before = result.get("_t_launch", 0)
        window = result.get("_soak_window") or [None, None]
        base_mib = sampler.between(0, t_before)
        mem: dict[str, Any] = {"sampler": gpu.how, "gpu_index": gpu.index,
                               "before_start_mib": min(base_mib) if base_mib else None,
                               "after_shutdown_mib": sampler.samples[-1][1]
                               if sampler.samples else None}
        if window[0] is not None and window[1] is not None:
            mem["flatness"] = memory_flatness(sampler.samples, window[0], window[1],
                                              args.warmup_s, args.mem_tol_mib)
            during = sampler.between(window[0], window[1])
            mem["during_load_max_mib"] = max(during) if during else None
        mem["timeline"] = [[round(t - t_before, 1), round(m)] for t, m in sampler.samples]
        result["gpu_memory"] = mem
    else:
        result["gpu_memory"] = {"sampler": None}
    for key in [k for k in result if k.startswith("_")]:
        result.pop(key)
    if not result.get("server_started"):
        result["server_log_tail"] = log_text[-4000:]
    if args.storm:
        result["storm"] = {**args.storm, "kv_cache_tokens_logged": parse_kv_cache_tokens(log_text)}
    checks = evaluate(result, args)
    result["checks"] = checks
    result["passed"] = all(c["ok"] for c in checks.values())
    out.write_text(json.dumps(result, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    for name, c in checks.items():
        print(f"[soak] {'PASS' if c['ok'] else 'FAIL'} {name}: {c['detail']}", flush=True)
    print(f"[soak] {'passed' if result['passed'] else 'FAILED'}; results in {out}, "
          f"server log {log_path}", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
