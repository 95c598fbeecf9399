"""The token mixers alone: Vim's selective scan against attention's softmax(Q K^T) V at matched lengths.

Shapes: b batch, L tokens (cls included, the model's own count at a resolution), D the model's embed dim
("width"), E = 2D scan channels, N d_state, H heads, d head_dim, s bytes per element of the run's dtype.
Ops (``OPS``, one ``OpSpec`` each; inputs are built outside the timed region):
    scan        one direction of the selective scan as a Mamba layer calls it: u, delta, z (b, E, L),
                B, C (b, N, L), A (E, N), D and delta_bias (E,); delta = softplus(delta + delta_bias),
                y = (scan + D*u) * silu(z), (b, E, L)
    scan_bidir  Vim's pair through ``bidirectional_scan``: two directions, each with its own u, delta, B, C,
                A, D, delta_bias; one shared z; y = (y_f + y_b) * silu(z), (b, E, L)
    attention   softmax(q k^T / sqrt(d)) v with q, k, v, out (b, H, L, d)
    mixer_vim   layer 0's ``BiMambaMixer`` of the Vim model (in_proj, both convs, x/dt projections, both
                scans, out_proj): (b, L, D) -> (b, L, D)
    block_deit  layer 0's attention module of the DeiT model (qkv projection, attention, output projection):
                (b, L, D) -> (b, L, D)
A, D and delta_bias are float32 (Vim passes them as .float()); every other tensor is in the run's dtype.
Layout: the scan's (b, channels, L) inputs are built in the layout the backend reads (``_seq``): time-major
memory, as the Vim mixer produces it, for the backends that read strided inputs (``STRIDED``: cpp), contiguous
for the others, so that each backend is timed at its best and none pays a layout copy in the timed region.
Values: Vim's initialisation (A = -[1..N] per channel, D = 1, softplus(delta_bias) = 0.01), normal inputs.

FLOPs: one call counted with FlopCounterMode on the meta device, the project's convention (2 per
multiply-add for matmuls and convolutions; the scan by ``scan_flops``'s registered formula; softmax and
other elementwise work outside the scan uncounted). FLOPs do not depend on the backend, so they are counted
with the reference backends (``FLOP_IMPL``).
Bytes: the minimal traffic, every input read once and every output written once (``OpSpec.traffic``);
what a kernel moves beyond it (the scan's (b, E, L, N) state, eager attention's (b, H, L, L) scores,
re-reads) is its excess over this ideal.
Mode train (``mode`` column): one call is the op's forward and the backward of its output for a fixed random
output gradient (``torch.autograd.grad``, not accumulated into ``.grad``), with gradients for every input
tensor (the scan's u, delta, A, B, C, D, z and delta_bias; q, k, v; the tokens) and, for mixer_vim and
block_deit, every weight. FLOPs: the forward's (as above) plus the backward by convention per kind: a
matmul's or convolution's 2x its forward (grad input and grad weight), attention's 2.5x (FlashAttention's
convention, its backward recomputing Q K^T: ``ATTENTION_BWD_FACTOR``), the scan's ``scan_bwd_flops`` per
direction (and the shared gate's 8 per (b, e, t) for Vim's pair). Bytes: the forward's minimal traffic
(inputs + output) plus the backward's, which reads every input once more and the output's gradient and
writes every input's gradient (2 x inputs + output): 3 x inputs + 2 x output in all. What a backward moves
beyond it (the output and logsumexp fused attention re-reads, the probabilities eager attention saved, the
scan's recomputed states) is its excess.

``measure_op`` runs one configuration in an isolated worker (see ``isolation.py``):
  time (ms)  GPU: triton.testing.do_bench (CUDA events, L2 flushed, 25 ms warm-up, 100 ms of runs),
             median and p10/p90; CPU: ``core.time_loop`` (the scaling sweep's timer), median and p10/p90
  memory     GPU: torch.cuda.max_memory_allocated over one call, reset after the inputs are built (so
             inputs, weights, output and workspace); CPU: ``core.cpu_forward_peak``, the resident memory
             one call adds (the inputs are already resident). GiB = 2^30 bytes.
Regime (``regime.py``): with compile other than none the op's callable is compiled once before anything is
timed (``compile_s``, ``graph_breaks``); with amp other than none every call runs under torch.autocast.
Autocast casts what goes into matmuls (attention, and the projections of mixer_vim and block_deit); the
scan ops are custom ops without an autocast rule, so ``scan`` and ``scan_bidir`` run on their inputs as
built, in ``dtype`` (inside a model they receive the half-precision outputs of the projections before them).
``measure_ceilings`` measures the device's ceilings once per run: a large copy (GB/s) and a large matmul
(GFLOP/s) in the run's dtype, TF32 off; on CPU also the ATen CPU capability and the exp rate of the compiled
scan's state exp (exp/s, ``compiled_cpu.exp_floor_rate``) over the run's threads.
Floor (``floor``): the largest lower bound on a row's time that its measured ceilings give: flops_total at the
matmul rate (not under amp: that rate is measured in dtype), bytes at the copy bandwidth, and for the ops that
run selective scans the exps they need (``op_exps``) at the exp rate; frac_floor = floor_ms / time_ms.
``preamble`` runs the ceilings and the scan backends' correctness checks (``check_scans``) as one job where
the configurations run (on Slurm a node, not the login node).
"""
from __future__ import annotations

