"""The kernel ops as data: one ``OpSpec`` per op in ``OPS``, and what each call of one costs, counted without
timing (FLOPs on the meta device, minimal bytes, exps).

Shapes: b batch, L tokens (cls included, the model's own count at a resolution), D the model's embed dim
("width"), E = 2D scan channels, N d_state, H heads, d head_dim, s bytes per element of the run's dtype.
Ops (inputs are built by ``OpSpec.build``, outside any timed region):
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
Layout per backend: the scan's (b, channels, L) inputs are built in the layout the backend reads (``scan_input``):
time-major memory, as the Vim mixer produces it, for the backends whose record reads any strides (``strided``),
contiguous for the others, so that each backend is timed at its best and none pays a layout copy in the timed
region. Values: Vim's initialisation (A = -[1..N] per channel, D = 1, softplus(delta_bias) = 0.01), normal inputs.

FLOPs (``op_cost``): one call counted with FlopCounterMode on the meta device, the project's convention (2 per
multiply-add for matmuls and convolutions; the scan by ``scan_flops``'s registered formula; softmax and
other elementwise work outside the scan uncounted). FLOPs do not depend on the backend, so they are counted
with the reference backends (``FLOP_IMPL``).
Bytes: the minimal traffic, every input read once and every output written once (``OpSpec.traffic``);
what a kernel moves beyond it (the scan's (b, E, L, N) state, eager attention's (b, H, L, L) scores,
re-reads) is its excess over this ideal.
Mode train: one call is the op's forward and the backward of its output for a fixed random output gradient,
with gradients for every input tensor (the scan's u, delta, A, B, C, D, z and delta_bias; q, k, v; the
tokens) and, for mixer_vim and block_deit, every weight. FLOPs: the forward's (as above) plus the backward by
convention per kind: a matmul's or convolution's 2x its forward (grad input and grad weight), attention's 2.5x
(FlashAttention's convention, its backward recomputing Q K^T: ``ATTENTION_BWD_FACTOR``), the scans' by
``OpSpec.scan_bwd`` (``scan_bwd_flops`` per direction, and the shared gate's 8 per (b, e, t) for Vim's pair).
Bytes: the forward's minimal traffic (inputs + output) plus the backward's, which reads every input once more
and the output's gradient and writes every input's gradient (2 x inputs + output): 3 x inputs + 2 x output in
all. What a backward moves beyond it (the output and logsumexp fused attention re-reads, the probabilities
eager attention saved, the scan's recomputed states) is its excess.
Exps (``op_exps``): the exp(delta * A) evaluations of one call, one per (b, e, t, n) and scan direction
(``OpSpec.directions``), twice that in train mode (the compiled and the Triton backwards recompute them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from vimbench.count.flops import flop_category
from vimbench.kernels.attention import attention
from vimbench.kernels.selective_scan import bidirectional_scan, selective_scan
from vimbench.kernels.selective_scan.backends import record
from vimbench.kernels.selective_scan.ops import scan_bwd_flops
from vimbench.measure.core import DTYPES
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


def scan_input(b: int, channels: int, L: int, impl: str, device, dtype) -> torch.Tensor:
    """A random (b, channels, L) scan input laid out as backend ``impl`` reads it: time-major memory (the
    transpose of a contiguous (b, L, channels) tensor, as the Vim mixer produces) for a backend whose record
    reads any strides (``ScanBackend.strided``), contiguous (b, channels, L) for the others."""
    if record(impl).strided:
        return torch.randn(b, L, channels, device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(b, channels, L, device=device, dtype=dtype)


def _direction(g: Geometry, impl: str, device, dtype) -> dict:
    """One scan direction's inputs (see the module docstring), as keyword arguments of ``selective_scan``."""
    b, E, L, N = g.batch, g.d_inner, g.L, g.d_state
    f32 = dict(device=device, dtype=torch.float32)
    return dict(u=scan_input(b, E, L, impl, device, dtype), delta=scan_input(b, E, L, impl, device, dtype),
                A=-torch.arange(1, N + 1, **f32).repeat(E, 1),
                B=scan_input(b, N, L, impl, device, dtype), C=scan_input(b, N, L, impl, device, dtype),
                D=torch.ones(E, **f32),
                delta_bias=torch.full((E,), math.log(math.expm1(0.01)), **f32))


