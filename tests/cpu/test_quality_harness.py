"""benchmarks/quality.py without a GPU: its worker runs against a stand-in engine that
answers like vLLM's LLM (prompt logprobs, greedy outputs, forced tokens, apply_model
with forward hooks on each layer's attention), and the parent's summary, comparison
with bf16, plots and table run on what it returns."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.scripts import load_script
from vllm_bitdecode import stdlib_llama as data

if not (data.MODEL_DIR / "tokenizer.json").exists():
    pytest.skip("no tokenizer: run `python tools/train_tiny_llama.py prepare`",
                allow_module_level=True)
pytest.importorskip("vllm")

quality = load_script("benchmarks/quality.py")

HIDDEN, LAYERS = 16, 3
SETTINGS = {
    "trials": 3, "ppl_tokens": 3000, "ppl_contexts": [512, 8192],
    "retrieval_contexts": [256, 1024], "depths": [0.0, 0.5, 1.0], "tasks": list(data.TASKS),
    "max_model_len": data.MAX_CONTEXT, "attn_prompt_lens": [300, 120],
    "attn_decode_tokens": 4,
}


class _Attn(torch.nn.Module):
    def forward(self, x):
        return x


class FakeEngine:
    """Reads the answer out of the prompt text; ``broken_above`` tokens of prompt make it
    answer wrong; ``noise`` perturbs the attention outputs; every token has logprob lp."""

    def __init__(self, tok, broken_above=10**9, noise=0.0, lp=-1.0):
        self.tok = tok
        self.broken_above = broken_above
        self.noise = noise
        self.lp = lp
        layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(LAYERS))
        for layer in layers:
            layer.self_attn = torch.nn.Module()
            layer.self_attn.attn = _Attn()
        self.model = torch.nn.Module()
        self.model.model = torch.nn.Module()
        self.model.model.layers = layers
        self.forwards = 0

    def apply_model(self, fn):
        return [fn(self.model)]

    def _forward(self, rows):
        g = torch.Generator().manual_seed(self.forwards)
        self.forwards += 1
        for layer in self.model.model.layers:
            x = torch.randn(rows, HIDDEN, generator=g)
            x = x + self.noise * torch.randn(rows, HIDDEN)
            layer.self_attn.attn(x)

    def _answer(self, prompt):
        text = self.tok.decode(prompt)
        if len(prompt) > self.broken_above:
            return "00000"
        if text.endswith("The pass key is"):
            return re.findall(r"The pass key is (\d+)\.", text)[0]
        key = text.rsplit("What is the value of key ", 1)[1].split("?")[0]
        return re.findall(rf"The value of key {key} is (\d+)\.", text)[0]

    def generate(self, prompts, params, use_tqdm=False):
        ids = [p["prompt_token_ids"] for p in prompts]
        if not isinstance(params, list):
            params = [params] * len(ids)
        self._forward(sum(len(p) for p in ids))
        for _ in range(params[0].max_tokens - 1):
            self._forward(len(ids))
        outs = []
        for p, sp in zip(ids, params, strict=True):
            plp = None
            if sp.prompt_logprobs is not None:
                plp = [None] + [{t: SimpleNamespace(logprob=self.lp)} for t in p[1:]]
            if sp.allowed_token_ids:
                toks = [sp.allowed_token_ids[0]] * sp.max_tokens
            elif sp.prompt_logprobs is not None:
                toks = [data.EOS_ID]
            else:
                toks = data.encode(self.tok, f" {self._answer(p)}.\n")[: sp.max_tokens]
            outs.append(SimpleNamespace(prompt_logprobs=plp,
                                        outputs=[SimpleNamespace(token_ids=toks)]))
        return outs


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer()


def _run(tok, **fake):
    spec = {"model": str(data.MODEL_DIR), "settings": SETTINGS, "backend": "FLASH_ATTN",
            "gpu_memory_utilization": 0.4}
    return quality.run_worker(spec, llm=FakeEngine(tok, **fake))


def test_worker_measures_ppl_retrieval_and_attention(tok):
    res = _run(tok)
    for ctx in ("512", "8192"):
        p = res["perplexity"][ctx]
        assert p["window"] == min(int(ctx), data.MAX_CONTEXT - 1)
        assert p["ppl"] == pytest.approx(2.718281828, rel=1e-6)  # logprob -1 everywhere
        assert p["tokens"] >= SETTINGS["ppl_tokens"]
    cells = res["retrieval"]
    assert len(cells) == 2 * 2 * 3 and all(c["n"] == 3 and c["right"] == 3 for c in cells.values())
    assert res["retrieval_prompts"] == 36
    cap = res["attention_capture"]
    assert len(cap) == LAYERS * SETTINGS["attn_decode_tokens"]
    prefill = [c for c in cap if c[1] > 64]
    assert [c[0] for c in prefill] == list(range(LAYERS))
    assert prefill[0][1] == 420 and prefill[0][2].shape == (53, HIDDEN)  # every 8th row


def test_parent_summary_comparison_and_plots(tok, tmp_path, capsys):
    base = _run(tok)
    worse = _run(tok, broken_above=600, noise=0.1, lp=-1.05)
    for r in (base, worse):
        r.update(wall_s=1.0, device="Fake GPU")
    doc = {"model": data.MODEL_NAME, "model_fingerprint": "x", "settings": SETTINGS,
           "configs": {}, "device": "Fake GPU"}
    quality.add_result(doc, "bf16", base, base["attention_capture"])
    quality.add_result(doc, "int2", worse, base["attention_capture"])
    quality.compare(doc)
    b, w = doc["configs"]["bf16"], doc["configs"]["int2"]
    assert b["retrieval"]["passkey"]["mean"] == 1.0
    assert w["retrieval"]["passkey"]["by_context"] == {"256": 1.0, "1024": 0.0}
    assert w["vs_bf16"]["retrieval_points"]["kv"]["mean"] == pytest.approx(-50.0)
    assert w["vs_bf16"]["perplexity_pct"]["512"] == pytest.approx(100 * (2.718281828 ** 0.05
                                                                         - 1), rel=1e-4)
    assert w["vs_bf16"]["targets"] == {"perplexity_pct_max": 8.0, "retrieval_points_max": 5.0,
                                       "perplexity_ok": True, "retrieval_ok": False}
    assert b["attention_rel_err"]["prefill"] == [0.0] * LAYERS
    err = w["attention_rel_err"]
    assert err["decode_steps"] == SETTINGS["attn_decode_tokens"] - 1
    assert all(0.05 < e < 0.2 for e in err["prefill"] + err["decode"])
    json.dumps(doc)  # what main() writes
    quality.print_table(doc)
    out = capsys.readouterr().out
    assert "RETRIEVAL MISSED" in out and "int2" in out
    pytest.importorskip("matplotlib")
    pngs = quality.plot(doc, tmp_path / "quality_fake")
    assert len(pngs) == 2 and all((tmp_path / p).exists() for p in pngs)


def test_nonfinite_captured_outputs_are_counted_and_fail_the_config():
    ref = [(0, 100, torch.ones(13, 4)), (1, 100, torch.ones(13, 4)), (0, 2, torch.ones(2, 4)),
           (1, 2, torch.ones(2, 4))]
    ours = [(i, n, a.clone()) for i, n, a in ref]
    assert quality.attention_errors(ours, ref)["nonfinite_rows"] == {
        "prefill": [0, 0], "decode": [0, 0]}
    assert quality.nonfinite_attention({"attention_rel_err":
                                        quality.attention_errors(ours, ref)}) is None
    ours[1][2][[2, 5]] = float("nan")
    ours[2][2][0, 1] = float("inf")
    err = quality.attention_errors(ours, ref)
    assert err["nonfinite_rows"] == {"prefill": [0, 2], "decode": [1, 0]}
    assert math.isnan(err["prefill"][1]) and err["prefill"][0] == 0.0
    msg = quality.nonfinite_attention({"attention_rel_err": err})
    assert "prefill [0, 2]" in msg and "decode [1, 0]" in msg
    assert quality.nonfinite_attention({"attention_rel_err": {"error": "no bf16"}}) is None


def test_mismatched_captures_are_reported_not_compared():
    a = [(0, 100, torch.zeros(13, 4)), (1, 100, torch.zeros(13, 4))]
    assert "error" in quality.attention_errors(a[:1], a)
    assert "error" in quality.attention_errors([a[1], a[0]], a)


def test_main_runs_configs_merges_later_runs_and_keeps_to_its_budget(tok, tmp_path, monkeypatch):
    import shutil
    import sys

    model = tmp_path / "model"
    shutil.copytree(data.MODEL_DIR, model, ignore=shutil.ignore_patterns("*.safetensors"))
    (model / "config.json").write_text("{}")
    calls = []

    def fake_run_config(name, model_dir, st, gpu_util, timeout, log_dir, script):
        calls.append(name)
        fake = {"bf16": {}, "int4": {"noise": 0.01}, "int2": {"broken_above": 600}}[name]
        spec = {"model": str(model_dir), "settings": {**st, **SETTINGS}, "backend": "x",
                "gpu_memory_utilization": gpu_util}
        res = quality.run_worker(spec, llm=FakeEngine(tok, **fake))
        res.update(wall_s=1.0, device="NVIDIA Fake GPU")
        return res

    monkeypatch.setattr(quality, "run_config", fake_run_config)
    monkeypatch.setattr(quality, "settings", lambda quick: dict(SETTINGS))
    monkeypatch.setattr(quality, "REF_DIR", tmp_path / "state")
    out = tmp_path / "res" / "q.json"
    argv = ["quality.py", "--model", str(model), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--configs", "int4"])  # bf16 is added first
    quality.main()
    assert calls == ["bf16", "int4"]
    doc = json.loads(out.read_text())
    assert set(doc["configs"]) == {"bf16", "int4"} and doc["device"] == "NVIDIA Fake GPU"
    assert doc["commit"] and len(doc["date"]) == len("2026-12-04")  # the results header
    assert doc["configs"]["int4"]["vs_bf16"]["targets"]["retrieval_ok"]
    out.unlink()  # a later command on the lent machine may not have it: the state has
    # int2 runs; int2-norot would end after the budget (int2 took longer than it allows)
    monkeypatch.setattr(sys, "argv", [*argv, "--configs", "int2,int2-norot", "--budget", "0.5",
                                      "--copy-to", str(tmp_path / "copy")])
    with pytest.raises(SystemExit, match="not run: \\['int2-norot'\\]"):
        quality.main()
    assert calls == ["bf16", "int4", "int2"]
    doc = json.loads(out.read_text())
    assert set(doc["configs"]) == {"bf16", "int4", "int2"}
    assert doc["not_run"] == ["int2-norot"]
    assert not doc["configs"]["int2"]["vs_bf16"]["targets"]["retrieval_ok"]
    assert (tmp_path / "copy" / "q.json").exists()


@pytest.mark.parametrize("name", list(quality.CONFIGS))
def test_every_config_is_valid_engine_arguments(name):
    """Each configuration's engine keywords are EngineArgs fields (a typo would only show
    on the GPU) and its BITDECODE settings parse."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_bitdecode.config import BitDecodeConfig

    cfg = quality.CONFIGS[name]
    spec = {"model": "m", "gpu_memory_utilization": 0.5,
            **{k: v for k, v in cfg.items() if k != "label"}}
    kw = quality.engine_kwargs(spec)
    EngineArgs(**kw)  # a dataclass: unknown keywords raise TypeError
    if cfg["backend"] == "BITDECODE":
        parsed = BitDecodeConfig.from_additional_config(kw["additional_config"])
        assert parsed.bits == cfg["bitdecode"]["bits"]
    assert kw.get("block_size") == cfg.get("block_size")


