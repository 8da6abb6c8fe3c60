"""benchmarks/soak.py --quick against the real ``vllm serve --attention-backend BITDECODE``.

16 clients for 20 s on the dummy-weight tiny Llama (plus one server start with CUDA graphs,
two probe passes and the shutdown: about 2-3 minutes on an H100/H200). Every check of the
script must pass: no server errors, every completed request well-formed, all request kinds
and cancellations exercised, GPU memory flat after the warm-up and given back after
SIGTERM, probe outputs identical before and after, no traceback or ERROR line in the
server log. The JSON and the server log are kept in $OUT when it is set (the lent GPU
machine sends $OUT back). BITDECODE_SOAK_ARGS adds arguments, e.g.
``--duration 300 --clients 64`` for the full soak.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "soak.py"


def test_soak_quick(tmp_path):
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else tmp_path
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "soak_quick.json"
    log = out_dir / "soak_quick_server.log"
    extra = shlex.split(os.environ.get("BITDECODE_SOAK_ARGS", ""))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--server-log", str(log),
         *extra],
        capture_output=True, text=True, timeout=1800, cwd=str(ROOT),
    )
    print(proc.stdout[-6000:])
    assert out.exists(), f"no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    failed = {name: c["detail"] for name, c in res["checks"].items() if not c["ok"]}
    assert not failed, f"failed checks: {json.dumps(failed, indent=1)}\n" + (
        res.get("server_log_tail") or "")
    assert proc.returncode == 0
    # the figures the issue asks for are there
    load = res["load"]
    assert load["requests"] >= 100 and load["server_errors"] == 0
    assert load["latency_s"]["p50"] is not None and load["latency_s"]["p99"] is not None
    assert load["outcomes"]["cancelled"] > 0
    mem = res["gpu_memory"]
    assert mem["sampler"] in ("nvml", "nvidia-smi")
    assert mem["flatness"]["samples"] >= 3
    assert res["probes"]["identical"] and res["probes"]["n"] == 8
    assert res["device"] != "unknown" and res["commit"]
    print(f"soak quick: {load['requests']} requests, p50 {load['latency_s']['p50']:.3f} s, "
          f"p99 {load['latency_s']['p99']:.3f} s, memory spread "
          f"{mem['flatness']['spread_mib']:.0f} MiB")
