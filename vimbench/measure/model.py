"""Measuring one model configuration: latency, throughput and memory of an inference forward.

``measure_model`` runs inside an isolated worker (see ``isolation.py``); it only measures and returns a
dict of numbers. Presenting (CSV, tables, plots) happens elsewhere.

Timing: eval() + inference_mode; ``warmup`` untimed forwards, then at least ``repeats`` timed forwards and
until ``min_time`` seconds have passed. GPU: one pair of CUDA events per forward; CPU: perf_counter.
Time is per batched forward in ms: median, p10, p90 (``core.time_stats``); throughput = batch / median (img/s).
Memory (GiB = 2^30 bytes):
  GPU  mem_peak_gib      torch.cuda.max_memory_allocated over the process (weights, input, activations)
       mem_reserved_gib  torch.cuda.max_memory_reserved (the caching allocator's segments)
       mem_nvml_gib      NVML device used memory, max sampled every ~5 ms during the timed loop, minus the
                         level before this process touched CUDA (so it includes the CUDA context); empty,
                         with a note in ``error``, when an NVML reading fails (``nvml.py``)
  CPU  mem_peak_gib      resident-set high-water mark of one extra forward after the timed loop, minus the
                         resident set before it: the memory the forward pass adds. For it glibc is told to
                         serve allocations >= 64 KiB with mmap and to trim its heap, so freed tensors go back
                         to the OS and cannot hide the peak (only for that forward: mmap per allocation
                         slows CPU forwards, so timing runs with the default allocator). Needs Linux
                         /proc and glibc, else empty.
Regime (``regime.py``): with compile other than none the forward is compiled once before the warm-up
(``compile_s``, ``graph_breaks``; on a GPU the peak statistics are reset after it, so autotuning buffers
do not count); with amp other than none every forward runs under torch.autocast, weights in ``dtype``.
"""
from __future__ import annotations

import datetime
import os

import torch

from vimbench.count.flops import count_flops
from vimbench.count.memory import predict_memory
from vimbench.kernels.selective_scan.backends import runs_on_cuda
from vimbench.kernels.attention import sdpa_kernel_used
from vimbench.measure.core import DTYPES, GIB, cpu_forward_peak, setup_worker, time_loop, time_stats
from vimbench.measure.nvml import NvmlWatch
from vimbench.measure.isolation import run_isolated
from vimbench.measure.regime import autocast, compiled
from vimbench.models import registry


def attention_kernel(model, device, dtype) -> str:
    """What actually computes attention in ``model``: its backend, and for 'sdpa' the kernel SDPA picks."""
    attn = getattr(model, "attn", None) or registry.OWN_IMPL
    if attn != "sdpa":
        return attn
    blk = model.blocks[0].attn
    return sdpa_kernel_used(device, dtype, model.num_tokens, blk.head_dim, blk.num_heads)


