"""Timing the token mixers alone (the ops of ``vimbench.count.ops.OPS``): one ``KernelConfig`` in, its
``OpTiming`` out, in an isolated worker (see ``isolation.py``).

  time (ms)  GPU: triton.testing.do_bench (CUDA events, L2 flushed, 25 ms warm-up, 100 ms of runs),
             median and p10/p90; CPU: ``core.time_loop`` (the scaling sweep's timer), median and p10/p90
  memory     GPU: torch.cuda.max_memory_allocated over one call, reset after the inputs are built (so
             inputs, weights, output and workspace); CPU: ``core.cpu_forward_peak``, the resident memory
             one call adds (the inputs are already resident). GiB = 2^30 bytes.
The op's inputs are built (``OpSpec.build``, in the layout the backend reads) before anything is timed.
Mode train: one call is the op's forward and the backward of its output for a fixed random output gradient
(``torch.autograd.grad``, not accumulated into ``.grad``), with gradients for every input tensor and, for
mixer_vim and block_deit, every weight (``_forward_backward``).
Regime (``regime.py``): with compile other than none the op's callable is compiled once before anything is
timed (``compile_s``, ``graph_breaks``); with amp other than none every call runs under torch.autocast.
Autocast casts what goes into matmuls (attention, and the projections of mixer_vim and block_deit); the
scan ops are custom ops without an autocast rule, so ``scan`` and ``scan_bidir`` run on their inputs as
built, in ``dtype`` (inside a model they receive the half-precision outputs of the projections before them).
The device's ceilings are ``ceilings.py``'s; the correctness checks before any timing ``verify.py``'s.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, TypedDict

import torch

from vimbench.count.ops import OPS, Geometry, Prepared
from vimbench.kernels.attention import sdpa_kernel_used
from vimbench.measure.core import DTYPES, GIB, cpu_forward_peak, setup_worker, time_call
from vimbench.measure.env import precision
from vimbench.measure.regime import autocast, compiled
# named here by commands/scaling.py and kernels/plugins.py, other helpers' files: import them from verify

CPU_TIMING = dict(warmup=0, repeats=3, min_time=0.5)
"""CPU timing defaults: after one untimed call, at least 3 timed calls and 0.5 s of them (a full default
sweep then takes a few minutes on 2 cores). GPUs use do_bench's own warm-up and repetitions."""


@dataclass(frozen=True)
class KernelConfig:
    """One configuration of a kernels sweep: the key columns of the kernels CSV (``rows.schema.KERNELS.key``),
    then the op's sizes and how it is timed. ``impl`` is a concrete backend of the op's kind; ``device`` "cpu"
    or "cuda:N"; ``dtype`` fp32 | fp16 | bf16; ``mode`` infer (one forward under inference_mode) or train
    (forward and backward); ``compile`` and ``amp`` the regime; ``threads`` CPU threads (0 = torch's default);
    ``timing`` the CPU timing as ``core.time_call`` takes it (warmup, repeats, min_time: ``CPU_TIMING``), a dict
    apart from the fields: its repeats is the CSV's column of timed calls, which only a timed row fills."""
    op: str
    impl: str
    model: str
    res: int
    batch: int
    dtype: str
    mode: str
    compile: str
    amp: str
    device: str
    geometry: Geometry
    threads: int
    timing: dict


class OpTiming(TypedDict, total=False):
    """What ``measure_op`` measured: the kernel that computed the op, time_ms (median), time_ms_p10,
    time_ms_p90, repeats (CPU: timed calls), mem_peak_gib, threads, load_avg_1m, the ``precision()`` settings
    read before timing, and for a compiled op compile_s and graph_breaks."""
    kernel: str
    time_ms: float
    time_ms_p10: float
    time_ms_p90: float
    repeats: int
    mem_peak_gib: float
    threads: int
    load_avg_1m: float
    tf32: bool
    cudnn_tf32: bool
    cudnn_benchmark: bool
    matmul_precision: str
    compile_s: float
    graph_breaks: int


def kernel_name(op: str, impl: str, g: Geometry, device, dtype: torch.dtype) -> str:
    """What computes the op: the backend, or for sdpa the kernel SDPA picks (flash, efficient, cudnn or
    math; "flash" on CPU is its flash-style CPU kernel)."""
    if OPS[op].backend == "attn" and impl == "sdpa":
        return sdpa_kernel_used(device, dtype, g.L, g.head_dim, g.heads)
    return impl


def _forward_backward(prep: Prepared, forward: Callable) -> Callable[[], tuple]:
    """One train call of a prepared op: ``forward()`` then the gradients of every input tensor (its weights
    included) for a fixed random output gradient (made here, outside the timed region), returned by
    ``torch.autograd.grad`` rather than accumulated."""
    wrt = [t.requires_grad_() for t in prep.inputs]
    grad_out = torch.randn_like(prep.run())
    return lambda: torch.autograd.grad(forward(), wrt, grad_out)


def measure_op(cfg: KernelConfig) -> OpTiming:
    """Times one configuration (run it through ``run_isolated``): see the module docstring."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    setup_worker(device, cfg.threads)
    compute = dtype if cfg.amp == "none" else DTYPES[cfg.amp]  # what the matmuls run in
    # outside inference_mode: under it the dispatcher shows SDPA's composite op, not the kernel it picks
    out = OpTiming(kernel=kernel_name(cfg.op, cfg.impl, cfg.geometry, device, compute),
                   threads=torch.get_num_threads(), load_avg_1m=os.getloadavg()[0], **precision())

    def call(fn):
        with autocast(device, cfg.amp):
            return fn()

    train = cfg.mode == "train"
    with torch.inference_mode(not train):
        prep = OPS[cfg.op].build(cfg.geometry, cfg.impl, device, dtype)
        op, compile_info = compiled(prep.run, cfg.compile, call)  # before anything is timed
        out.update(compile_info)
        run = functools.partial(call, op) if not train else _forward_backward(prep, functools.partial(call, op))
        run()  # first call outside everything: compilation, autotuning, library handles
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            run()
            torch.cuda.synchronize(device)
            out["mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            out.update(time_call(run, device, cfg.timing))
        else:
            out.update(time_call(run, device, cfg.timing))
            peak = cpu_forward_peak(run)
            if peak is not None:
                out["mem_peak_gib"] = peak / GIB
    return out
