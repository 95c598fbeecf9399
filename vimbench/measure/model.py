"""Measuring one model configuration: latency, throughput and memory of an inference forward or of a train
step (``train.py``: forward + loss, backward, SGD step; per-phase medians beside the step's time).

``measure_model`` runs inside an isolated worker (see ``isolation.py``); it only measures and returns a
dict of numbers. Presenting (CSV, tables, plots) happens elsewhere.

Timing: eval() + inference_mode; ``warmup`` untimed forwards, then at least ``repeats`` timed forwards and
until ``min_time`` seconds have passed. GPU: one pair of CUDA events per forward; CPU: perf_counter.
Time is per batched forward (train: per step) in ms: median, p10, p90 (``core.time_stats``); throughput =
batch / median (img/s). Train: ``model.train()`` instead of eval() + inference_mode, ``time_fwd_ms``,
``time_bwd_ms`` and ``time_opt_ms`` the phase medians, and a NaN/inf loss or gradient raises (an error row).
Memory (GiB = 2^30 bytes):
  GPU  mem_peak_gib      torch.cuda.max_memory_allocated over the process (weights, input, activations;
                         train: also the gradients and the SGD momentum buffers)
       mem_reserved_gib  torch.cuda.max_memory_reserved (the caching allocator's segments)
       mem_nvml_gib      NVML device used memory, max sampled every ~5 ms during the timed loop, minus the
                         level before this process touched CUDA (so it includes the CUDA context); empty,
                         with a note in ``error``, when an NVML reading fails (``nvml.py``)
  CPU  mem_peak_gib      resident-set high-water mark of one extra forward after the timed loop, minus the
                         resident set before it: the memory the forward pass adds. For it glibc is told to
                         serve allocations >= 64 KiB with mmap and to trim its heap, so freed tensors go back
                         to the OS and cannot hide the peak (only for that forward: mmap per allocation
                         slows CPU forwards, so timing runs with the default allocator). Needs Linux
                         /proc and glibc, else empty. Train: one extra step, the gradients freed before
                         the base reading, so the weights, the SGD momentum buffers (allocated by the
                         first step) and the input are in the base, and the step's activations saved for
                         the backward, its gradients and temporaries are what it adds.
Regime (``regime.py``): with compile other than none the forward is compiled once before the warm-up
(train: the first step through the compiled forward compiles its backward too)
(``compile_s``, ``graph_breaks``; on a GPU the peak statistics are reset after it, so autotuning buffers
do not count); with amp other than none every forward runs under torch.autocast, weights in ``dtype``.
"""
from __future__ import annotations

import os
from typing import TypedDict

import torch

from vimbench.config import ScalingConfig
from vimbench.kernels.attention import sdpa_kernel_used
from vimbench.measure.core import DTYPES, GIB, cpu_forward_peak, setup_worker, time_loop, time_stats
from vimbench.measure.env import precision
from vimbench.measure.nvml import NvmlWatch
from vimbench.measure.regime import autocast, compiled
from vimbench.measure.train import TrainStep, enable_grad_checkpointing
from vimbench.models import registry


def attention_kernel(model, device, dtype) -> str:
    """What actually computes attention in ``model``: its backend, and for 'sdpa' the kernel SDPA picks."""
    attn = getattr(model, "attn", None) or registry.OWN_IMPL
    if attn != "sdpa":
        return attn
    blk = model.blocks[0].attn
    return sdpa_kernel_used(device, dtype, model.num_tokens, blk.head_dim, blk.num_heads)


class ModelTiming(TypedDict, total=False):
    """What ``measure_model`` measured (units and meanings in the module docstring): the backend that ran
    (impl) and what computed it (kernel), torch threads, the time per call in ms (median, p10, p90) and the
    timed calls, throughput (img/s), memory (GiB), the 1-minute load average, the ``precision()`` settings read
    before timing; GPU: NVML memory and telemetry, and ``error`` notes of failed NVML readings; train: the
    phase medians; compiled: compile_s and graph_breaks."""
    impl: str
    kernel: str
    threads: int
    time_ms: float
    time_ms_p10: float
    time_ms_p90: float
    repeats: int
    throughput_img_s: float
    mem_peak_gib: float
    mem_reserved_gib: float
    mem_nvml_gib: float
    sm_clock_mhz: float
    temperature_c: float
    power_w: float
    error: str
    load_avg_1m: float
    tf32: bool
    cudnn_tf32: bool
    cudnn_benchmark: bool
    matmul_precision: str
    time_fwd_ms: float
    time_bwd_ms: float
    time_opt_ms: float
    compile_s: float
    graph_breaks: int


def measure_model(cfg: ScalingConfig) -> ModelTiming:
    """Measures one configuration at its ``batch`` (train mode: ``train.TrainStep``). Returns the measured
    columns of a scaling row (see the module docstring): impl, kernel, threads, time_ms (p10, p90), repeats,
    throughput_img_s, memory, load_avg_1m and the precision settings; train: the phase medians; compiled: compile_s
    and graph_breaks."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    train = cfg.mode == "train"
    # NVML's reading before this process touches CUDA; every NVML call is guarded (a failed reading is an
    # empty cell and a note in ``error``, never a lost row)
    watch = NvmlWatch(device.index or 0) if device.type == "cuda" else None
    setup_worker(device, cfg.threads)
    model = registry.create_model(cfg.model, img_size=cfg.res, **cfg.options)
    model = model.eval().to(device=device, dtype=dtype)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    x = torch.randn(cfg.batch, 3, cfg.res, cfg.res, device=device, dtype=dtype)
    forward = model if cfg.head else model.forward_features
    compute = dtype if cfg.amp == "none" else DTYPES[cfg.amp]  # what the matmuls run in
    own = getattr(model, "attn", None) or registry.OWN_IMPL  # attention backend, or timm's own forward
    out: ModelTiming = {"impl": model.scan_backend(device) if model.family == "vim" else own,
           "kernel": model.scan_backend(device) if model.family == "vim" else attention_kernel(model, device, compute),
           "threads": torch.get_num_threads()}

    if train:
        call = TrainStep(model, x, cfg.head, cfg.amp)  # call(fn): one train step through fn
    else:
        def call(fn):
            with torch.inference_mode(), autocast(device, cfg.amp):
                fn(x)

    forward, compile_info = compiled(forward, cfg.compile, call)  # before the warm-up, never timed
    out.update(compile_info)
    if compile_info and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run():
        call(forward)

    def timed() -> list[float]:
        if not train:
            return time_loop(run, device, cfg.warmup, cfg.repeats, cfg.min_time)
        result = call.time(forward, device, cfg.warmup, cfg.repeats, cfg.min_time)
        out.update({k: v for k, v in result.items() if k != "step"})
        return result["step"]

    out["load_avg_1m"] = os.getloadavg()[0]  # other work on the host distorts CPU timings: record it
    out.update(precision())  # what the timed calls ran under
    if device.type == "cuda":
        run()  # the first call before the sampler starts: lazy CUDA/cuBLAS initialisation
        watch.start()
        times = timed()
        out.update(mem_peak_gib=torch.cuda.max_memory_allocated(device) / GIB,
                   mem_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
        out.update(watch.finish())
    else:
        times = timed()
        if train:  # the gradients go before the base reading: the step's own gradients count in its peak
            call.zero_grad()
        peak = cpu_forward_peak(run)
        if peak is not None:
            out["mem_peak_gib"] = peak / GIB
    if train:
        call.check_finite()  # the extra steps above (first call, memory step) too
    out.update(time_stats(times))
    out["throughput_img_s"] = cfg.batch / (out["time_ms"] / 1e3)
    return out

