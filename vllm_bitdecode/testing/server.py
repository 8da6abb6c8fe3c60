"""A ``vllm serve`` process for a test: started on a free port, waited for, stopped with
its engine process; the processes it leaves; its Prometheus metrics."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A free TCP port on loopback, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_processes(pid: int) -> list:
    """psutil handles of a server's descendants (its engine core), [] if it is gone."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def process_alive(proc) -> bool:
    """A psutil process that is still running and not a zombie."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_cmdline(proc) -> str:
    """A psutil process's command line ("VLLM::EngineCore" for vLLM's engine process, which
    renames itself), "" if it cannot be read (gone, a zombie)."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def server_error_lines(log: str) -> str:
    """The lines that explain a failed ``vllm serve`` start, wherever they sit in a long
    log; the whole log also goes to $OUT/server.log when $OUT is set (the GPU machine)."""
    keep = [ln for ln in log.splitlines()
            if any(w in ln for w in ("Error", "error:", "Exception", "raise ", "File \""))]
    if out := os.environ.get("OUT"):
        with open(os.path.join(out, "server.log"), "w") as f:
            f.write(log)
    return "\n".join(keep[-80:])


class ServedProcess:
    """A running ``vllm serve``: its process, base URL, log file and (once it answered)
    its descendants, the engine core among them."""

    def __init__(self, proc: subprocess.Popen, base: str, log_path: Path) -> None:
        self.proc, self.base, self.log_path = proc, base, log_path
        self.children: list = []

    def log(self) -> str:
        return self.log_path.read_text()


def post_json(url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """POST a JSON body to a server a test started; the JSON reply."""
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def stop_server(proc: subprocess.Popen, children: list, timeout: float = 60) -> dict[str, Any]:
    """Stop a server and its descendants: SIGTERM, then wait; kill whatever is left (and
    say so)."""
    out: dict[str, Any] = {"sigterm": proc.poll() is None}
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            out["killed"] = True
    out["exit_code"] = proc.returncode
    end = time.monotonic() + 30
    while any(process_alive(c) for c in children) and time.monotonic() < end:
        time.sleep(0.5)
    left = [c for c in children if process_alive(c)]
    for c in left:
        with contextlib.suppress(Exception):
            c.kill()
    out["children_left"] = len(left)
    out["exit_s"] = time.monotonic() - t0
    out["clean"] = not out.get("killed") and not left and out["sigterm"]
    return out


@contextlib.contextmanager
def vllm_serve(args: list[str], log_path: Path, timeout: float = 300
               ) -> Iterator[ServedProcess]:
    """Start ``vllm serve ARGS --host 127.0.0.1 --port <free>``, wait until /health
    answers (failing with the log's error lines if it exits or takes over ``timeout``
    seconds), yield it, and stop it and anything it left running afterwards."""
    import urllib.request

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *args,
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        srv = ServedProcess(proc, f"http://127.0.0.1:{port}", log_path)
        try:
            deadline = time.time() + timeout
            while True:
                assert proc.poll() is None, server_error_lines(srv.log())
                try:
                    urllib.request.urlopen(srv.base + "/health", timeout=2)
                    break
                except OSError:
                    assert time.time() < deadline, ("server did not come up:\n"
                                                    + server_error_lines(srv.log()))
                    time.sleep(2)
            srv.children = child_processes(proc.pid)
            yield srv
        finally:
            stop_server(proc, srv.children)  # the engine process too, if it lingers


_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text format (vLLM's /metrics) -> {metric name: value summed over its
    label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out