def test_paired_points_and_their_interval():
    """Two configurations' answers on the same prompts: the mean paired difference in
    points with a 95% interval that shrinks with the prompts, and the cells below depth
    1.0 on their own."""
    base = {"kv/1024/0.00": "1" * 100, "kv/1024/1.00": "1" * 100, "passkey/1024/0.00": "0" * 4}
    ours = {"kv/1024/0.00": "0" * 10 + "1" * 90, "kv/1024/1.00": "1" * 100,
            "passkey/1024/0.00": "1" * 4}
    p = quality.paired_points(ours, base, "kv")
    assert p["n"] == 200 and p["mean"] == pytest.approx(-5.0)
    lo, hi = p["ci95"]
    sd = math.sqrt((10 * 0.95**2 + 190 * 0.05**2) / 199)
    assert (hi - lo) / 2 == pytest.approx(100 * 1.96 * sd / math.sqrt(200))
    assert quality.paired_points(ours, base, "kv", 1.0)["mean"] == pytest.approx(-10.0)
    assert quality.paired_points(ours, base, "passkey")["mean"] == pytest.approx(100.0)


def test_clean_perplexity_leaves_out_the_windows_of_near_duplicates():
    c = {"perplexity": {"11": {"window": 11}}, "window_nll": {"11": [10.0, 0.0, 20.0]}}
    assert quality.clean_perplexity(c, []) == {"11": pytest.approx(math.exp(30 / 30))}
    assert quality.clean_perplexity(c, [(12, 13)]) == {"11": pytest.approx(math.exp(30 / 20))}


