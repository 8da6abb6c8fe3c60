"""The literal `vllm serve ... --attention-backend BITDECODE` command, on loopback.

A smoke test for issue #2 (the server starts and answers with the BITDECODE backend);
the full OpenAI-server test, streaming included, belongs to issue #4.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from vllm_bitdecode.testing import write_llama_config

pytestmark = pytest.mark.gpu

VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def test_serve_help_lists_bitdecode():
    out = subprocess.run([*VLLM_CLI, "serve", "--help=attention-backend"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BITDECODE" in out.stdout and "FLASH_ATTN" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _errors(log: str) -> str:
    """The lines that explain a failed start, wherever they are in a long log."""
    keep = [ln for ln in log.splitlines()
            if any(w in ln for w in ("Error", "error:", "Exception", "raise ", "File \""))]
    if out := os.environ.get("OUT"):
        with open(os.path.join(out, "server.log"), "w") as f:
            f.write(log)
    return "\n".join(keep[-80:])


def test_vllm_serve_with_bitdecode_answers_completions(tmp_path):
    model = write_llama_config(tmp_path / "llama", num_hidden_layers=2, vocab_size=32000,
                               max_position_embeddings=4096)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [*VLLM_CLI, "serve", str(model), "--attention-backend", "BITDECODE",
         "--additional-config", '{"bitdecode": {"bits": 4}}', "--load-format", "dummy",
         "--skip-tokenizer-init", "--enforce-eager", "--max-model-len", "2048",
         "--gpu-memory-utilization", "0.3", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, _errors((tmp_path / "server.log").read_text())
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(2)
        reply = _post(base + "/v1/completions", {
            "model": str(model), "prompt": list(range(100, 400)), "max_tokens": 8,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True,
        })
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "length"
        assert reply["usage"]["completion_tokens"] == 8
        text = (tmp_path / "server.log").read_text()
        assert "BITDECODE" in text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