import datetime
import functools
import math
import os
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from vimbench.count.flops import flop_category
from vimbench.kernels.attention import attention, sdpa_kernel_used
from vimbench.measure.env import precision
from vimbench.measure.isolation import run_isolated
from vimbench.kernels.selective_scan import REGISTRY, bidirectional_scan, compiled_cpu, selective_scan
from vimbench.kernels.plugins import time_limit, worker_failure
from vimbench.kernels.selective_scan.backends import describe
from vimbench.kernels.selective_scan.check import check_named_backend
from vimbench.kernels.selective_scan.ops import scan_bwd_flops
from vimbench.measure.core import DTYPES, GIB, cpu_forward_peak, setup_worker, time_loop, time_stats
from vimbench.measure.regime import autocast, compiled
from vimbench.models.registry import count_params, create_model


@dataclass(frozen=True)
class Geometry:
    """Sizes of one configuration, taken from the model at ``res``. Scan fields are 0 for a DeiT model,
    attention fields 0 for a Vim model."""
    model: str
    res: int
    batch: int
    L: int          # tokens incl. cls
    width: int      # D, the model's embed dim
    d_inner: int    # E = 2D (Vim)
    d_state: int    # N (Vim)
    heads: int      # H (DeiT)
    head_dim: int   # d (DeiT)


def model_geometry(model: str, res: int, batch: int) -> Geometry:
    """The sizes of ``model``'s token mixer at ``res``, read from the model built on the meta device."""
    with torch.device("meta"):
        net = create_model(model, img_size=res)
    if net.family == "vim":
        mixer = net.layers[0].mixer
        return Geometry(model, res, batch, net.num_tokens, net.embed_dim, mixer.d_inner, mixer.d_state, 0, 0)
    attn = net.blocks[0].attn
    return Geometry(model, res, batch, net.num_tokens, net.embed_dim, 0, 0, attn.num_heads, attn.head_dim)


@dataclass(frozen=True)
class Prepared:
    """An op ready to time: ``run()`` computes it once; ``inputs`` are the tensors it reads (weights
    included); ``params`` counts the weights among them."""
    run: Callable[[], torch.Tensor]
    inputs: list
    params: int = 0


