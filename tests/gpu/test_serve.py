"""The literal `vllm serve MODEL --attention-backend BITDECODE` command, on loopback.

One server (a dummy-weight 2-layer Llama plus a tiny word-level tokenizer with a chat
template, written at test time) answers /v1/completions and /v1/chat/completions, each
streamed (server-sent events, read with urllib) and not; the answers are checked (token
counts, finish reasons, non-empty text, streamed text equal to the unstreamed one), and
`vllm bench serve` runs against it and `vllm bench throughput` beside it (the README's
commands, smaller), and the last test shuts the server down and checks that it exits.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_bitdecode.testing.model_dir import write_model_dir
from vllm_bitdecode.testing.server import (
    ServedProcess,
    parse_prometheus,
    post_json,
    process_alive,
    vllm_serve,
)

pytestmark = pytest.mark.gpu

VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
SERVED_NAME = "bitdecode-tiny"
PROMPT = "hello , tell me a story about the sea ."
MESSAGES = [{"role": "system", "content": "tell a story"},
            {"role": "user", "content": "hello , tell me a story about the sea ?"}]


def test_serve_help_lists_bitdecode():
    out = subprocess.run([*VLLM_CLI, "serve", "--help=attention-backend"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BITDECODE" in out.stdout and "FLASH_ATTN" in out.stdout


def _post_stream(url: str, body: dict) -> list[dict]:
    """POST with "stream": true; the JSON events of the server-sent event stream, which
    must end with "data: [DONE]"."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Accept": "text/event-stream"})
    events: list[dict] = []
    done = False
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers.get("Content-Type", "").startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if not line or line.startswith(":"):
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            assert "error" not in event, f"error in stream: {event['error']}"
            events.append(event)
    assert done, "stream ended without [DONE]"
    return events


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model") / "llama", num_hidden_layers=2,
                           vocab_size=32000, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir) -> Iterator[ServedProcess]:
    with vllm_serve(
        [str(model_dir), "--attention-backend", "BITDECODE",
         "--additional-config", '{"bitdecode": {"bits": 4}}', "--load-format", "dummy",
         "--served-model-name", SERVED_NAME, "--enforce-eager", "--max-model-len", "2048",
         "--gpu-memory-utilization", "0.3", "--enable-prompt-tokens-details"],
        tmp_path_factory.mktemp("serve") / "server.log",
    ) as srv:
        yield srv


def test_vllm_serve_with_bitdecode_answers_completions(server):
    """Token-id prompt (the original smoke test), non-streaming."""
    reply = post_json(server.base + "/v1/completions", {
        "model": SERVED_NAME, "prompt": list(range(100, 400)), "max_tokens": 8,
        "temperature": 0, "ignore_eos": True, "return_token_ids": True,
    })
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 8
    assert reply["usage"]["prompt_tokens"] == 300
    assert len(choice["token_ids"]) == 8
    assert "BITDECODE" in server.log()


def _metrics(server: ServedProcess) -> dict[str, float]:
    with urllib.request.urlopen(server.base + "/metrics", timeout=30) as resp:
        return parse_prometheus(resp.read().decode())


def test_prefix_cache_hit_counted_by_the_server(server):
    """#4: a repeated 1500-token prompt hits vLLM's prefix cache, and the server says so
    where users look: the Prometheus counters on /metrics and ``cached_tokens`` in the
    usage; the greedy tokens of the hit equal the cold run's. (The offline counter test in
    test_serving.py is an xfail: ``LLM.get_metrics()`` misses the hit there.)"""
    prompt = list(range(1000, 2500))  # shares no first block with the other tests' prompts
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    before = _metrics(server)
    cold = post_json(server.base + "/v1/completions", body)
    warm = post_json(server.base + "/v1/completions", body)
    assert (cold["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    cached = (warm["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    assert cached >= 1024, f"cached_tokens {cached} of a repeated 1500-token prompt"
    assert warm["choices"][0]["token_ids"] == cold["choices"][0]["token_ids"]
    deadline = time.time() + 30  # the counters follow the engine's step stats
    while True:
        after = _metrics(server)
        hits = after.get("vllm:prefix_cache_hits_total", 0) - before.get(
            "vllm:prefix_cache_hits_total", 0)
        if hits >= cached or time.time() > deadline:
            break
        time.sleep(1)
    queries = after.get("vllm:prefix_cache_queries_total", 0) - before.get(
        "vllm:prefix_cache_queries_total", 0)
    assert hits >= cached and queries >= 2 * len(prompt) - 1, (hits, queries, cached)

def test_models_endpoint_lists_the_served_model(server):
    with urllib.request.urlopen(server.base + "/v1/models", timeout=30) as resp:
        models = json.loads(resp.read())
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]


def test_completions_text_prompt_streaming_and_not(server, tokenizer):
    body = {"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    reply = post_json(server.base + "/v1/completions", body)
    assert reply["object"] == "text_completion"
    assert len(reply["choices"]) == 1
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["text"].strip(), "empty completion text"
    usage = reply["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] == len(tokenizer(PROMPT).input_ids) == 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12

    events = _post_stream(server.base + "/v1/completions",
                          {**body, "stream_options": {"include_usage": True}})
    chunks = [e for e in events if e.get("choices")]
    assert chunks and all(e["object"] == "text_completion" for e in events)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0].get(
        "finish_reason")]
    assert finish == ["length"]
    assert events[-1]["usage"]["completion_tokens"] == 12
    assert events[-1]["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    assert text == choice["text"], "streamed text differs from the unstreamed answer"


def test_chat_completions_streaming_and_not(server, tokenizer):
    body = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 10, "temperature": 0,
            "ignore_eos": True}
    reply = post_json(server.base + "/v1/chat/completions", body)
    assert reply["object"] == "chat.completion"
    assert len(reply["choices"]) == 1
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert isinstance(content, str) and content.strip(), "empty chat answer"
    usage = reply["usage"]
    assert usage["completion_tokens"] == 10
    # the chat template was applied: "role : content" lines, then "assistant :"
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)  # a list in transformers 4 and 5
    assert usage["prompt_tokens"] == len(rendered) == 19

    events = _post_stream(server.base + "/v1/chat/completions",
                          {**body, "stream_options": {"include_usage": True}})
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    chunks = [e for e in events if e.get("choices")]
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0].get(
        "finish_reason")]
    assert finish == ["length"]
    assert events[-1]["usage"]["completion_tokens"] == 10
    assert streamed == content, "streamed chat answer differs from the unstreamed one"


