"""gpu_monitor.GpuSampler: the GPU's clock and power beside the decode timings, sampled by a
process of its own (a stand-in NVML here), summarized over the timed runs only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types

import pytest

from vllm_bitdecode.testing import engine_timing, gpu_monitor

FAKE_NVML = '''
NVML_CLOCK_SM = 1
def nvmlInit(): pass
def nvmlDeviceGetCount(): return 2
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetUUID(h): return "GPU-%d" % h
def nvmlDeviceGetClockInfo(h, kind): return 1500 + 100 * h if kind == NVML_CLOCK_SM else 0
def nvmlDeviceGetPowerUsage(h): return 690000  # mW
def nvmlDeviceGetCurrentClocksEventReasons(h): return 0x4 | 0x1  # power cap (and idle)
'''


def _fake_nvml(tmp_path, text: str = FAKE_NVML) -> str:
    """A PYTHONPATH under which the sampler's process imports ``text`` as pynvml."""
    (tmp_path / "pynvml.py").write_text(text)
    return os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")])


def test_summary_takes_the_samples_inside_the_windows():
    samples = [[1.0, 1980, 300.0, 0], [2.0, 1600, 690.0, 0x4], [3.0, 1500, 695.0, 0x80],
               [4.0, 1700, 650.0, 0x20], [9.0, 345, 80.0, 0x1]]
    s = gpu_monitor.summarize_gpu_samples(samples, [(1.5, 3.0), (3.9, 4.1)])
    assert s["samples"] == 3
    assert (s["sm_clock_mhz_median"], s["sm_clock_mhz_min"], s["sm_clock_mhz_max"]) == (
        1600, 1500, 1700)
    assert (s["power_w_median"], s["power_w_max"]) == (690.0, 695.0)
    assert s["sw_power_cap_fraction"] == pytest.approx(1 / 3)
    assert s["hw_slowdown_fraction"] == pytest.approx(1 / 3)  # the power brake
    assert s["thermal_fraction"] == pytest.approx(1 / 3)
    assert gpu_monitor.summarize_gpu_samples(samples, [(5.0, 8.0)]) is None
    assert gpu_monitor.summarize_gpu_samples([], [(0.0, 10.0)]) is None


def test_sampler_process_reads_nvml_for_the_visible_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", _fake_nvml(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with gpu_monitor.GpuSampler(interval_s=0.01) as gpu:
        t0 = time.time()
        time.sleep(0.3)
        t1 = time.time()
    s = gpu.summary([(t0, t1)])
    assert s is not None and s["samples"] >= 5
    assert s["sm_clock_mhz_median"] == 1600  # GPU 1's, as CUDA_VISIBLE_DEVICES says
    assert s["power_w_median"] == 690.0 and s["sw_power_cap_fraction"] == 1.0
    assert s["thermal_fraction"] == 0 and s["hw_slowdown_fraction"] == 0
    assert gpu.summary([(t1 + 60, t1 + 120)]) is None
    assert gpu._proc.poll() is not None and not os.path.exists(gpu._path)  # nothing left


def test_sampler_process_ends_when_its_parent_is_gone(tmp_path):
    """An engine killed on a timeout must not leave a sampler writing forever: a parent
    that exits at once leaves a sampler that stops within its next sample."""
    env = dict(os.environ, PYTHONPATH=_fake_nvml(tmp_path))
    out = tmp_path / "samples.jsonl"
    sampler = ("from vllm_bitdecode.testing.gpu_monitor import gpu_sampler_main; "
               f"gpu_sampler_main({str(out)!r}, 0.01, PARENT)")
    parent = ("import os, subprocess, sys; "
              f"subprocess.Popen([sys.executable, '-c', {sampler!r}.replace('PARENT', "
              "str(os.getpid()))]); time = __import__('time'); time.sleep(0.5)")
    subprocess.run([sys.executable, "-c", parent], env=env, timeout=60, check=True)
    time.sleep(2.0)  # the orphan's next check of its parent
    size = out.stat().st_size if out.exists() else 0
    time.sleep(1.0)
    assert (out.stat().st_size if out.exists() else 0) == size  # no longer writing


def test_sampler_without_nvml_gives_no_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", _fake_nvml(
        tmp_path, "def nvmlInit():\n    raise RuntimeError('no driver')\n"))
    t0 = time.time()
    with gpu_monitor.GpuSampler(interval_s=0.01) as gpu:
        pass
    assert time.time() - t0 < 10 and gpu.samples == []
    assert gpu.summary([(t0, time.time())]) is None


def test_time_decode_reports_the_gpu_over_the_long_runs_only(monkeypatch):
    """The summary covers the windows of the long runs, not the short ones."""
    seen = {}

    class Sampler:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def summary(self, windows):
            seen["windows"] = windows
            return {"samples": len(windows)}

    monkeypatch.setattr(engine_timing, "GpuSampler", Sampler)
    runs = []

    class LLM:
        def generate(self, prompts, sp, use_tqdm=False):
            runs.append((sp.max_tokens, time.time()))
            return []

    monkeypatch.setattr(engine_timing, "counters", lambda llm: {})
    t = engine_timing.time_decode(LLM(), types.SimpleNamespace, dict(batch=1, context=3, steps=4))
    assert t["gpu_in_long_runs"] == {"samples": 3}
    long_starts = [at for n, at in runs[1:] if n == 9]
    assert [a <= at <= b for (a, b), at in zip(seen["windows"], long_starts, strict=True)] == [
        True] * 3


def test_bench_decode_rows_shorter_than_the_interval_get_the_samples_around_them():
    """bench_decode's rows take 3-12 ms, its sampler's interval is 10 ms: a row takes the
    samples from one interval before its timed calls to one after, no farther."""
    from tests.scripts import load_script

    bench = load_script("benchmarks/bench_decode.py")
    sampler = types.SimpleNamespace(interval_s=0.01, samples=[
        [0.985, 1980, 300.0, 0], [0.995, 1830, 690.0, 0x4], [1.009, 1845, 695.0, 0x4],
        [1.025, 1980, 200.0, 0]])
    sampler.summary = lambda windows: gpu_monitor.summarize_gpu_samples(sampler.samples, windows)
    g = bench.gpu_around(sampler, (1.0, 1.004))  # no sample inside the 4 ms it was timed
    assert g["samples"] == 2 and g["sm_clock_mhz_max"] == 1845
    assert g["sw_power_cap_fraction"] == 1.0
    assert g["window_s"] == pytest.approx(0.004) and g["sampled_s"] == pytest.approx(0.024)
    assert bench.gpu_around(sampler, (1.1, 1.105)) is None
