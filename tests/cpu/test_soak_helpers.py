"""CPU checks of benchmarks/soak.py: the request mix, SSE parsing and answer validation,
percentiles, memory flatness, probe comparison, the checks, and the load loop and the
whole script against a small stand-in for vLLM's OpenAI server (this file, run as a
script, is that server: ``python tests/cpu/test_soak_helpers.py --port N``)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "soak.py"


def _load_soak():
    if "soak" in sys.modules:
        return sys.modules["soak"]
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the stand-in server


def _prompt_tokens(body: dict) -> int:
    """The dummy model's word-level tokenizer on our prompts (words without punctuation)."""
    if "prompt" in body:
        return len(body["prompt"].split())
    return sum(2 + len(m["content"].split()) for m in body["messages"]) + 2


def _state_key():
    try:
        from aiohttp import web
    except ImportError:
        return "state"
    return web.AppKey("state", dict)


STATE = _state_key()


def make_app(fail_every: int = 0, malformed_every: int = 0, drop_every: int = 0,
             error_event_every: int = 0, drift_after: int = 0, token_delay_s: float = 0.0005,
             preempt_every: int = 0):
    """An aiohttp app answering like vLLM's OpenAI server; faults on request: every
    ``fail_every``-th generation request gets HTTP 500, every ``malformed_every``-th
    stream has a broken line, every ``drop_every``-th stream is cut without [DONE], every
    ``error_event_every``-th stream carries an error event (as vLLM reports a failure
    mid-stream), and after ``drift_after`` requests the answers change (probes differ).
    Every ``preempt_every``-th request counts as a preemption in /metrics."""
    from aiohttp import web

    state = {"requests": 0, "running": 0, "aborted": 0, "completed": 0, "preemptions": 0}

    def tokens(body: dict, n: int) -> list[int]:
        key = json.dumps(body.get("prompt", body.get("messages")), sort_keys=True)
        h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        if drift_after and state["requests"] > drift_after:
            h += 1
        return [20 + (h + 7919 * i) % 31000 for i in range(n)]

    async def generate(request: web.Request):
        body = await request.json()
        state["requests"] += 1
        n = state["requests"]
        chat = request.path.endswith("/chat/completions")
        if fail_every and n % fail_every == 0:
            return web.json_response({"error": {"message": "injected"}}, status=500)
        if preempt_every and n % preempt_every == 0:
            state["preemptions"] += 1
        max_tokens = body["max_tokens"]
        ids = tokens(body, max_tokens)
        pieces = [f" w{t}" for t in ids]
        prompt = _prompt_tokens(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": max_tokens,
                 "total_tokens": prompt + max_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{n}"
        state["running"] += 1
        try:
            if not body.get("stream"):
                await asyncio.sleep(token_delay_s * max_tokens)
                if chat:
                    choice = {"index": 0, "finish_reason": "length",
                              "message": {"role": "assistant", "content": "".join(pieces)}}
                else:
                    choice = {"index": 0, "finish_reason": "length", "text": "".join(pieces)}
                    if body.get("return_token_ids"):
                        choice["token_ids"] = ids
                    if body.get("logprobs"):
                        choice["logprobs"] = {
                            "tokens": pieces, "token_logprobs": [-1.0] * max_tokens,
                            "top_logprobs": [{p: -1.0, " w1": -2.5} for p in pieces]}
                state["completed"] += 1
                return web.json_response({
                    "id": rid, "object": "chat.completion" if chat else "text_completion",
                    "model": body["model"], "choices": [choice], "usage": usage})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            obj = "chat.completion.chunk" if chat else "text_completion"

            async def send(payload) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                await resp.write(f"data: {data}\n\n".encode())

            try:
                if chat:
                    await send({"id": rid, "object": obj, "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None}]})
                for i, piece in enumerate(pieces):
                    await asyncio.sleep(token_delay_s)
                    last = i == len(pieces) - 1
                    choice = {"index": 0, "finish_reason": "length" if last else None}
                    if chat:
                        choice["delta"] = {"content": piece}
                    else:
                        choice["text"] = piece
                    await send({"id": rid, "object": obj, "choices": [choice]})
                    if malformed_every and n % malformed_every == 0 and i == 0:
                        await send("{not json")
                    if error_event_every and n % error_event_every == 0 and i == 0:
                        await send({"error": {"message": "injected", "code": 500}})
                    if drop_every and n % drop_every == 0 and i == 0:
                        request.transport.close()
                        return resp
                await send({"id": rid, "object": obj, "choices": [], "usage": usage})
                await send("[DONE]")
            except (ConnectionResetError, asyncio.CancelledError):
                state["aborted"] += 1  # the client went away: vLLM aborts the request
                return resp
            state["completed"] += 1
            return resp
        finally:
            state["running"] -= 1

    async def health(request):
        return web.Response(text="")

    async def metrics(request):
        return web.Response(text=(
            "# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="m"}} {state["running"]}\n'
            f'vllm:num_requests_waiting{{engine="0",model_name="m"}} 0.0\n'
            f'vllm:request_success_total{{finished_reason="length"}} {state["completed"]}\n'
            f'vllm:num_preemptions_total{{engine="0",model_name="m"}} {state["preemptions"]}\n'
        ))

    async def reset(request):
        return web.Response(status=200)

    app = web.Application()
    app[STATE] = state
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/reset_prefix_cache", reset)
    return app


class _FakeServer:
    def __init__(self, **faults) -> None:
        self.app = make_app(**faults)

    async def __aenter__(self):
        from aiohttp import web

        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    @property
    def state(self) -> dict:
        return self.app[STATE]


# ---------------------------------------------------------------- fixtures and data


@pytest.fixture(scope="module")
def soak():
    return _load_soak()


@pytest.fixture(scope="module")
def source(soak):
    return soak.PromptSource()


def _spec(soak, **kw):
    base = dict(key="t.0", endpoint="completions", stream=False, kind="short", words=5,
                prefix=None, max_tokens=3, seed=1)
    return soak.Spec(**{**base, **kw})


def _completion_events(n=3, prompt=5, rid="cmpl-1"):
    events = [{"id": rid, "object": "text_completion",
               "choices": [{"index": 0, "text": f" w{i}",
                            "finish_reason": "length" if i == n - 1 else None}]}
              for i in range(n)]
    events.append({"id": rid, "object": "text_completion", "choices": [],
                   "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                             "total_tokens": prompt + n}})
    return events


def _chat_events(n=3, prompt=9, rid="chatcmpl-1"):
    events = [{"id": rid, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None}]}]
    events += [{"id": rid, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": f" w{i}"},
                             "finish_reason": "length" if i == n - 1 else None}]}
               for i in range(n)]
    events.append({"id": rid, "object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                             "total_tokens": prompt + n}})
    return events


def _parse(soak, events, done=True, extra_lines=()):
    p = soak.SSEParser()
    for e in events:
        p.feed(f"data: {json.dumps(e)}\n".encode())
        p.feed(b"\n")
    for line in extra_lines:
        p.feed(line)
    if done:
        p.feed(b"data: [DONE]\n")
    return p


# ---------------------------------------------------------------- the request mix


def test_mix_is_deterministic_and_has_the_asked_shares(soak, source):
    a = soak.make_mix(0, 4000, source, 8192)
    assert a == soak.make_mix(0, 4000, source, 8192)
    assert a != soak.make_mix(1, 4000, source, 8192)
    mix = source.mix

    def share(pred, among=a):
        return sum(map(pred, among)) / len(among)

    assert abs(share(lambda s: s.endpoint == "chat") - mix.p_chat) < 0.03
    assert abs(share(lambda s: s.stream) - mix.p_stream) < 0.03
    assert abs(share(lambda s: s.kind == "long") - mix.p_long) < 0.03
    assert abs(share(lambda s: s.prefix is not None) - mix.p_shared_prefix) < 0.03
    long_streams = [s for s in a if s.stream and s.max_tokens >= 16]
    assert abs(share(lambda s: s.cancel_after_events is not None, long_streams)
               - mix.p_cancel_stream) < 0.04
    plain = [s for s in a if not s.stream]
    assert abs(share(lambda s: s.cancel_after_s is not None, plain) - mix.p_cancel_plain) < 0.02
    # every kind of request occurs, prefixes are reused
    kinds = {(s.endpoint, s.stream, s.kind, s.prefix is not None) for s in a}
    assert len(kinds) == 16
    assert len({s.prefix for s in a if s.prefix is not None}) == mix.num_prefixes


def test_mix_respects_ranges_and_the_context_length(soak, source):
    mix = source.mix
    for max_model_len in (8192, 4096):
        for s in soak.make_mix(3, 3000, source, max_model_len):
            lo, hi = mix.long_max_tokens if s.kind == "long" else mix.short_max_tokens
            assert lo <= s.max_tokens <= hi
            assert s.words >= 1
            assert source.prompt_words(s) + s.max_tokens + 16 <= max_model_len
            if s.cancel_after_events is not None:
                assert s.stream and s.max_tokens >= 16
                assert mix.cancel_after_events[0] <= s.cancel_after_events \
                    <= mix.cancel_after_events[1]
            if s.cancel_after_s is not None:
                assert not s.stream
            if max_model_len == 8192 and s.prefix is None:
                wlo, whi = mix.long_words if s.kind == "long" else mix.short_words
                assert wlo <= s.words <= whi


def test_prompts_are_reproducible_and_prefixes_shared(soak, source):
    specs = [s for s in soak.make_mix(5, 400, source, 8192) if s.prefix == 0][:2]
    assert len(specs) == 2
    (pa, oa), (pb, ob) = source.text(specs[0]), source.text(specs[1])
    assert pa == pb and oa != ob
    assert source.text(specs[0]) == source.text(specs[0])
    assert len(oa.split()) == specs[0].words
    assert all(w in soak.DUMMY_WORDS for w in oa.split()[:50])


def test_request_bodies(soak, source):
    plain = _spec(soak, words=4, max_tokens=7)
    body = soak.request_body(plain, "m", source)
    assert body["model"] == "m" and body["temperature"] == 0.0 and body["ignore_eos"]
    assert body["max_tokens"] == 7 and body["return_token_ids"] is True
    assert len(body["prompt"].split()) == 4 and "stream" not in body
    chat = _spec(soak, endpoint="chat", stream=True, prefix=1, words=6)
    body = soak.request_body(chat, "m", source)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert len(body["messages"][1]["content"].split()) == 6
    assert soak.endpoint_path(chat) == "/v1/chat/completions"
    assert soak.endpoint_path(plain) == "/v1/completions"


def test_expected_prompt_tokens_match_the_tiny_tokenizer(soak, tmp_path):
    """The exact prompt-token counts the script demands, against the real word-level
    tokenizer that make-model writes (and its chat template)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from vllm_bitdecode.testing.model_dir import write_model_dir

    model = write_model_dir(tmp_path / "m", vocab_size=32000)
    tok = AutoTokenizer.from_pretrained(str(model))
    source = soak.PromptSource(mix=soak.Mix(prefix_words=(20, 40)))
    for endpoint in ("completions", "chat"):
        for prefix in (None, 2):
            spec = _spec(soak, endpoint=endpoint, prefix=prefix, words=13)
            body = soak.request_body(spec, "m", source)
            if endpoint == "completions":
                n = len(tok(body["prompt"]).input_ids)
            else:
                n = len(tok.apply_chat_template(body["messages"], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
            assert n == soak.expected_prompt_tokens(spec, source), (endpoint, prefix)
    assert soak.expected_prompt_tokens(_spec(soak), soak.PromptSource(exact_tokens=False)) \
        is None


def test_probe_set_is_fixed_and_fits(soak, source):
    specs = soak.probe_specs(source, 8192)
    assert specs == soak.probe_specs(source, 8192)
    assert [s.words for s in specs] == list(soak.PROBE_WORDS)
    assert all(not s.stream and s.endpoint == "completions" and s.logprobs == 2 for s in specs)
    assert not any(s.cancels for s in specs)
    small = soak.probe_specs(source, 2048)
    assert all(s.words + s.max_tokens + 16 <= 2048 for s in small)


# ---------------------------------------------------------------- the storm's KV cache


def _real_source(soak):
    """The prompt source of ``--model PATH`` (a tokenizer of the model's own)."""
    return soak.prompt_source(soak.parse_args(["--model", "m"]))


@pytest.mark.parametrize("max_model_len", [2048, 8192, 32768])
def test_longest_request_bounds_every_request(soak, source, max_model_len):
    for src in (source, _real_source(soak)):
        longest = soak.longest_request_tokens(src, max_model_len)
        assert longest <= max_model_len
        specs = soak.make_mix(7, 3000, src, max_model_len) + soak.probe_specs(src, max_model_len)
        # vLLM refuses a request longer than max_model_len (an answer, not a wait)
        sizes = [min(max_model_len, soak.request_tokens_bound(s, src)) for s in specs]
        assert max(sizes) <= longest
        assert max(sizes) >= 0.85 * longest  # and the bound is not a loose one
    # with the dummy tokenizer the bound of a request is its exact size
    spec = _spec(soak, endpoint="chat", words=10, prefix=None, max_tokens=7)
    assert soak.request_tokens_bound(spec, source) == 10 + 4 + 7


def test_storm_plan_fits_the_longest_request_and_not_the_clients(soak, source):
    plan = soak.storm_plan(source, 8192, 64, 16)
    longest = soak.longest_request_tokens(source, 8192)
    assert plan["longest_request_tokens"] == longest == 8192
    usable = (plan["num_gpu_blocks"] - 1) * 16  # vLLM's block pool keeps one block aside
    assert 1.5 * longest <= usable < 1.5 * longest + 16
    assert plan["kv_cache_tokens"] == plan["num_gpu_blocks"] * 16
    # 64 clients need several times that, and the 16 of --quick still more than there is
    assert plan["clients_need_blocks"] >= 4 * plan["num_gpu_blocks"]
    assert plan["oversubscription"] == pytest.approx(
        plan["clients_need_blocks"] / (plan["num_gpu_blocks"] - 1), abs=0.01)
    assert soak.storm_plan(source, 8192, 16, 16)["oversubscription"] > 1.2
    # the same tokens whatever the block size; a smaller margin, a smaller cache
    big = soak.storm_plan(source, 8192, 64, 64)
    assert abs(big["kv_cache_tokens"] - plan["kv_cache_tokens"]) <= 2 * 64
    assert soak.storm_plan(source, 8192, 64, 16, margin=1.25)["num_gpu_blocks"] < \
        plan["num_gpu_blocks"]
    small = soak.storm_plan(source, 2048, 64, 16)
    assert (small["num_gpu_blocks"] - 1) * 16 >= 1.5 * 2048
    with pytest.raises(ValueError, match="storm-margin"):
        soak.storm_plan(source, 8192, 64, 16, margin=1.0)


def test_server_block_size_is_the_one_bitdecode_uses(soak):
    """The storm's arithmetic assumes BITDECODE's block size: vLLM's default, kept."""
    from vllm.config.cache import CacheConfig

    from vllm_bitdecode import page_format
    from vllm_bitdecode.backend.backend import BitDecodeAttentionBackend

    default = CacheConfig.DEFAULT_BLOCK_SIZE
    assert BitDecodeAttentionBackend.get_preferred_block_size(default) == soak.SERVER_BLOCK_SIZE
    assert soak.SERVER_BLOCK_SIZE in page_format.SUPPORTED_BLOCK_SIZES


def test_server_flag(soak):
    f = soak.server_flag
    assert f([], "--block-size") is None
    assert f(["--block-size=32"], "--block-size") == "32"
    assert f(["--enforce-eager", "--block-size", "64"], "--block-size") == "64"
    assert f(["--block_size=128"], "--block-size") == "128"
    assert f(["--block-size=32", "--block-size=64"], "--block-size") == "64"
    assert f(["--block-sizes=32", "--num-gpu-blocks-override=9"], "--block-size") is None
    assert f(["--block-size"], "--block-size") is None
    assert f(["--num-gpu-blocks-override=9"], "--num-gpu-blocks-override") == "9"


def test_storm_options(soak, source):
    args = soak.parse_args(["--preemption-storm"])
    plan = args.storm
    assert plan == {**soak.storm_plan(source, 8192, 64, 16), "block_size_from": "default"}
    joined = " ".join(soak.server_command(args, "/m", 1))
    assert f"--num-gpu-blocks-override {plan['num_gpu_blocks']}" in joined
    assert "--block-size 16" in joined
    assert soak.results_path(args, "h200").name == "soak_h200_storm.json"
    quick = soak.parse_args(["--quick", "--preemption-storm"])
    assert quick.storm["clients"] == 16
    assert soak.results_path(quick, "h200").name == "soak_h200_quick_storm.json"
    # a block size of the user's is planned with and not given twice
    own = soak.parse_args(["--preemption-storm", "--server-arg=--block-size=64"])
    cmd = soak.server_command(own, "/m", 1)
    assert own.storm["block_size"] == 64 and own.storm["block_size_from"] == "--server-arg"
    assert "--block-size" not in cmd and cmd.count("--block-size=64") == 1
    plain = soak.parse_args([])
    assert plain.storm is None and soak.results_path(plain, "h200").name == "soak_h200.json"
    assert "--num-gpu-blocks-override" not in soak.server_command(plain, "/m", 1)
    assert plain.max_wall_s == soak.wall_limit_s(plain) > 300 + 900
    # the smallest override that holds the longest request is accepted
    assert soak.parse_args(["--server-arg=--num-gpu-blocks-override=513"]).storm is None


@pytest.mark.parametrize(("argv", "words"), [
    (["--server-arg=--num-gpu-blocks-override=64"], "queue it forever"),
    (["--server-arg=--num-gpu-blocks-override", "--server-arg=512"], "at least 513"),
    (["--max-model-len", "2048", "--server-arg=--num_gpu_blocks_override=128"], "at least 129"),
    (["--server-arg=--block-size=64", "--server-arg=--num-gpu-blocks-override=128"],
     "at least 129"),
    (["--preemption-storm", "--server-arg=--num-gpu-blocks-override=900"], "picks"),
    (["--preemption-storm", "--storm-margin", "1"], "storm-margin"),
    (["--server-arg=--block-size=x"], "not a number"),
])
def test_kv_caches_that_would_hang_are_refused(soak, capsys, argv, words):
    with pytest.raises(SystemExit):
        soak.parse_args(argv)
    assert words in capsys.readouterr().err


# ---------------------------------------------------------------- SSE and answers


def test_sse_parser(soak):
    p = soak.SSEParser()
    assert p.feed(b": keep-alive\n") is None
    assert p.feed(b"\r\n") is None
    assert p.feed(b'data: {"a": 1}\r\n') == {"a": 1}
    assert p.feed('data:{"b": 2}') == {"b": 2}
    assert p.feed(b"data: [DONE]\n") is None and p.done
    assert p.events == [{"a": 1}, {"b": 2}] and p.problems == []
    p.feed(b'data: {"c": 3}\n')
    assert p.problems and "after [DONE]" in p.problems[0]
    q = soak.SSEParser()
    q.feed(b"event: x\n")
    q.feed(b"data: {oops\n")
    q.feed(b"data: [1, 2]\n")
    assert len(q.problems) == 3 and not q.events and not q.done


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_valid_streams_pass(soak, endpoint):
    spec = _spec(soak, endpoint=endpoint, stream=True)
    events = _completion_events(3, 5) if endpoint == "completions" else _chat_events(3, 9)
    expected = 5 if endpoint == "completions" else 9
    assert soak.check_stream(_parse(soak, events), spec, expected) == []
    assert soak.check_stream(_parse(soak, events), spec, None) == []


def _mutations():
    def drop_done(ev):
        return ev, False, ()

    def two_finishes(ev):
        ev[0]["choices"][0]["finish_reason"] = "length"
        return ev, True, ()

    def stop_reason(ev):
        ev[-2]["choices"][0]["finish_reason"] = "stop"
        return ev, True, ()

    def short_usage(ev):
        ev[-1]["usage"]["completion_tokens"] = 2
        ev[-1]["usage"]["total_tokens"] = 7
        return ev, True, ()

    def wrong_prompt(ev):
        ev[-1]["usage"]["prompt_tokens"] = 6
        ev[-1]["usage"]["total_tokens"] = 9
        return ev, True, ()

    def error_event(ev):
        ev.insert(1, {"error": {"message": "boom"}})
        return ev, True, ()

    def no_usage(ev):
        return ev[:-1], True, ()

    def other_id(ev):
        ev[1]["id"] = "cmpl-2"
        return ev, True, ()

    def bad_line(ev):
        return ev, True, (b"data: {broken\n",)

    def wrong_object(ev):
        ev[0]["object"] = "chat.completion.chunk"
        return ev, True, ()

    return [drop_done, two_finishes, stop_reason, short_usage, wrong_prompt, error_event,
            no_usage, other_id, bad_line, wrong_object]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_broken_streams_are_caught(soak, mutate):
    spec = _spec(soak, stream=True)
    events, done, extra = mutate(_completion_events(3, 5))
    problems = soak.check_stream(_parse(soak, events, done, extra), spec, 5)
    assert problems, mutate.__name__


def test_chat_stream_without_role_is_caught(soak):
    events = _chat_events()
    events[0]["choices"][0]["delta"].pop("role")
    spec = _spec(soak, endpoint="chat", stream=True)
    assert any("role" in p for p in soak.check_stream(_parse(soak, events), spec, 9))


def _completion_answer(n=3, prompt=5):
    return {"id": "cmpl-1", "object": "text_completion", "choices": [
        {"index": 0, "text": " w1 w2 w3", "finish_reason": "length", "token_ids": [1, 2, 3][:n]}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}}


def test_answers(soak):
    spec = _spec(soak)
    assert soak.check_response(_completion_answer(), spec, 5) == []
    chat = {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "length",
         "message": {"role": "assistant", "content": "w1 w2 w3"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}
    assert soak.check_response(chat, _spec(soak, endpoint="chat"), 9) == []
    bad = [
        dict(_completion_answer(), object="chat.completion"),
        {"error": {"message": "x"}},
        [1, 2],
        dict(_completion_answer(), choices=[]),
        _completion_answer(prompt=6),
    ]
    stop = _completion_answer()
    stop["choices"][0]["finish_reason"] = "stop"
    ids = _completion_answer()
    ids["choices"][0]["token_ids"] = [1, 2]
    no_text = _completion_answer()
    no_text["choices"][0]["text"] = None
    for obj in [*bad, stop, ids, no_text]:
        assert soak.check_response(obj, spec, 5), obj
    probe = _spec(soak, logprobs=2)
    assert soak.check_response(_completion_answer(), probe, 5)  # no top_logprobs


# ---------------------------------------------------------------- figures


def test_percentile_matches_numpy(soak):
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 5, 100, 1001):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert soak.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert soak.percentile([], 50) is None
    assert soak.percentile([3, 1, 2], 50) == 2
    figs = soak.latency_figures([1.0, 2.0, 3.0, 4.0])
    assert figs["n"] == 4 and figs["p50"] == 2.5 and figs["max"] == 4.0


def test_memory_flatness(soak):
    rng = random.Random(1)
    t0 = 1000.0
    flat = [(t0 + t, 40_000 + rng.uniform(-30, 30)) for t in range(0, 301, 5)]
    res = soak.memory_flatness(flat, t0, t0 + 300, 60, 256)
    assert res["ok"] and res["spread_mib"] <= 60 and abs(res["slope_mib_per_min"]) < 10
    assert res["samples"] == len(range(60, 301, 5))
    # a leak of 1 MiB/s is found (below the spread tolerance over 240 s, but growing),
    # with its slope; a larger one by its spread too
    leak = [(t0 + t, 40_000 + t) for t in range(0, 301, 5)]
    res = soak.memory_flatness(leak, t0, t0 + 300, 60, 256)
    assert not res["ok"] and res["slope_mib_per_min"] == pytest.approx(60)
    assert res["spread_mib"] < 256 and res["growth_mib"] > 64
    big = [(t, m * 3 - 80_000) for t, m in leak]
    assert soak.memory_flatness(big, t0, t0 + 300, 60, 256)["spread_mib"] > 256
    # one step up in the middle is not flat either
    step = [(t0 + t, 40_000 + (100 if t > 180 else 0)) for t in range(0, 301, 5)]
    assert not soak.memory_flatness(step, t0, t0 + 300, 60, 256)["ok"]
    assert soak.memory_flatness(step, t0, t0 + 300, 60, 256, growth_tol_mib=128)["ok"]
    # growth during the warm-up does not count; samples outside the window are ignored
    warm = [(t0 + t, 30_000 + 100 * min(t, 50)) for t in range(0, 301, 5)]
    warm += [(t0 - 10, 0.0), (t0 + 400, 80_000.0)]
    assert soak.memory_flatness(warm, t0, t0 + 300, 60, 256)["ok"]
    assert not soak.memory_flatness(warm, t0, t0 + 300, 30, 256)["ok"]
    few = soak.memory_flatness(flat[:14], t0, t0 + 300, 60, 256)
    assert not few["ok"] and "samples" in few["reason"]


def test_parse_prometheus(soak):
    text = (
        "# HELP vllm:num_requests_running Number of requests\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n'
        'vllm:request_success_total{finished_reason="length",model_name="m"} 1.5e+03\n'
        "vllm:num_preemptions_total 0\n"
        "garbage line\n"
        'vllm:odd{label="a b"} NaN\n'
    )
    m = soak.parse_prometheus(text)
    assert m["vllm:num_requests_running"] == 5.0
    assert m["vllm:request_success_total"] == 1500.0
    assert m["vllm:num_preemptions_total"] == 0.0
    assert "garbage" not in m


def test_compare_probes(soak):
    a = [{"token_ids": [1, 2, 3], "text": " a b c", "top_logprobs": [{"a": -1.0}] * 3,
          "cached_tokens": 0}, {"token_ids": [4], "text": " d", "top_logprobs": [{"d": -0.5}]}]
    same = soak.compare_probes(a, json.loads(json.dumps(a)))
    assert same["identical"] and same["mismatches"] == [] and same["max_logprob_diff"] == 0
    b = json.loads(json.dumps(a))
    b[0]["token_ids"][1] = 9
    b[1]["top_logprobs"][0]["d"] = -0.25
    diff = soak.compare_probes(a, b)
    assert not diff["identical"]
    assert diff["mismatches"][0]["probe"] == 0 and diff["mismatches"][0][
        "first_different_step"] == 1
    assert diff["max_logprob_diff"] == 0.25
    err = soak.compare_probes(a, [a[0], {"error": "timeout"}])
    assert not err["identical"] and err["mismatches"][0]["probe"] == 1


def _probe(tokens, gaps):
    """A probe answer whose best log-probability at each step is ``gap`` above the next."""
    return {"token_ids": tokens, "text": "".join(f" w{t}" for t in tokens),
            "top_logprobs": [{f" w{t}": -1.0, " w1": -1.0 - g}
                             for t, g in zip(tokens, gaps, strict=True)]}


def test_compare_probes_up_to_ties(soak):
    before = [_probe([5, 6, 7], [0.5, 0.01, 0.5]), _probe([8, 9], [0.5, 0.5]),
              _probe([3, 4], [0.005, 0.5])] + [_probe([2], [1.0])] * 5

    def after(**changed):
        out = json.loads(json.dumps(before))
        for i, probe in changed.items():
            out[int(i[1:])] = probe
        return out

    # probe 0 takes the other side of its near tie at step 1 (its context differs after)
    one = after(p0=_probe([5, 1, 2], [0.5, 0.01, 0.9]))
    res = soak.compare_probes(before, one, tie_logprob=0.02)
    assert res["identical_up_to_ties"] and not res["identical"] and res["mismatches"] == []
    assert [(t["probe"], t["first_different_step"]) for t in res["ties"]] == [(0, 1)]
    assert res["max_logprob_diff"] == 0  # compared up to the different token only
    plain = soak.compare_probes(before, one)
    assert [m["probe"] for m in plain["mismatches"]] == [0]
    assert "identical_up_to_ties" not in plain
    # two probes of 8 at ties are too many; a difference where the gap is wide, a
    # different text for the same tokens and an error are mismatches
    two = soak.compare_probes(before, after(p0=one[0], p2=_probe([1, 4], [0.5, 0.5])), 0.02)
    assert len(two["ties"]) == 2 and not two["mismatches"] and not two["identical_up_to_ties"]
    text = {**before[4], "text": " other"}
    for bad, probe in ((after(p1=_probe([8, 1], [0.5, 0.5])), 1), (after(p4=text), 4),
                       (after(p5={"error": "timeout: no answer"}), 5)):
        res = soak.compare_probes(before, bad, tie_logprob=0.02)
        assert not res["identical_up_to_ties"] and [m["probe"] for m in res["mismatches"]] \
            == [probe], res
    assert soak.compare_probes(before, before, tie_logprob=0.02)["identical_up_to_ties"]


def test_scan_log(soak):
    log = ("INFO 11-29 api_server.py:1] Starting\nERROR 11-29 [engine.py:2] boom\n"
           "Traceback (most recent call last):\n  File x\nValueError: y\nINFO done\n")
    res = soak.scan_log(log)
    assert res["tracebacks"] == 1 and res["error_lines"] == 1
    assert "ValueError" in res["first_traceback"]
    assert soak.scan_log("INFO all good\nWARNING errors=0\n")["error_lines"] == 0


def _passing_result(soak):
    return {
        "server_started": True, "startup_s": 50.0, "server_alive_after_load": True,
        "load": {"outcomes": {o: 0 for o in soak.OUTCOMES} | {"ok": 100, "cancelled": 5},
                 "server_errors": 0, "peak_in_flight": 64,
                 "by_kind": {f"{e}/{s}/{n}": {"requests": 3, "ok": 2, "cancelled": 1}
                             for e in ("completions", "chat") for s in ("stream", "plain")
                             for n in ("short", "long")}},
        "probes": {"identical": True, "mismatches": []},
        "server_log_scan": {"tracebacks": 0, "error_lines": 0},
        "shutdown": {"clean": True, "exit_code": 0, "exit_s": 3.0, "children_left": 0},
        "gpu_memory": {"sampler": "nvml", "before_start_mib": 500.0,
                       "after_shutdown_mib": 520.0,
                       "flatness": {"ok": True, "spread_mib": 10.0, "samples": 50,
                                    "tol_mib": 256}},
    }


def test_evaluate(soak):
    args = soak.parse_args([])
    assert (args.duration, args.clients, args.warmup_s) == (300.0, 64, 60.0)
    quick = soak.parse_args(["--quick"])
    assert (quick.duration, quick.clients) == (20.0, 16)
    assert soak.parse_args(["--quick", "--clients", "4"]).clients == 4
    checks = soak.evaluate(_passing_result(soak), args)
    assert all(c["ok"] for c in checks.values()), checks
    assert len(checks) == 14

    def failing(edit):
        res = _passing_result(soak)
        edit(res)
        return {k for k, c in soak.evaluate(res, args).items() if not c["ok"]}

    assert failing(lambda r: r["load"].update(server_errors=1)) == {"no_server_errors"}
    assert failing(lambda r: r["load"]["outcomes"].update(malformed=2)) == {
        "every_completed_request_well_formed"}
    assert failing(lambda r: r["load"]["outcomes"].update(http_4xx=1)) == {
        "no_rejected_requests"}
    assert failing(lambda r: r["load"]["outcomes"].update(cancelled=0)) == {
        "cancellations_exercised"}
    assert failing(lambda r: r["load"].update(peak_in_flight=10)) == {
        "load_reached_concurrency"}
    assert failing(lambda r: r["load"]["by_kind"].pop("chat/stream/long")) == {"mix_covered"}
    assert failing(lambda r: r["probes"].update(identical=False)) == {"probes_identical"}
    assert failing(lambda r: r["server_log_scan"].update(tracebacks=1)) == {"server_log_clean"}
    assert failing(lambda r: r["shutdown"].update(clean=False)) == {"shutdown_on_sigterm"}
    assert failing(lambda r: r["gpu_memory"]["flatness"].update(ok=False)) == {
        "gpu_memory_flat"}
    assert failing(lambda r: r["gpu_memory"].update(after_shutdown_mib=2000.0)) == {
        "gpu_memory_released"}
    assert failing(lambda r: r.update(server_alive_after_load=False)) == {
        "server_alive_after_load"}
    assert failing(lambda r: r.update(error="RuntimeError: not finished")) == {"run_completed"}
    assert failing(lambda r: r.update(gpu_memory={"sampler": None})) == {
        "gpu_memory_flat", "gpu_memory_released"}
    no_server = soak.evaluate({"server_started": False, "startup_error": "boom"}, args)
    assert list(no_server) == ["server_started"] and not no_server["server_started"]["ok"]
    skipped = soak.evaluate({**_passing_result(soak), "gpu_memory": {"sampler": None}},
                            soak.parse_args(["--no-gpu-memory"]))
    assert all(c["ok"] for c in skipped.values())


def test_evaluate_storm(soak):
    args = soak.parse_args(["--preemption-storm"])

    def result():
        res = _passing_result(soak)
        res["vllm_metrics"] = {"vllm:num_preemptions_total": 12.0}
        res["storm"] = {**args.storm, "kv_cache_tokens_logged": args.storm["kv_cache_tokens"]}
        res["probes_during_storm"] = {"identical_up_to_ties": True, "ties": [],
                                      "mismatches": []}
        return res

    checks = soak.evaluate(result(), args)
    assert all(c["ok"] for c in checks.values()), checks
    assert len(checks) == 17
    assert "preemptions_happened" not in soak.evaluate(result(), soak.parse_args([]))

    def failing(edit):
        res = result()
        edit(res)
        return {k for k, c in soak.evaluate(res, args).items() if not c["ok"]}

    assert failing(lambda r: r["vllm_metrics"].update({"vllm:num_preemptions_total": 0.0})) \
        == {"preemptions_happened"}
    assert failing(lambda r: r.update(vllm_metrics={})) == {"preemptions_happened"}
    assert failing(lambda r: r["storm"].update(kv_cache_tokens_logged=None)) == {
        "kv_cache_as_planned"}
    assert failing(lambda r: r["storm"].update(kv_cache_tokens_logged=4 * 12304)) == {
        "kv_cache_as_planned"}
    assert failing(lambda r: r["probes_during_storm"].update(
        identical_up_to_ties=False, mismatches=[{"probe": 3}])) == {"probes_during_storm_match"}
    assert failing(lambda r: r.pop("probes_during_storm")) == {"probes_during_storm_match"}


def test_server_command(soak):
    args = soak.parse_args(["--server-arg=--num-gpu-blocks-override=2000", "--enforce-eager"])
    cmd = soak.server_command(args, "/m", 8123)
    assert cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    joined = " ".join(cmd)
    for part in ("--attention-backend BITDECODE", "--load-format dummy", "--port 8123",
                 "--host 127.0.0.1", "--enable-prompt-tokens-details", "--enforce-eager",
                 "--num-gpu-blocks-override=2000", "--disable-uvicorn-access-log"):
        assert part in joined
    assert json.loads(cmd[cmd.index("--additional-config") + 1]) == {"bitdecode": {"bits": 4}}
    shipped = str(ROOT / "models" / "stdlib-llama-18m")  # weights, no chat template
    real = soak.server_command(soak.parse_args(["--model", shipped]), shipped, 1)
    assert "--load-format" not in real
    from vllm_bitdecode.testing.model_dir import CHAT_TEMPLATE

    assert real[real.index("--chat-template") + 1] == CHAT_TEMPLATE
    fake = soak.server_command(soak.parse_args(["--server-cmd", "python s.py --port {port}"]),
                               "/m", 42)
    assert fake == ["python", "s.py", "--port", "42"]


# ---------------------------------------------------------------- against the stand-in


def _run(coro):
    return asyncio.run(coro)


async def _load(soak, transport, duration=2.0, clients=8, **faults):
    async with _FakeServer(**faults) as server:
        client = soak.make_client(transport, server.base, clients)
        async with client:
            load = await soak.run_load(client, clients=clients, duration_s=duration, seed=0,
                                       source=soak.PromptSource(), model="m",
                                       max_model_len=8192, request_timeout=30)
        await asyncio.sleep(0.2)  # let the server notice the last disconnects
        return soak.summarize_load(load, duration), dict(server.state)


@pytest.mark.parametrize("transport", ["aiohttp", "threads"])
def test_load_loop_against_the_stand_in(soak, transport):
    pytest.importorskip("aiohttp")
    summary, state = _run(_load(soak, transport))
    oc = summary["outcomes"]
    assert summary["requests"] > 50
    assert oc["ok"] > 0 and oc["cancelled"] > 0
    assert summary["server_errors"] == 0 and oc["malformed"] == 0 and oc["http_4xx"] == 0, \
        summary["problems"]
    assert summary["peak_in_flight"] == 8
    assert summary["latency_s"]["p50"] is not None and summary["latency_s"]["p99"] >= \
        summary["latency_s"]["p50"]
    assert summary["output_tokens"] > 0
    # streams were closed mid-way: the server saw disconnects
    assert state["aborted"] > 0, state
    assert state["running"] == 0


@pytest.mark.parametrize("transport", ["aiohttp", "threads"])
@pytest.mark.parametrize(("faults", "outcome"), [
    ({"fail_every": 9}, "http_5xx"),
    ({"malformed_every": 5}, "malformed"),
    ({"error_event_every": 5}, "stream_error"),
    ({"drop_every": 5}, None),  # a cut stream: a connection error or a stream without [DONE]
])
def test_load_loop_counts_faults(soak, transport, faults, outcome):
    pytest.importorskip("aiohttp")
    summary, _ = _run(_load(soak, transport, duration=1.0, **faults))
    oc = summary["outcomes"]
    if outcome is None:
        assert oc["connection_error"] + oc["malformed"] > 0, oc
    else:
        assert oc[outcome] > 0, oc
    assert summary["problems"]


def test_probes_against_the_stand_in(soak):
    pytest.importorskip("aiohttp")
    source = soak.PromptSource()

    async def go(drift_after):
        async with _FakeServer(drift_after=drift_after) as server:
            async with soak.make_client("aiohttp", server.base, 4) as client:
                specs = soak.probe_specs(source, 8192)
                first = await soak.run_probes(client, specs, source, "m", 30)
                for _ in range(3):  # a few more requests, so that drift_after passes
                    await soak.run_probes(client, specs[:1], source, "m", 30)
                second = await soak.run_probes(client, specs, source, "m", 30)
                return first, second

    first, second = _run(go(0))
    assert first["server_idle"] and first["prefix_cache_reset"] == 200
    assert all("error" not in a for a in first["answers"])
    assert len(first["answers"][0]["token_ids"]) == soak.PROBE_MAX_TOKENS
    assert soak.compare_probes(first["answers"], second["answers"])["identical"]
    first, second = _run(go(10))
    assert not soak.compare_probes(first["answers"], second["answers"])["identical"]


def _main(soak, tmp_path, *extra, duration=3, script_args=()):
    """soak.main against the stand-in server (``extra``: its arguments)."""
    out = tmp_path / "soak.json"
    server = f"{sys.executable} {Path(__file__).resolve()} --port {{port}}"
    argv = ["--server-cmd", server + "".join(f" {e}" for e in extra), "--duration", str(duration),
            "--clients", "8", "--warmup-s", "0", "--mem-interval-s", "0.5", "--no-gpu-memory",
            "--out", str(out),
            "--startup-timeout", "60", "--request-timeout", "30", *script_args]
    code = soak.main(argv)
    return code, json.loads(out.read_text())


def _storm(soak, tmp_path, *extra, kv_cache_tokens=None):
    """A --preemption-storm run against the stand-in, which logs the planned KV cache size
    (or ``kv_cache_tokens``) the way vLLM does."""
    plan = soak.parse_args(["--preemption-storm", "--clients", "8"]).storm
    tokens = plan["kv_cache_tokens"] if kv_cache_tokens is None else kv_cache_tokens
    return _main(soak, tmp_path, "--kv-cache-tokens", str(tokens), *extra,
                 script_args=["--preemption-storm"])


def test_whole_script_against_the_stand_in(soak, tmp_path):
    """The script end to end, with the stand-in server as the command: it starts the
    server, runs probes and load, stops it with SIGTERM, writes the JSON and passes."""
    pytest.importorskip("aiohttp")
    code, res = _main(soak, tmp_path)
    failed = {k: c for k, c in res["checks"].items() if not c["ok"]}
    assert code == 0 and res["passed"], failed
    assert res["load"]["requests"] > 20 and res["load"]["server_errors"] == 0
    assert res["shutdown"]["sigterm"] and res["shutdown"]["exit_code"] == 0
    assert res["probes"]["identical"] and res["probes"]["n"] == len(soak.PROBE_WORDS)
    assert res["vllm_metrics"]["vllm:num_requests_running"] == 0
    assert Path(res["server_log"]).read_text().count("stand-in server up") == 1
    assert res["server_log_scan_shutdown"]["tracebacks"] == 0
    conc = res["server_concurrency"]
    assert conc["samples"] >= 2 and conc["max_running"] >= 1
    for key in ("device", "date", "commit", "settings", "checks", "gpu_memory"):
        assert key in res
    assert res["settings"]["clients"] == 8 and res["settings"]["transport"] == "aiohttp"


def test_whole_script_fails_on_server_errors(soak, tmp_path):
    pytest.importorskip("aiohttp")
    code, res = _main(soak, tmp_path, "--fail-every", "7", duration=1.5)
    assert code == 1 and not res["passed"]
    assert not res["checks"]["no_server_errors"]["ok"]
    assert res["load"]["outcomes"]["http_5xx"] > 0


def test_whole_script_fails_when_probes_change(soak, tmp_path):
    pytest.importorskip("aiohttp")
    code, res = _main(soak, tmp_path, "--drift-after", "12", duration=1.5)
    assert code == 1 and not res["checks"]["probes_identical"]["ok"]


def test_whole_script_preemption_storm_against_the_stand_in(soak, tmp_path):
    pytest.importorskip("aiohttp")
    code, res = _storm(soak, tmp_path, "--preempt-every", "5")
    failed = {k: c for k, c in res["checks"].items() if not c["ok"]}
    assert code == 0 and res["passed"], failed
    for name in ("preemptions_happened", "kv_cache_as_planned", "probes_during_storm_match"):
        assert res["checks"][name]["ok"]
    assert res["vllm_metrics"]["vllm:num_preemptions_total"] > 0
    during = res["probes_during_storm"]
    assert during["n"] == len(soak.PROBE_WORDS) and during["identical"]
    assert during["delay_s"] == 0.75
    storm = res["storm"]
    assert storm["kv_cache_tokens_logged"] == storm["kv_cache_tokens"] and storm["clients"] == 8
    assert res["settings"]["preemption_storm"]["num_gpu_blocks"] == storm["num_gpu_blocks"]


def test_whole_script_storm_fails_without_preemptions_or_with_another_kv_cache(soak, tmp_path):
    pytest.importorskip("aiohttp")
    code, res = _storm(soak, tmp_path, kv_cache_tokens=4096)
    assert code == 1
    assert {k for k, c in res["checks"].items() if not c["ok"]} == {
        "preemptions_happened", "kv_cache_as_planned"}


def test_whole_script_storm_fails_when_probes_change_during_the_storm(soak, tmp_path):
    pytest.importorskip("aiohttp")
    code, res = _storm(soak, tmp_path, "--preempt-every", "5", "--drift-after", "12")
    assert code == 1 and not res["checks"]["probes_during_storm_match"]["ok"]
    assert res["probes_during_storm"]["mismatches"]


def test_whole_script_stops_at_the_wall_limit(soak, tmp_path):
    """A run that would take longer than --max-wall-s is stopped, fails and says why."""
    pytest.importorskip("aiohttp")
    t0 = time.monotonic()
    code, res = _main(soak, tmp_path, duration=60, script_args=["--max-wall-s", "4"])
    assert time.monotonic() - t0 < 30
    assert code == 1 and res["server_started"]
    assert "--max-wall-s" in res["checks"]["run_completed"]["detail"]
    assert res["shutdown"]["exit_code"] == 0


def test_probe_pass_stops_after_a_timeout(soak):
    pytest.importorskip("aiohttp")
    source = soak.PromptSource()

    async def go():
        async with _FakeServer(token_delay_s=0.05) as server:  # 24 tokens: 1.2 s a probe
            async with soak.make_client("aiohttp", server.base, 4) as client:
                t0 = time.monotonic()
                res = await soak.run_probes(client, soak.probe_specs(source, 8192), source,
                                            "m", 0.3)
                return res, time.monotonic() - t0

    res, wall = _run(go())
    errors = [a.get("error", "") for a in res["answers"]]
    assert errors[0].startswith("timeout") and len(errors) == len(soak.PROBE_WORDS)
    assert all(e.startswith("skipped") for e in errors[1:]), errors
    assert wall < 3


def test_whole_script_fails_when_the_server_does_not_start(soak, tmp_path):
    out = tmp_path / "soak.json"
    code = soak.main(["--server-cmd", f"{sys.executable} -c 'raise SystemExit(3)'",
                      "--duration", "1", "--no-gpu-memory", "--out", str(out),
                      "--startup-timeout", "20"])
    res = json.loads(out.read_text())
    assert code == 1 and not res["checks"]["server_started"]["ok"]
    assert "code 3" in res["checks"]["server_started"]["detail"]


# ---------------------------------------------------------------- the stand-in, as a script


def _serve(argv: list[str]) -> None:
    from aiohttp import web

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--fail-every", type=int, default=0)
    ap.add_argument("--drift-after", type=int, default=0)
    ap.add_argument("--preempt-every", type=int, default=0)
    ap.add_argument("--kv-cache-tokens", type=int, default=None,
                    help="log vLLM's 'GPU KV cache size' line with this many tokens")
    args = ap.parse_args(argv)
    app = make_app(fail_every=args.fail_every, drift_after=args.drift_after,
                   preempt_every=args.preempt_every)
    if args.kv_cache_tokens is not None:
        print(f"INFO [kv_cache_utils.py:1] GPU KV cache size: {args.kv_cache_tokens:,} tokens",
              flush=True)
    print("stand-in server up", flush=True)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    _serve(sys.argv[1:])