def test_recompare_rewrites_a_results_file_in_place(tmp_path, monkeypatch, capsys):
    """--recompare: the stored NLLs and answers of a results file compared again, without
    an engine; its clean perplexity leaves out the windows of the near-duplicate files."""
    import shutil
    import sys

    src = data.REPO_ROOT / "benchmarks" / "results" / "quality_channel_k_h200.json"
    path = tmp_path / src.name
    shutil.copy(src, path)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--recompare", str(path)])
    quality.main()
    doc = json.loads(path.read_text())
    assert doc["compared_by"]["commit"] and doc["commit"] == json.loads(src.read_text())["commit"]
    d = doc["configs"]["int2-channel-g32-b128"]["vs_bf16"]
    assert d["perplexity_pct"] == json.loads(src.read_text())["configs"][
        "int2-channel-g32-b128"]["vs_bf16"]["perplexity_pct"]  # the old figure, unchanged
    assert d["perplexity_pct_clean"]["8192"] > d["perplexity_pct"]["8192"]
    lo, hi = d["retrieval_points"]["kv"]["ci95"]
    assert lo < d["retrieval_points"]["kv"]["mean"] < hi
    assert "int2-channel-g32-b128" in capsys.readouterr().out


FAKE_WORKER = """
import importlib.util, json, sys, time
spec = json.load(open(sys.argv[2]))
found = importlib.util.spec_from_file_location("quality", spec["quality_py"])
quality = importlib.util.module_from_spec(found)
found.loader.exec_module(quality)
print("measuring", flush=True)
if spec["mode"] == "fail":
    sys.exit(3)
if spec["mode"] != "hang_before_save":
    quality.save_result({"ppl": 1.5}, sys.argv[3])
if spec["mode"] == "crash_after_save":
    sys.exit(7)  # an engine whose shutdown crashes
if spec["mode"] != "ok":
    time.sleep(120)  # an engine whose shutdown hangs
"""