def _build_scan(g: Geometry, impl: str, device, dtype) -> Prepared:
    d = _direction(g, impl, device, dtype)
    z = scan_input(g.batch, g.d_inner, g.L, impl, device, dtype)
    return Prepared(lambda: selective_scan(**d, z=z, delta_softplus=True, backend=impl), [*d.values(), z])


def _build_scan_bidir(g: Geometry, impl: str, device, dtype) -> Prepared:
    f, bk = _direction(g, impl, device, dtype), _direction(g, impl, device, dtype)
    z = scan_input(g.batch, g.d_inner, g.L, impl, device, dtype)
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


# Backward FLOPs of the scans in one call (``scan_bwd_flops``, as Vim calls them: D, delta_bias, softplus).

def _scan_direction_bwd(g: Geometry, has_z: bool) -> int:
    return scan_bwd_flops(g.batch, g.d_inner, g.L, g.d_state, has_D=True, has_z=has_z, has_delta_bias=True,
                          delta_softplus=True)


def _gated_scan_bwd(g: Geometry) -> int:
    """One direction with the gate (``scan``)."""
    return _scan_direction_bwd(g, has_z=True)


def _pair_bwd(g: Geometry) -> int:
    """Vim's pair (``scan_bidir``, and the pair inside ``mixer_vim``): two directions without the gate, and the
    shared gate's 8 per (b, e, t)."""
    return 2 * _scan_direction_bwd(g, has_z=False) + 8 * g.batch * g.d_inner * g.L


def _no_scan_bwd(g: Geometry) -> int:
    return 0


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op: the model family whose widths run it, the backend kind that picks its impl
    ("scan" or "attn"), ``build(geometry, impl, device, dtype) -> Prepared`` (its inputs, laid out as ``impl``
    reads them), ``traffic(geometry, bytes per element, params) -> bytes`` (the minimal traffic model),
    ``scan_bwd(geometry) -> FLOPs`` (the backward of its scans, by formula) and ``directions`` (selective-scan
    directions per call: exps per (b, e, t, n) of a forward)."""
    name: str
    family: str
    backend: str
    build: Callable[..., Prepared]
    traffic: Callable[[Geometry, int, int], int]
    scan_bwd: Callable[[Geometry], int]
    directions: int


OPS = {spec.name: spec for spec in (
    OpSpec("scan", "vim", "scan", _build_scan, _scan_bytes, _gated_scan_bwd, 1),
    OpSpec("scan_bidir", "vim", "scan", _build_scan_bidir, _scan_bidir_bytes, _pair_bwd, 2),
    OpSpec("mixer_vim", "vim", "scan", _build_layer("scan"), _layer_bytes, _pair_bwd, 2),
    OpSpec("attention", "deit", "attn", _build_attention, _attention_bytes, _no_scan_bwd, 0),
    OpSpec("block_deit", "deit", "attn", _build_layer("attn"), _layer_bytes, _no_scan_bwd, 0),
)}
FLOP_IMPL = {"scan": "ref", "attn": "eager"}
"""The backends FLOPs are counted with on the meta device (the count is the same for every backend)."""
ATTENTION_BWD_FACTOR = 2.5
"""Attention's backward FLOPs per forward FLOP (FlashAttention's convention: dV, dP, dQ, dK and the recomputed
Q K^T, five matmuls of the forward's two's size)."""


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
    backward = 2 * by_kind["linear"] + ATTENTION_BWD_FACTOR * by_kind["attention"] + spec.scan_bwd(g)
    out_bytes = out.numel() * out.element_size()
    return {"flops_total": int(flops + backward), "bytes": 3 * nbytes - out_bytes}


def op_exps(op: str, g: Geometry, mode: str) -> int:
    """exp(delta * A) evaluations one call of ``op`` needs: one per (b, e, t, n) and scan direction
    (``OpSpec.directions``), twice that in train mode (the backward needs each again); 0 for the attention
    ops, whose floor is their matmuls' and bytes'."""
    once = OPS[op].directions * g.batch * g.d_inner * g.L * g.d_state
    return once * (2 if mode == "train" else 1)