def measure_model(cfg: dict) -> dict:
    """Measures one configuration. ``cfg`` keys: model, options (dict), res, batch, dtype (fp32|fp16|bf16),
    compile (``regime.COMPILE_MODES``), amp (``regime.AMP_DTYPES``), device ("cpu" | "cuda:N"), head (bool),
    warmup, repeats, min_time, threads (CPU; 0 = torch default)."""
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    # NVML's reading before this process touches CUDA; every NVML call is guarded (a failed reading is an
    # empty cell and a note in ``error``, never a lost row)
    watch = NvmlWatch(device.index or 0) if device.type == "cuda" else None
    setup_worker(device, cfg.get("threads", 0))
    model = registry.create_model(cfg["model"], img_size=cfg["res"], **cfg["options"])
    model = model.eval().to(device=device, dtype=dtype)
    x = torch.randn(cfg["batch"], 3, cfg["res"], cfg["res"], device=device, dtype=dtype)
    forward = model if cfg["head"] else model.forward_features
    compute = dtype if cfg["amp"] == "none" else DTYPES[cfg["amp"]]  # what the matmuls run in
    own = getattr(model, "attn", None) or registry.OWN_IMPL  # attention backend, or timm's own forward
    out = {"impl": model.scan_backend(device) if model.family == "vim" else own,
           "kernel": model.scan_backend(device) if model.family == "vim" else attention_kernel(model, device, compute),
           "threads": torch.get_num_threads()}

    def call(fn):
        with torch.inference_mode(), autocast(device, cfg["amp"]):
            fn(x)

    forward, compile_info = compiled(forward, cfg["compile"], call)  # before the warm-up, never timed
    out.update(compile_info)
    if compile_info and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run():
        call(forward)

    out["load_avg_1m"] = os.getloadavg()[0]  # other work on the host distorts CPU timings: record it
    if device.type == "cuda":
        run()  # the first forward before the sampler starts: lazy CUDA/cuBLAS initialisation
        watch.start()
        times = time_loop(run, device, cfg["warmup"], cfg["repeats"], cfg["min_time"])
        out.update(mem_peak_gib=torch.cuda.max_memory_allocated(device) / GIB,
                   mem_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
        out.update(watch.finish(), tf32=False, cudnn_benchmark=False)
    else:
        times = time_loop(run, device, cfg["warmup"], cfg["repeats"], cfg["min_time"])
        peak = cpu_forward_peak(run)
        if peak is not None:
            out["mem_peak_gib"] = peak / GIB
    out.update(time_stats(times))
    out["throughput_img_s"] = cfg["batch"] / (out["time_ms"] / 1e3)
    return out


def config_flops(cfg: dict) -> dict:
    """FLOPs, params and tokens of a configuration (counted on the meta device, no worker needed)."""
    return count_flops(cfg["model"], cfg["res"], cfg["batch"], cfg["head"], **cfg["options"])


DEFAULT_TIMING = {"cuda": dict(warmup=5, repeats=20, min_time=1.0), "cpu": dict(warmup=1, repeats=3, min_time=1.0)}
"""Per device type: untimed forwards, then at least ``repeats`` timed ones and ``min_time`` seconds of them."""
CONFIG_TIMEOUT_S = 3600


def decay_batch(batch: int) -> int:
    """The next smaller batch to try after an OOM: 64 -> 48 -> 32 -> 24 -> 16 -> 12 -> 8 -> 6 -> 4 -> 3 -> 2 -> 1
    (halving, with a 3/4 step in between), 0 when there is nothing smaller."""
    if batch <= 1:
        return 0
    p = 1 << (batch.bit_length() - 1)  # largest power of two <= batch
    if batch > p:
        return p
    return p * 3 // 4 if p >= 4 else p // 2


def scaling_row(cfg: dict, fixed: dict, backoff: bool) -> dict:
    """One row of a scaling CSV: ``measure_model`` in its own worker (on OOM retried at ``decay_batch``
    sizes when ``backoff``), the configuration's FLOPs, its predicted GPU memory, and ``fixed`` (the
    environment and command). ``cfg``: as ``measure_model`` takes it, with ``batch_requested`` for the
    batch, plus family and impl."""
    batch = cfg["batch_requested"]
    while True:
        run_cfg = {**cfg, "batch": batch}
        result = run_isolated(measure_model, (run_cfg,), timeout=CONFIG_TIMEOUT_S)
        if result["status"] != "oom" or not backoff or decay_batch(batch) == 0:
            break
        batch = decay_batch(batch)
    row = {k: cfg[k] for k in ("model", "family", "impl", "res", "batch_requested", "dtype", "compile", "amp",
                               "device", "head", "warmup")}
    row.update(fixed, batch=batch, kernel=cfg["impl"], timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
               **config_flops(run_cfg))
    row.update(result)
    if cfg["family"] == "vim" and not runs_on_cuda(cfg["impl"]):
        return row  # a CPU-only scan backend (cpp): no GPU run to predict, mem_pred_peak_gib stays empty
    if cfg["compile"] != "none":  # the prediction replays eager execution; inductor's fused kernels allocate less
        return row
    try:  # the GPU memory this configuration is predicted to need, on any device (vimbench.count.memory)
        row["mem_pred_peak_gib"] = predict_memory(cfg["model"], cfg["res"], batch, cfg["dtype"], cfg["head"],
                                                  amp=cfg["amp"], **cfg["options"])["mem_pred_peak_gib"]
    except Exception as e:  # a failed prediction must not cost the measured row
        row["error"] = "; ".join(filter(None, [row.get("error"), f"mem_pred failed: {type(e).__name__}: {e}"]))
    return row
