"""Measuring one model configuration: latency, throughput and memory of an inference forward.

``measure_model`` runs inside an isolated worker (see ``isolation.py``); it only measures and returns a
dict of numbers. Presenting (CSV, tables, plots) happens elsewhere.

Timing: eval() + inference_mode; ``warmup`` untimed forwards, then at least ``repeats`` timed forwards and
until ``min_time`` seconds have passed. GPU: one pair of CUDA events per forward; CPU: perf_counter.
Latency is per batch in ms: median, p10, p90; throughput = batch / median latency (img/s).
Memory (GiB = 2^30 bytes):
  GPU  mem_peak_gib      torch.cuda.max_memory_allocated over the process (weights, input, activations)
       mem_reserved_gib  torch.cuda.max_memory_reserved (the caching allocator's segments)
       mem_nvml_gib      NVML device used memory, max sampled every ~5 ms during the timed loop, minus the
                         level before this process touched CUDA (so it includes the CUDA context)
  CPU  mem_peak_gib      resident-set high-water mark of one extra forward after the timed loop, minus the
                         resident set before it: the memory the forward pass adds. For it glibc is told to
                         serve allocations >= 64 KiB with mmap and to trim its heap, so freed tensors go back
                         to the OS and cannot hide the peak (only for that forward: mmap per allocation
                         slows CPU forwards, so timing runs with the default allocator). Needs Linux
                         /proc and glibc, else empty.
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import registry
from .env import gpu_telemetry, nvml
from .flops import count_flops
from .kernels.attention import sdpa_kernel_used

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GIB = 2 ** 30


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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


class _NvmlSampler(threading.Thread):
    """Samples NVML used memory of one GPU every ``period`` seconds until stopped; keeps the max."""

    def __init__(self, nv, index: int, period: float = 0.005):
        super().__init__(daemon=True)
        self.nv, self.handle, self.period = nv, nv.nvmlDeviceGetHandleByIndex(index), period
        self.peak, self._stop_event = 0, threading.Event()

    def used(self) -> int:
        return self.nv.nvmlDeviceGetMemoryInfo(self.handle).used

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.used())


def attention_kernel(model, device, dtype) -> str:
    """What actually computes attention in ``model``: its backend, and for 'sdpa' the kernel SDPA picks."""
    attn = getattr(model, "attn", "")
    if attn != "sdpa":
        return attn
    blk = model.blocks[0].attn
    return sdpa_kernel_used(device, dtype, model.num_tokens, blk.head_dim, blk.num_heads)


def time_loop(run, device, warmup: int, repeats: int, min_time: float) -> list[float]:
    """Per-forward latencies in ms after ``warmup`` untimed forwards."""
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_model(cfg: dict) -> dict:
    """Measures one configuration. ``cfg`` keys: model, options (dict), res, batch, dtype (fp32|fp16|bf16),
    device ("cpu" | "cuda:N"), head (bool), warmup, repeats, min_time, threads (CPU; 0 = torch default)."""
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    nv, idle = None, 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        nv = nvml()
        if nv is not None:
            idle = nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(device.index or 0)).used
        torch.cuda.set_device(device)
    model = registry.create_model(cfg["model"], img_size=cfg["res"], **cfg["options"])
    model = model.eval().to(device=device, dtype=dtype)
    x = torch.randn(cfg["batch"], 3, cfg["res"], cfg["res"], device=device, dtype=dtype)
    forward = model if cfg["head"] else model.forward_features
    out = {"impl": model.scan_backend(device) if model.family == "vim" else getattr(model, "attn", ""),
           "kernel": model.scan_backend(device) if model.family == "vim" else attention_kernel(model, device, dtype),
           "threads": torch.get_num_threads()}

    def run():
        with torch.inference_mode():
            forward(x)

    sampler = None
    out["load_avg_1m"] = os.getloadavg()[0]  # other work on the host distorts CPU timings: record it
    if device.type == "cuda":
        run()  # the first forward before the sampler starts: lazy CUDA/cuBLAS initialisation
        if nv is not None:
            sampler = _NvmlSampler(nv, device.index or 0)
            sampler.start()
        times = time_loop(run, device, cfg["warmup"], cfg["repeats"], cfg["min_time"])
        out.update(mem_peak_gib=torch.cuda.max_memory_allocated(device) / GIB,
                   mem_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
        if sampler is not None:
            out["mem_nvml_gib"] = (sampler.stop() - idle) / GIB
        out.update(gpu_telemetry(nv, device.index or 0), tf32=False, cudnn_benchmark=False)
    else:
        times = time_loop(run, device, cfg["warmup"], cfg["repeats"], cfg["min_time"])
        peak = cpu_forward_peak(run)
        if peak is not None:
            out["mem_peak_gib"] = peak / GIB
    ms = np.asarray(times)
    median = float(np.median(ms))
    out.update(latency_ms=median, latency_ms_p10=float(np.percentile(ms, 10)),
               latency_ms_p90=float(np.percentile(ms, 90)), throughput_img_s=cfg["batch"] / (median / 1e3),
               repeats=len(times))
    return out


def config_flops(cfg: dict) -> dict:
    """FLOPs, params and tokens of a configuration (counted on the meta device, no worker needed)."""
    return count_flops(cfg["model"], cfg["res"], cfg["batch"], cfg["head"], **cfg["options"])