def _seq(b: int, channels: int, L: int, impl: str, device, dtype) -> torch.Tensor:
    """A random (b, channels, L) scan input laid out as ``impl`` reads it: time-major memory (the transpose of
    a contiguous (b, L, channels) tensor, as the Vim mixer produces) for a backend in ``STRIDED``, contiguous
    (b, channels, L) for the others; so no backend pays for a layout copy inside the timed region."""
    if REGISTRY[impl].strided:
        return torch.randn(b, L, channels, device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(b, channels, L, device=device, dtype=dtype)


def _direction(g: Geometry, impl: str, device, dtype) -> dict:
    """One scan direction's inputs (see the module docstring), as keyword arguments of ``selective_scan``."""
    b, E, L, N = g.batch, g.d_inner, g.L, g.d_state
    f32 = dict(device=device, dtype=torch.float32)
    return dict(u=_seq(b, E, L, impl, device, dtype), delta=_seq(b, E, L, impl, device, dtype),
                A=-torch.arange(1, N + 1, **f32).repeat(E, 1),
                B=_seq(b, N, L, impl, device, dtype), C=_seq(b, N, L, impl, device, dtype),
                D=torch.ones(E, **f32),
                delta_bias=torch.full((E,), math.log(math.expm1(0.01)), **f32))


def _build_scan(g: Geometry, impl: str, device, dtype) -> Prepared:
    d = _direction(g, impl, device, dtype)
    z = _seq(g.batch, g.d_inner, g.L, impl, device, dtype)
    return Prepared(lambda: selective_scan(**d, z=z, delta_softplus=True, backend=impl), [*d.values(), z])


def _build_scan_bidir(g: Geometry, impl: str, device, dtype) -> Prepared:
    f, bk = _direction(g, impl, device, dtype), _direction(g, impl, device, dtype)
    z = _seq(g.batch, g.d_inner, g.L, impl, device, dtype)
    order = ("u", "delta", "A", "B", "C", "D")

    def run():
        return bidirectional_scan(*(f[k] for k in order), *(bk[k] for k in order), z=z,
                                  delta_bias=f["delta_bias"], delta_bias_b=bk["delta_bias"], delta_softplus=True,
                                  backend=impl)
    return Prepared(run, [*f.values(), *bk.values(), z])


def _build_attention(g: Geometry, impl: str, device, dtype) -> Prepared:
    q, k, v = (torch.randn(g.batch, g.heads, g.L, g.head_dim, device=device, dtype=dtype) for _ in range(3))
    return Prepared(lambda: attention(q, k, v, impl), [q, k, v])


def _model_layer(g: Geometry, options: dict, device, dtype) -> torch.nn.Module:
    """Layer 0's token mixer of ``g.model`` (built by the registry at ``g.res``), on ``device`` in ``dtype``."""
    with torch.device("meta" if device.type == "meta" else "cpu"):
        net = create_model(g.model, img_size=g.res, **options)
    layer = net.layers[0].mixer if net.family == "vim" else net.blocks[0].attn
    return layer.eval().to(device=device, dtype=dtype)


def _build_layer(option: str) -> Callable[..., Prepared]:
    def build(g: Geometry, impl: str, device, dtype) -> Prepared:
        layer = _model_layer(g, {option: impl}, device, dtype)
        h = torch.randn(g.batch, g.L, g.width, device=device, dtype=dtype)
        return Prepared(lambda: layer(h), [h, *layer.parameters()], count_params(layer))
    return build


# Minimal traffic models (bytes): each input read once, each output written once. s = bytes per element.

def _scan_bytes(g: Geometry, s: int, params: int) -> int:
    b, E, L, N = g.batch, g.d_inner, g.L, g.d_state
    return (3 * b * E * L * s            # read u, delta, z
            + 2 * b * N * L * s          # read B, C
            + (E * N + 2 * E) * 4        # read A, D, delta_bias (float32)
            + b * E * L * s)             # write y


def _scan_bidir_bytes(g: Geometry, s: int, params: int) -> int:
    b, E, L, N = g.batch, g.d_inner, g.L, g.d_state
    return (2 * 2 * b * E * L * s        # read u, delta of both directions
            + 2 * 2 * b * N * L * s      # read B, C of both directions
            + 2 * (E * N + 2 * E) * 4    # read A, D, delta_bias of both directions (float32)
            + b * E * L * s              # read the shared z
            + b * E * L * s)             # write y


def _attention_bytes(g: Geometry, s: int, params: int) -> int:
    qkv = g.batch * g.heads * g.L * g.head_dim * s
    return (3 * qkv                      # read q, k, v
            + qkv)                       # write out


def _layer_bytes(g: Geometry, s: int, params: int) -> int:
    act = g.batch * g.L * g.width * s
    return (act                          # read the tokens h
            + params * s                 # read every weight once
            + act)                       # write the output


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op: the model family whose widths run it, the backend kind that picks its impl
    ("scan" or "attn"), ``build(geometry, impl, device, dtype) -> Prepared`` and
    ``traffic(geometry, bytes per element, params) -> bytes`` (the minimal traffic model)."""
    name: str
    family: str
    backend: str
    build: Callable[..., Prepared]
    traffic: Callable[[Geometry, int, int], int]


OPS = {spec.name: spec for spec in (
    OpSpec("scan", "vim", "scan", _build_scan, _scan_bytes),
    OpSpec("scan_bidir", "vim", "scan", _build_scan_bidir, _scan_bidir_bytes),
    OpSpec("mixer_vim", "vim", "scan", _build_layer("scan"), _layer_bytes),
    OpSpec("attention", "deit", "attn", _build_attention, _attention_bytes),
    OpSpec("block_deit", "deit", "attn", _build_layer("attn"), _layer_bytes),
)}
FLOP_IMPL = {"scan": "ref", "attn": "eager"}
"""The backends FLOPs are counted with on the meta device (the count is the same for every backend)."""
ATTENTION_BWD_FACTOR = 2.5
"""Attention's backward FLOPs per forward FLOP (FlashAttention's convention: dV, dP, dQ, dK and the recomputed
Q K^T, five matmuls of the forward's two's size)."""


def _scan_bwd_cost(op: str, g: Geometry) -> int:
    """Backward FLOPs of the scans in one call of ``op`` (``scan_bwd_flops``, as Vim calls them: D, delta_bias,
    softplus): one direction with the gate for ``scan``, two directions and the shared gate's 8 per (b, e, t)
    for the pair (``scan_bidir``, and the pair inside ``mixer_vim``), none for attention ops."""
    if OPS[op].family != "vim":
        return 0
    one = functools.partial(scan_bwd_flops, g.batch, g.d_inner, g.L, g.d_state, has_D=True, has_delta_bias=True,
                            delta_softplus=True)
    if op == "scan":
        return one(has_z=True)
    return 2 * one(has_z=False) + 8 * g.batch * g.d_inner * g.L


def op_cost(op: str, g: Geometry, dtype: str, mode: str = "infer") -> dict:
    """{"flops_total": FLOPs of one call (the forward by FlopCounterMode on meta; in train mode plus the
    backward by convention, see the module docstring), "bytes": the minimal traffic model}."""
    spec, torch_dtype = OPS[op], DTYPES[dtype]
    prep = spec.build(g, FLOP_IMPL[spec.backend], torch.device("meta"), torch_dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = prep.run()
    flops, nbytes = counter.get_total_flops(), spec.traffic(g, torch_dtype.itemsize, prep.params)
    if mode == "infer":
        return {"flops_total": flops, "bytes": nbytes}
    by_kind = {"scan": 0, "attention": 0, "linear": 0, "other": 0}
    for name, n in counter.get_flop_counts()["Global"].items():
        by_kind[flop_category(name)] += n
    backward = 2 * by_kind["linear"] + ATTENTION_BWD_FACTOR * by_kind["attention"] + _scan_bwd_cost(op, g)
    out_bytes = out.numel() * out.element_size()
    return {"flops_total": int(flops + backward), "bytes": 3 * nbytes - out_bytes}


def kernel_name(op: str, impl: str, g: Geometry, device, dtype: torch.dtype) -> str:
    """What computes the op: the backend, or for sdpa the kernel SDPA picks (flash, efficient, cudnn or
    math; "flash" on CPU is its flash-style CPU kernel)."""
    if OPS[op].backend == "attn" and impl == "sdpa":
        return sdpa_kernel_used(device, dtype, g.L, g.head_dim, g.heads)
    return impl


def _time(run, device, timing: dict) -> dict:
    """time_ms (median), time_ms_p10, time_ms_p90 of ``run``: do_bench on a GPU; on CPU ``time_loop``
    with ``timing`` (warmup, repeats, min_time), plus the number of timed calls (repeats)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        med, p10, p90 = do_bench(run, quantiles=[0.5, 0.1, 0.9])
        return {"time_ms": float(med), "time_ms_p10": float(p10), "time_ms_p90": float(p90)}
    return time_stats(time_loop(run, device, timing["warmup"], timing["repeats"], timing["min_time"]))


