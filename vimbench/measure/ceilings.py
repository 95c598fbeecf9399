"""The device's measured ceilings, once per kernels run: a large copy (GB/s) and a large matmul (GFLOP/s) in
the run's dtype, TF32 off; on CPU also the exp rate of the compiled scan's state exp (exp/s,
``compiled_cpu.exp_floor_rate``) over the run's threads (the capability it ran with is in every row's
environment, cpu_capability). A row's floor (``rows.kernels.floor``) is the largest lower bound on its time
these rates give."""
from __future__ import annotations

import torch

from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.measure.core import DTYPES, setup_worker, time_call

CEILING_SIZES = {"cuda": dict(copy_bytes=2 ** 30, matmul_n=8192), "cpu": dict(copy_bytes=2 ** 28, matmul_n=2048)}
EXP_TRIALS = 5


def measure_ceilings(cfg: dict) -> dict:
    """The device's measured ceilings (run it through ``run_isolated``; ``cfg``: device, dtype, threads,
    timing):
    ceiling_gbs = 2 * nbytes / time of copying a ``copy_bytes`` tensor (one read, one write);
    ceiling_gflops_s = 2 n^3 / time of an n x n matmul in the run's dtype (``CEILING_SIZES``).
    Both from the p10 time, not the median: other work on the host only ever slows a run down, and a
    ceiling is the best rate the device sustains. On CPU also ``exp_ceiling``'s ceiling_exp_s (or
    exp_missing)."""
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    setup_worker(device, cfg["threads"])
    size = CEILING_SIZES[device.type]
    src = torch.randn(size["copy_bytes"] // dtype.itemsize, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    n = size["matmul_n"]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timing = {**cfg["timing"], "repeats": max(cfg["timing"]["repeats"], 10)}
    copy_ms = time_call(lambda: dst.copy_(src), device, timing)["time_ms_p10"]
    matmul_ms = time_call(lambda: a @ b, device, timing)["time_ms_p10"]
    out = {"ceiling_gbs": 2 * src.numel() * dtype.itemsize / (copy_ms * 1e-3) / 1e9,
           "ceiling_gflops_s": 2 * n ** 3 / (matmul_ms * 1e-3) / 1e9}
    return out | (exp_ceiling() if device.type == "cpu" else {})


def exp_ceiling() -> dict:
    """On CPU: ceiling_exp_s, the best of ``EXP_TRIALS`` measurements of ``compiled_cpu.exp_floor_rate``
    (exp/s over the threads torch uses); without the compiled kernels, exp_missing (why) instead of the rate."""
    ok, why = compiled_cpu.available()
    if not ok:
        return {"exp_missing": why}
    return {"ceiling_exp_s": max(compiled_cpu.exp_floor_rate() for _ in range(EXP_TRIALS))}
