"""What every measurer shares: dtypes and units, the worker's setup, the timer, and CPU peak memory.

Timing: ``warmup`` untimed calls, then at least ``repeats`` timed calls and until ``min_time`` seconds have
passed. GPU: one pair of CUDA events per call; CPU: perf_counter. ``time_stats`` reduces the per-call
times to the columns every CSV uses: time_ms (median), time_ms_p10, time_ms_p90, repeats.
"""
from __future__ import annotations

import ctypes
import gc
import time
from pathlib import Path

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GIB = 2 ** 30


def setup_worker(device: torch.device, threads: int = 0) -> None:
    """Seed 0, torch CPU threads (0 = torch's default), and on a GPU: the current device, TF32 off
    (fp32 means fp32) and cudnn.benchmark off."""
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False


class PhaseClock:
    """Marks the boundaries of one call's phases: ``mark()`` at its start and after each phase. GPU: a CUDA
    event recorded on the current stream at each mark; CPU: perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def phases_ms(self) -> list[float]:
        """The time of each phase in ms (one fewer than the marks); on a GPU it waits for the last mark."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def time_phases(run, device, warmup: int, repeats: int, min_time: float) -> list[list[float]]:
    """Per-call phase times in ms (``PhaseClock.phases_ms``, one list per timed call) after ``warmup``
    untimed calls; ``run(clock)`` makes one call and marks its phases on ``clock``. What ``run`` does before
    its first mark (e.g. zeroing gradients) is outside the timed region."""
    for _ in range(warmup):
        run(PhaseClock(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        clock = PhaseClock(device)
        run(clock)
        times.append(clock.phases_ms())
    return times


def time_loop(run, device, warmup: int, repeats: int, min_time: float) -> list[float]:
    """Per-call latencies in ms after ``warmup`` untimed calls of ``run()`` (``time_phases`` with one phase)."""
    def marked(clock):
        clock.mark()
        run()
        clock.mark()

    return [sum(phases) for phases in time_phases(marked, device, warmup, repeats, min_time)]


def time_stats(times_ms) -> dict:
    """time_ms (median), time_ms_p10, time_ms_p90 and repeats (the count) of per-call times in ms."""
    ms = np.asarray(times_ms, dtype=float)
    return {"time_ms": float(np.median(ms)), "time_ms_p10": float(np.percentile(ms, 10)),
            "time_ms_p90": float(np.percentile(ms, 90)), "repeats": int(ms.size)}


def time_call(run, device, timing: dict) -> dict:
    """time_ms (median), time_ms_p10, time_ms_p90 of ``run``: triton.testing.do_bench on a GPU (CUDA events,
    L2 flushed, its own warm-up and repetitions); on CPU ``time_loop`` with ``timing`` (warmup, repeats,
    min_time), plus the number of timed calls (repeats)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        med, p10, p90 = do_bench(run, quantiles=[0.5, 0.1, 0.9])
        return {"time_ms": float(med), "time_ms_p10": float(p10), "time_ms_p90": float(p90)}
    return time_stats(time_loop(run, device, timing["warmup"], timing["repeats"], timing["min_time"]))


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB: what the kernel estimates new work can use without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    raise OSError("/proc/meminfo has no MemAvailable")


def cpu_forward_peak(run) -> float | None:
    """Resident memory (bytes) that one call of ``run`` adds at its peak; None where not measurable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        gc.collect()
        libc.malloc_trim(0)
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed blocks are unmapped at once
        base = _rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    run()
    peak = _rss_bytes("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0)