@pytest.mark.parametrize("mode", ["ok", "hang_after_save", "crash_after_save",
                                  "hang_before_save", "fail"])
def test_a_worker_timed_out_or_failed_keeps_its_log_and_saved_result(tmp_path, monkeypatch,
                                                                     mode):
    """run_config: the worker's output goes to its log as it runs, so a worker killed by
    the timeout (or one that fails) leaves it; a result saved before the timeout counts
    (the engine's shutdown may hang or crash); without one the failure is raised, and
    try_config records it as a failure."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(quality, "worker_spec", lambda *a: {
        "mode": mode, "quality_py": str(data.REPO_ROOT / "benchmarks" / "quality.py")})
    args = SimpleNamespace(gpu_memory_utilization=0.1, timeout=15.0)
    failures: dict[str, str] = {}
    res, took = quality.try_config("int4", tmp_path, {}, args, tmp_path / "logs", failures,
                                   script=str(script))
    log = (tmp_path / "logs" / "int4.log").read_text()
    assert "measuring" in log
    if mode in ("ok", "hang_after_save", "crash_after_save"):
        assert res is not None and res["ppl"] == 1.5 and failures == {}
        assert took == res["wall_s"] < 15 + 5
    else:
        assert res is None and "int4" in failures
        assert ("exit 3" in failures["int4"]) == (mode == "fail")
        assert ("timed out" in failures["int4"]) == (mode == "hang_before_save")


def test_a_configuration_ends_by_the_deadline(monkeypatch, tmp_path):
    """try_config cuts the configuration's timeout to what the run's budget has left."""
    seen = []
    monkeypatch.setattr(quality, "run_config",
                        lambda name, md, st, util, timeout, log_dir, script: seen.append(
                            timeout) or {"wall_s": 0.0})
    args = SimpleNamespace(gpu_memory_utilization=0.1, timeout=400.0)
    quality.try_config("int4", tmp_path, {}, args, tmp_path, {})
    quality.try_config("int4", tmp_path, {}, args, tmp_path, {}, deadline=time.time() + 100)
    quality.try_config("int4", tmp_path, {}, args, tmp_path, {}, deadline=time.time() - 5)
    assert seen[0] == 400.0 and 95 < seen[1] <= 100 and seen[2] == 1.0


def _wait_until_dead(pid: int, what: str, seconds: float = 10.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return  # a zombie: dead, not yet reaped
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} {pid} is still alive")


def _worker_with_a_child(pid_file) -> str:
    """A worker that starts a long-lived child, writes the child's pid, then waits."""
    return ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(float(sys.argv[1]))\n")


