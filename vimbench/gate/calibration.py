"""The timing protocol the benchmark suite runs under: the clock, one CPU thread, fixed malloc thresholds, and
the calibration workloads timed before every round (``measure_calibrated``). See ``vimbench.gate`` for why."""
from __future__ import annotations

import math
import os
import sys

import torch

from vimbench.measure.env import environment

CPU_THREADS = 1
"""torch intra-op threads for CPU benchmarks (see ``vimbench.gate`` for why one)."""
CLOCKS = {"cpu": "time.thread_time", "cuda": "time.perf_counter"}
"""The clock pytest-benchmark and the calibration use, per device type (seconds)."""
SUITE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
"""Environment of the suite's process: glibc malloc serves allocations below 1 GiB from its heap and keeps
freed memory, instead of mmapping large blocks per call depending on history (see ``vimbench.gate``)."""
MIN_ROUND_S = {"cpu": 5e-3, "cuda": 1e-3}
"""A round repeats the workload until it lasts at least this long (seconds), so clock resolution and,
on CUDA, the launch-and-synchronize overhead stay small against it."""
ROUND_BUDGET_S = 1.0
"""Target workload time per benchmark (seconds): rounds = budget / round time, within [MIN_ROUNDS, MAX_ROUNDS].
The suite's process reads it from ``ROUND_BUDGET_ENV`` when set; a budget of f x this one scales both bounds by
f too (rounded up), so that ``gate --base``, which halves it and runs each side twice, times each side about
as many rounds as one run of the stored-baseline gate (most benchmarks stop at MAX_ROUNDS, not at the budget)."""
ROUND_BUDGET_ENV = "VIMBENCH_ROUND_BUDGET_S"
MIN_ROUNDS, MAX_ROUNDS = 5, 25
TURN_ENV = "VIMBENCH_GATE_TURN"
"""Set by ``gate --base`` (``vimbench.gate.suite.run_pair``) to 'R,W', two pipe descriptors of the suite's process:
``take_turn`` writes one byte on W and waits for one on R, so that the base's and this tree's suite processes
time one at a time, taking turns in the order the gate grants."""
TURN_SEGMENTS = 2
"""Under ``TURN_ENV`` a benchmark's rounds are timed in this many turns (segments), each one run's worth of
ratios for the spread (``segment_starts``)."""

CALIBRATION_SIZES = {"cpu": {"matmul_n": 384, "memory_numel": 16 * 2**20},
                     "cuda": {"matmul_n": 4096, "memory_numel": 128 * 2**20}}
"""Calibration workloads per device type: an (n x n) @ (n x n) float32 matmul (2 n^3 FLOPs), and
out = x + 1 over ``memory_numel`` float32 elements (8 bytes moved each; 128 MiB on CPU, twice the L3)."""


class Calibration:
    """The two fixed reference workloads of ``CALIBRATION_SIZES``, on one device."""

    def __init__(self, device: torch.device):
        sizes = CALIBRATION_SIZES[device.type]
        gen = torch.Generator(device=device).manual_seed(0)
        n = sizes["matmul_n"]
        self.a = torch.randn(n, n, device=device, generator=gen)
        self.mm_out = torch.empty_like(self.a)
        self.x = torch.randn(sizes["memory_numel"], device=device, generator=gen)
        self.add_out = torch.empty_like(self.x)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def measure(self, clock) -> tuple[float, float]:
        """(matmul seconds, memory seconds), each one call timed with ``clock``."""
        self.sync()
        t0 = clock()
        torch.mm(self.a, self.a, out=self.mm_out)
        self.sync()
        t1 = clock()
        torch.add(self.x, 1.0, out=self.add_out)
        self.sync()
        return t1 - t0, clock() - t1


def take_turn() -> None:
    """Under ``TURN_ENV``: says this process is ready (one byte) and waits until the gate grants it the machine;
    else nothing. RuntimeError when the gate went away."""
    fds = os.environ.get(TURN_ENV)
    if not fds:
        return
    read, write = map(int, fds.split(","))
    os.write(write, b"y")
    if os.read(read, 1) != b"g":
        raise RuntimeError(f"{TURN_ENV}: the gate that grants the turns went away")


def segment_starts(rounds: int, segments: int) -> list[int]:
    """The first round of each of ``segments`` nearly equal, contiguous segments of ``rounds`` rounds."""
    return [rounds * k // segments for k in range(segments)]


def measure_calibrated(benchmark, fn, device: torch.device, calibration: Calibration, clock) -> None:
    """Times ``fn()`` with pytest-benchmark's ``benchmark.pedantic``, a calibration before every round.

    After a warm-up call and a probe, a round calls ``fn`` ``inner`` times (then synchronizes on CUDA);
    pytest-benchmark records seconds per round in ``stats.data``; ``extra_info`` gets ``inner`` and the
    per-round calibration seconds ``calibration_matmul_s`` / ``calibration_memory_s``. No warm-up round: the
    warm-up call and the probe ran the workload just before (a warm-up round cost each of ``gate --base``'s four
    runs one more round of every benchmark).
    ``clock`` must be the timer pytest-benchmark was given (``--benchmark-timer``).
    Under ``TURN_ENV`` (``gate --base``) it takes a turn (``take_turn``) before the warm-up call and at the start
    of every later segment (``segment_starts``, ``TURN_SEGMENTS``; then one more untimed call warms up again after
    the other process's turn); ``extra_info['segments']`` says how many (1 without).
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    segments = TURN_SEGMENTS if os.environ.get(TURN_ENV) else 1
    take_turn()
    fn()
    sync()
    t0 = clock()
    fn()
    sync()
    probe = max(clock() - t0, 1e-7)
    inner = max(1, math.ceil(MIN_ROUND_S[device.type] / probe))
    budget = float(os.environ.get(ROUND_BUDGET_ENV, ROUND_BUDGET_S))
    low, high = (math.ceil(bound * budget / ROUND_BUDGET_S) for bound in (MIN_ROUNDS, MAX_ROUNDS))
    rounds = max(segments, min(high, max(low, round(budget / (probe * inner)))))
    turns = set(segment_starts(rounds, segments)[1:])
    calibration_s = []

    def workload():
        for _ in range(inner):
            fn()
        sync()

    def setup():
        if len(calibration_s) in turns:
            take_turn()
            fn()
            sync()
        calibration_s.append(calibration.measure(clock))

    benchmark.pedantic(workload, setup=setup, rounds=rounds)
    benchmark.extra_info.update(inner=inner, segments=segments, calibration_matmul_s=[m for m, _ in calibration_s],
                                calibration_memory_s=[s for _, s in calibration_s])



def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def suite_environment(device: torch.device) -> dict:
    """What a baseline records about the run: ``vimbench.measure.env.environment`` plus the Python version."""
    return {**environment(device), "python_version": sys.version.split()[0]}