def test_vllm_bench_serve_against_the_server(server, model_dir, tmp_path):
    """The README's `vllm bench serve` command, smaller: every request completes against
    the BITDECODE server, with the token counts asked for."""
    prompts, out_len = 16, 16
    out = subprocess.run(
        [*VLLM_CLI, "bench", "serve", "--backend", "vllm", "--model", str(model_dir),
         "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
         "--port", server.base.rsplit(":", 1)[1], "--dataset-name", "random",
         "--random-input-len", "256", "--random-output-len", str(out_len),
         "--num-prompts", str(prompts), "--ignore-eos", "--save-result",
         "--result-dir", str(tmp_path), "--result-filename", "bench_serve.json"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    res = json.loads((tmp_path / "bench_serve.json").read_text())
    print({k: res[k] for k in ("completed", "failed", "request_throughput",
                               "output_throughput")})
    assert res["completed"] == prompts and res["failed"] == 0, res["errors"]
    assert res["total_output_tokens"] == prompts * out_len


def test_vllm_bench_throughput_with_bitdecode(model_dir, tmp_path):
    """The README's `vllm bench throughput` command, smaller, in its own engine."""
    prompts = 16
    out = subprocess.run(
        [*VLLM_CLI, "bench", "throughput", "--model", str(model_dir), "--load-format", "dummy",
         "--attention-backend", "BITDECODE", "--additional-config", '{"bitdecode": {"bits": 4}}',
         "--dataset-name", "random", "--random-input-len", "1024", "--random-output-len", "64",
         "--num-prompts", str(prompts), "--max-model-len", "2048",
         "--gpu-memory-utilization", "0.3", "--output-json", str(tmp_path / "tp.json")],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "BITDECODE" in out.stdout + out.stderr, "the engine did not report BITDECODE"
    res = json.loads((tmp_path / "tp.json").read_text())
    print(res)
    assert res["num_requests"] == prompts and res["tokens_per_second"] > 0


def _readme_demo_request() -> dict:
    """The JSON body of the README's offline-demo curl command."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("curl -s localhost:8000/v1/completions")
    body = readme[readme.index("-d '", start) + 4:]
    return json.loads(body[: body.index("}'") + 1])


def test_readme_offline_demo_answers_the_pass_key(tmp_path):
    """The README's offline demo as written: `vllm serve models/stdlib-llama-18m` with
    BITDECODE 4-bit and its curl request, whose answer must start with 73914."""
    from vllm_bitdecode import stdlib_llama as data

    if not (data.MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped model is missing")
    body = _readme_demo_request()
    with vllm_serve([str(data.MODEL_DIR), "--attention-backend", "BITDECODE",
                     "--additional-config", '{"bitdecode": {"bits": 4}}',
                     "--served-model-name", body["model"], "--gpu-memory-utilization", "0.3"],
                    tmp_path / "server.log") as srv:
        reply = post_json(srv.base + "/v1/completions", body)
    text = reply["choices"][0]["text"]
    assert text.strip().startswith("73914"), text


def test_server_shuts_down_on_sigterm(server):
    """Last test of the module: SIGTERM ends the server and its engine process within a
    minute, and the port stops answering."""
    assert server.proc.poll() is None, "server died before the shutdown test"
    assert server.children, "no engine process found under vllm serve"
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("vllm serve did not exit within 60 s of SIGTERM")
    print(f"vllm serve exited with code {code}")
    deadline = time.time() + 30
    while any(process_alive(c) for c in server.children):
        assert time.time() < deadline, "engine process still running after the server exited"
        time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(server.base + "/health", timeout=2)