@pytest.mark.parametrize("hang", [False, True])
def test_a_workers_own_children_die_with_it(tmp_path, hang):
    """run_in_own_group kills the worker's whole process group, on its timeout and after
    a normal exit, so nothing it started outlives it holding GPU memory."""
    pid_file = tmp_path / "grandchild.pid"
    cmd = [sys.executable, "-c", _worker_with_a_child(pid_file), "120" if hang else "0"]
    if hang:
        with pytest.raises(subprocess.TimeoutExpired):
            quality.run_in_own_group(cmd, 15.0)
    else:
        assert quality.run_in_own_group(cmd, 60.0) == 0
    _wait_until_dead(int(pid_file.read_text()), "the worker's child")


def test_a_harness_stopped_by_sigterm_takes_its_worker_along(tmp_path):
    """A step's `timeout` sends SIGTERM to the harness only (the worker has a session of
    its own): the harness's handler exits through run_in_own_group's cleanup, which
    kills the worker's group."""
    import signal

    pid_file = tmp_path / "grandchild.pid"
    worker = [sys.executable, "-c", _worker_with_a_child(pid_file), "120"]
    harness = tmp_path / "harness.py"
    harness.write_text(
        f"import sys\nsys.path.insert(0, {str(data.REPO_ROOT / 'benchmarks')!r})\n"
        "import quality\nquality.exit_on_sigterm()\n"
        f"quality.run_in_own_group({worker!r}, 120.0)\n")
    proc = subprocess.Popen([sys.executable, str(harness)])
    try:
        deadline = time.time() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.time() < deadline and proc.poll() is None, "the worker never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    _wait_until_dead(int(pid_file.read_text()), "the worker's child")
