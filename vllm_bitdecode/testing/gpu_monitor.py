"""What NVML says about the GPUs this process may use: memory by process, and the SM
clock, power and reasons for a lowered clock sampled while a benchmark runs."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


def visible_gpus(pynvml) -> list[Any]:
    """NVML handles of the GPUs CUDA_VISIBLE_DEVICES names (by index or UUID), or all."""
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return handles
    uuids = []
    for h in handles:
        uuid = pynvml.nvmlDeviceGetUUID(h)
        uuids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
    out = []
    for item in (x.strip() for x in visible.split(",")):
        if item.isdigit():
            out += handles[int(item):int(item) + 1]
        elif item:
            out += [h for h, u in zip(handles, uuids, strict=True) if u.startswith(item)]
    return out


def nvml_memory() -> dict[str, Any]:
    """GPU memory as NVML reports it, over the GPUs this process may use
    (CUDA_VISIBLE_DEVICES; all without it): ``used_mib`` (the devices' used memory,
    summed) and ``by_pid`` ({pid: MiB} of the processes holding memory on any of them;
    None where the driver does not say). NVML gives the host's pids: inside a
    container's PID namespace they need not be this one's."""
    import pynvml

    pynvml.nvmlInit()
    try:
        used = 0.0
        by_pid: dict[int, float | None] = {}
        for handle in visible_gpus(pynvml):
            used += pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                mib = None if proc.usedGpuMemory is None else proc.usedGpuMemory / 2**20
                prior = by_pid.get(proc.pid, 0.0)
                by_pid[proc.pid] = None if prior is None or mib is None else prior + mib
        return {"used_mib": used, "by_pid": by_pid}
    finally:
        pynvml.nvmlShutdown()


# NVML's clock event reasons (nvmlClocksEventReason*) by what they say: the driver holds
# the board to its power limit (SwPowerCap 0x4); a hardware slowdown (HwSlowdown 0x8,
# which comes with the next two, and HwPowerBrakeSlowdown 0x80, an external brake
# signal); heat (SwThermalSlowdown 0x20, HwThermalSlowdown 0x40). A sample can count
# under several.
GPU_CLOCK_REASONS = {"sw_power_cap": 0x4, "hw_slowdown": 0x8 | 0x80, "thermal": 0x20 | 0x40}


def gpu_sampler_main(path: str, interval_s: float, parent: int) -> None:
    """Append ``[Unix time, SM clock MHz, power W, clock event reasons]`` of the first GPU
    this process may use to ``path`` every ``interval_s`` seconds, until killed or until
    process ``parent`` is gone (an engine killed on a timeout leaves no sampler behind):
    the body of :class:`GpuSampler`'s process. The power is NVML's power usage, which on
    Ampere and newer GPUs is an average over the last second."""
    import pynvml

    pynvml.nvmlInit()
    handle = visible_gpus(pynvml)[0]
    reasons = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
               or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)
    with open(path, "a") as f:
        while os.getppid() == parent:
            sample = [time.time(), pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                      pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, int(reasons(handle))]
            f.write(json.dumps(sample) + "\n")
            f.flush()
            time.sleep(interval_s)


def summarize_gpu_samples(samples: list[list[float]],
                          windows: list[tuple[float, float]]) -> dict[str, Any] | None:
    """The samples of :func:`gpu_sampler_main` that fall in any of ``windows`` ((start,
    end) on the Unix clock): their count, the SM clock's median / min / max, the power's
    median / max, and per entry of GPU_CLOCK_REASONS the fraction of samples where the
    driver gave that reason for a lowered clock. None without a sample in a window."""
    inside = [s for s in samples if any(a <= s[0] <= b for a, b in windows)]
    if not inside:
        return None
    clocks, power = [s[1] for s in inside], [s[2] for s in inside]
    out: dict[str, Any] = {
        "samples": len(inside), "sm_clock_mhz_median": statistics.median(clocks),
        "sm_clock_mhz_min": min(clocks), "sm_clock_mhz_max": max(clocks),
        "power_w_median": statistics.median(power), "power_w_max": max(power)}
    for name, mask in GPU_CLOCK_REASONS.items():
        out[f"{name}_fraction"] = sum(1 for s in inside if int(s[3]) & mask) / len(inside)
    return out


class GpuSampler:
    """SM clock, power (a one-second average) and the driver's reasons for a lowered
    clock, sampled every ``interval_s`` while the ``with`` block runs by a process of its
    own (no thread of this process competes for the GIL with vLLM's engine loop);
    :meth:`summary` keeps the samples of chosen windows. Without NVML or a GPU the
    process ends at once and :meth:`summary` gives None."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.samples: list[list[float]] = []
        self._proc: subprocess.Popen | None = None
        self._path = ""

    def __enter__(self) -> GpuSampler:
        fd, self._path = tempfile.mkstemp(suffix=".jsonl", prefix="gpu_samples_")
        os.close(fd)
        try:
            code = ("from vllm_bitdecode.testing.gpu_monitor import gpu_sampler_main; "
                    f"gpu_sampler_main({self._path!r}, {self.interval_s!r}, {os.getpid()})")
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10  # the first sample, or the process's end
            while time.monotonic() < deadline and self._proc.poll() is None:
                if os.path.getsize(self._path) > 0:
                    break
                time.sleep(0.01)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        with open(self._path) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut short by the end
                    self.samples.append(json.loads(line))
        os.unlink(self._path)

    def summary(self, windows: list[tuple[float, float]]) -> dict[str, Any] | None:
        return summarize_gpu_samples(self.samples, windows)