def _forward_backward(prep: Prepared, forward: Callable) -> Callable[[], tuple]:
    """One train call of a prepared op: ``forward()`` then the gradients of every input tensor (its weights
    included) for a fixed random output gradient (made here, outside the timed region), returned by
    ``torch.autograd.grad`` rather than accumulated."""
    wrt = [t.requires_grad_() for t in prep.inputs]
    grad_out = torch.randn_like(prep.run())
    return lambda: torch.autograd.grad(forward(), wrt, grad_out)


def measure_op(cfg: dict) -> dict:
    """Times one configuration (run it through ``run_isolated``). ``cfg``: op, impl (a concrete backend),
    geometry (``Geometry`` as a dict), device ("cpu" | "cuda:N"), dtype (fp32 | fp16 | bf16), mode (infer: one
    forward under inference_mode; train: forward and backward, ``_forward_backward``), compile and
    amp (the regime, see the module docstring), threads (CPU threads, 0 = torch's default), timing (CPU:
    warmup, repeats, min_time). Returns kernel, time_ms, time_ms_p10, time_ms_p90, repeats (CPU),
    mem_peak_gib, threads, load_avg_1m, the ``precision()`` settings read before timing, and for a compiled op
    compile_s and graph_breaks."""
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    g = Geometry(**cfg["geometry"])
    setup_worker(device, cfg["threads"])
    compute = dtype if cfg["amp"] == "none" else DTYPES[cfg["amp"]]  # what the matmuls run in
    # outside inference_mode: under it the dispatcher shows SDPA's composite op, not the kernel it picks
    out = {"kernel": kernel_name(cfg["op"], cfg["impl"], g, device, compute), "threads": torch.get_num_threads(),
           "load_avg_1m": os.getloadavg()[0], **precision()}

    def call(fn):
        with autocast(device, cfg["amp"]):
            return fn()

    train = cfg.get("mode") == "train"
    with torch.inference_mode(not train):
        prep = OPS[cfg["op"]].build(g, cfg["impl"], device, dtype)
        op, compile_info = compiled(prep.run, cfg["compile"], call)  # before anything is timed
        out.update(compile_info)
        run = functools.partial(call, op) if not train else _forward_backward(prep, functools.partial(call, op))
        run()  # first call outside everything: compilation, autotuning, library handles
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            run()
            torch.cuda.synchronize(device)
            out["mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            out.update(_time(run, device, cfg["timing"]))
        else:
            out.update(_time(run, device, cfg["timing"]))
            peak = cpu_forward_peak(run)
            if peak is not None:
                out["mem_peak_gib"] = peak / GIB
    return out


CEILING_SIZES = {"cuda": dict(copy_bytes=2 ** 30, matmul_n=8192), "cpu": dict(copy_bytes=2 ** 28, matmul_n=2048)}


def measure_ceilings(cfg: dict) -> dict:
    """The device's measured ceilings (run it through ``run_isolated``; ``cfg``: device, dtype, threads,
    timing):
    ceiling_gbs = 2 * nbytes / time of copying a ``copy_bytes`` tensor (one read, one write);
    ceiling_gflops_s = 2 n^3 / time of an n x n matmul in the run's dtype (``CEILING_SIZES``).
    Both from the p10 time, not the median: other work on the host only ever slows a run down, and a
    ceiling is the best rate the device sustains. On CPU also ``exp_ceiling``'s cpu_capability and
    ceiling_exp_s (or exp_missing)."""
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    setup_worker(device, cfg["threads"])
    size = CEILING_SIZES[device.type]
    src = torch.randn(size["copy_bytes"] // dtype.itemsize, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    n = size["matmul_n"]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timing = {**cfg["timing"], "repeats": max(cfg["timing"]["repeats"], 10)}
    copy_ms = _time(lambda: dst.copy_(src), device, timing)["time_ms_p10"]
    matmul_ms = _time(lambda: a @ b, device, timing)["time_ms_p10"]
    out = {"ceiling_gbs": 2 * src.numel() * dtype.itemsize / (copy_ms * 1e-3) / 1e9,
           "ceiling_gflops_s": 2 * n ** 3 / (matmul_ms * 1e-3) / 1e9}
    return out | (exp_ceiling() if device.type == "cpu" else {})


EXP_TRIALS = 5


def exp_ceiling() -> dict:
    """On CPU: cpu_capability (the ATen capability the compiled kernels target, ``compiled_cpu.cpu_capability``)
    and ceiling_exp_s, the best of ``EXP_TRIALS`` measurements of ``compiled_cpu.exp_floor_rate`` (exp/s over the
    threads torch uses); without the compiled kernels, exp_missing (why) instead of the rate."""
    ok, why = compiled_cpu.available()
    if not ok:
        return {"cpu_capability": compiled_cpu.cpu_capability(), "exp_missing": why}
    return {"cpu_capability": compiled_cpu.cpu_capability(),
            "ceiling_exp_s": max(compiled_cpu.exp_floor_rate() for _ in range(EXP_TRIALS))}



def run_check(impl: str, device, grads: bool = False) -> dict:
    """``check.check_named_backend`` of scan backend ``impl`` on ``device`` in a worker, bounded by
    ``plugins.time_limit("check")``. A worker that raised (``SystemExit`` and ``KeyboardInterrupt`` too), died
    (``os.abort``, a segfault) or ran past the limit (then killed) gives check_ok False and a check_failure
    naming the backend, its package and what happened, in one line."""
    result = run_isolated(check_named_backend, (impl, str(device), grads), timeout=time_limit("check"))
    if result.pop("status") == "ok":
        return result
    return {"checked": 0, "check_ok": False, "check_worst": float("nan"),
            "check_failure": f"{describe(impl)}: {worker_failure('check', result['error'])}"}


def check_scans(scans: list[str], device, log, grads: bool = False) -> dict[str, str]:
    """Correctness before speed: each scan backend in ``scans`` but the reference checked against it on
    ``device`` (``run_check``: in a worker, with a time limit) before any timing. Returns {backend: why} for those
    that failed (the first failing case: its shape, dtype and worst error), which then get no timing;
    ``log`` gets one line per backend that passed.
    With ``grads`` (before train timing) the gradients too (``check.check_backward``): a backend also fails
    when it is forward-only (why: ``backends.forward_only``'s line) or its gradients are wrong (why starts
    "gradient check failed"); a forward failure's why starts "correctness check failed" either way, so the
    backends unfit for inference are those."""
    failed = {}
    for impl in scans:
        if impl == "ref":
            continue
        result = run_check(impl, device, grads)
        if not result["check_ok"]:
            failed[impl] = f"correctness check failed: {result['check_failure']}"
        elif grads and result["forward_only"]:
            failed[impl] = result["forward_only"]
        elif grads and not result["grad_ok"]:
            failed[impl] = f"gradient check failed: {result['grad_failure']}"
        else:
            log(f"{impl}: correct on {result['checked']} cases against the reference"
                + (f", its gradients on {result['grad_checked']}" if grads else ""))
    return failed


def preamble(cfg: dict) -> dict:
    """What a kernels sweep needs before any timing, run once where its configurations run (a launcher's
    ``run_job``): the correctness of each scan backend in ``cfg["scans"]`` (``check_scans``) and the device's
    ceilings (``measure_ceilings``), each in its own worker. ``cfg``: scans, device, dtype, threads, timing, and
    grads (a sweep with train rows: the gradients are checked too, ``check_scans(grads=True)``).
    Returns plain data: passed (one line per backend that passed), failed ({backend: why}), ceilings
    ({ceiling_gbs, ceiling_gflops_s}; {} when measuring them failed) and warning ("" or why they are missing)."""
    passed = []
    failed = check_scans(cfg["scans"], cfg["device"], passed.append, grads=cfg.get("grads", False))
    ceilings = run_isolated(measure_ceilings, (cfg,))
    if ceilings.pop("status") != "ok":
        return {"passed": passed, "failed": failed, "ceilings": {},
                "warning": f"measuring the device ceilings failed ({ceilings['error']}); frac_peak_* and "
                           f"the floors left empty"}
    missing = ceilings.pop("exp_missing", "")
    warning = f"no exp rate ({missing}): the scan rows' floors leave out their exps" if missing else ""
    return {"passed": passed, "failed": failed, "ceilings": ceilings, "warning": warning}


def preamble_result(row: dict, scans: list[str]) -> dict:
    """``preamble``'s result from the row its job returned. A job that ended without one (an error row:
    failed, pre-empted, timed out) checked nothing: every scan backend in ``scans`` but ref then counts as
    failed (no timing without a passed check) and the ceilings as missing."""
    if row.get("status") != "error":
        return row
    why = f"the preamble job failed ({row['error']})"
    return {"passed": [], "failed": {s: f"correctness not checked: {why}" for s in scans if s != "ref"},
            "ceilings": {}, "warning": f"{why}; frac_peak_* and the floors left empty"}


CONFIG_TIMEOUT_S = 1800
CPU_TIMING = dict(warmup=0, repeats=3, min_time=0.5)
"""CPU timing defaults: after one untimed call, at least 3 timed calls and 0.5 s of them (a full default
sweep then takes a few minutes on 2 cores). GPUs use do_bench's own warm-up and repetitions."""


SCAN_DIRECTIONS = {"scan": 1, "scan_bidir": 2, "mixer_vim": 2}
"""Selective-scan directions in one call of each op that runs scans."""


def op_exps(op: str, g: Geometry, mode: str) -> int:
    """exp(delta * A) evaluations one call of ``op`` needs: one per (b, e, t, n) and scan direction
    (``SCAN_DIRECTIONS``), twice that in train mode (the backward needs each again: the compiled and the
    Triton backwards recompute them); 0 for the attention ops, whose floor is their matmuls' and bytes'."""
    once = SCAN_DIRECTIONS.get(op, 0) * g.batch * g.d_inner * g.L * g.d_state
    return once * (2 if mode == "train" else 1)


def floor(row: dict) -> dict:
    """The floor of an ok row: floor_ms, the largest of the lower bounds its measured ceilings give
    (flops_total / ceiling_gflops_s, not under amp; bytes / ceiling_gbs; exps / ceiling_exp_s), floor_kind
    naming it (flops, bytes or exp) and frac_floor = floor_ms / time_ms; {} without any ceiling."""
    bounds = {}
    if row.get("ceiling_gflops_s") and row["amp"] == "none":  # the matmul ceiling is measured in dtype
        bounds["flops"] = row["flops_total"] / (row["ceiling_gflops_s"] * 1e9)
    if row.get("ceiling_gbs"):
        bounds["bytes"] = row["bytes"] / (row["ceiling_gbs"] * 1e9)
    if row.get("ceiling_exp_s") and row.get("exps"):
        bounds["exp"] = row["exps"] / row["ceiling_exp_s"]
    if not bounds:
        return {}
    kind = max(bounds, key=bounds.get)
    return {"floor_ms": bounds[kind] * 1e3, "floor_kind": kind, "frac_floor": bounds[kind] * 1e3 / row["time_ms"]}


def _rates(row: dict) -> dict:
    """Achieved GFLOP/s and GB/s of an ok row, their fractions of the measured ceilings, and its ``floor``."""
    seconds = row["time_ms"] * 1e-3
    out = {"gflops_s": row["flops_total"] / seconds / 1e9, "gbs": row["bytes"] / seconds / 1e9}
    if row.get("ceiling_gbs"):
        out["frac_peak_bw"] = out["gbs"] / row["ceiling_gbs"]
    if row.get("ceiling_gflops_s") and row["amp"] == "none":  # the matmul ceiling is measured in dtype
        out["frac_peak_flops"] = out["gflops_s"] / row["ceiling_gflops_s"]
    return out | floor(row)


def kernel_row(cfg: dict, fixed: dict) -> dict:
    """One row of a kernels CSV: ``measure_op`` in its own worker, plus sizes, FLOPs, bytes, rates and
    ``fixed`` (environment, ceilings, command). ``cfg``: as ``measure_op`` takes it, plus model and res."""
    g = cfg["geometry"]
    row = {k: cfg[k] for k in ("op", "impl", "model", "res", "batch", "dtype", "mode", "compile", "amp", "device")}
    row.update({k: g[k] or "" for k in ("width", "heads", "head_dim", "d_inner", "d_state")}, tokens=g["L"],
               kernel=cfg["impl"], **fixed, **op_cost(cfg["op"], Geometry(**g), cfg["dtype"], cfg["mode"]),
               exps=op_exps(cfg["op"], Geometry(**g), cfg["mode"]),
               timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    row.update(run_isolated(measure_op, (cfg,), timeout=CONFIG_TIMEOUT_S))
    if row["status"] == "ok":
        row.update(_rates(row))
    return row


def op_configs(models: list[str], res_list: list[int], impls: dict, batch: int, dtype: str, device, threads: int,
               timing: dict, regimes: list[tuple[str, str]] = (("none", "none"),),
               modes: list[str] = ("infer",)) -> list[dict]:
    """Every (resolution, model, op, backend, mode, regime) configuration, in that order: each model runs the
    ops of its family (``OpSpec.family``) with each backend of the op's kind in ``impls`` ({"scan": [...],
    "attn": [...]}), in each of ``modes`` (infer, train) and each (compile, amp) of ``regimes``."""
    configs = []
    for res in res_list:
        for model in models:
            geometry = model_geometry(model, res, batch)
            family = "vim" if geometry.d_inner else "deit"
            for spec in OPS.values():
                if spec.family == family:
                    configs += [dict(op=spec.name, impl=impl, model=model, res=res, batch=batch, dtype=dtype,
                                     mode=mode, compile=compile_mode, amp=amp, device=str(device),
                                     geometry=dataclasses.asdict(geometry), threads=threads, timing=timing)
                                for impl in impls[spec.backend] for mode in modes for compile_mode, amp in regimes]
    return configs
