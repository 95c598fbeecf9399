"""The selective scan: one public entry point, several backends, a torch custom op, and a FLOP formula.

Public API (shapes use the legend of ``scan_ref``: b batch, E channels, L length, N state, G groups):

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto")
    bidirectional_scan(...)   both directions of one Vim mixer layer, see its docstring

Backends (``SCAN_BACKENDS``):
    ref        sequential loop (scan_ref.py), the correctness oracle; any device
    cpu        chunked pure PyTorch (scan_cpu.py), the fast path on CPU; any device
    triton     our fused Triton kernel (scan_triton.py); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    mamba_ssm  mamba_ssm's CUDA kernel, when that package imports; CUDA tensors
    auto       resolved per device by ``resolve_scan_backend``; callers record the resolved name
No backend ever falls back to another: an unavailable one raises ``BackendUnavailable`` naming why.

Both entry points run through the custom ops ``torch.ops.vimbench.selective_scan`` and
``torch.ops.vimbench.bidirectional_scan``, which have fake implementations (for the meta device and
FakeTensorMode) and FLOP formulas for ``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .scan_cpu import selective_scan_cpu
from .scan_ref import compute_dtype, expand_groups, finish_output, prepare_delta, selective_scan_ref

SCAN_BACKENDS = ("ref", "cpu", "triton", "mamba_ssm")
SCAN_CHOICES = SCAN_BACKENDS + ("auto",)


class BackendUnavailable(RuntimeError):
    """A requested scan or attention backend cannot run here; the message says why."""


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_scan_backend(backend: str, device: torch.device | str) -> None:
    """Raises ``BackendUnavailable`` (or ValueError for an unknown name) if ``backend`` can't run on ``device``."""
    device = torch.device(device)
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose from {', '.join(SCAN_CHOICES)}")
    if backend == "triton":
        if not _importable("triton"):
            raise BackendUnavailable("scan backend 'triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpret()):
            raise BackendUnavailable(
                f"scan backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}")
    if backend == "mamba_ssm":
        if not _importable("mamba_ssm"):
            raise BackendUnavailable("scan backend 'mamba_ssm' needs the mamba_ssm package, which is not installed")
        if device.type != "cuda":
            raise BackendUnavailable(f"scan backend 'mamba_ssm' needs CUDA tensors, got {device.type}")


def resolve_scan_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend that ``backend`` means on ``device``: 'auto' picks the fastest available
    (CUDA: mamba_ssm, else triton, else cpu; elsewhere: cpu). Checks availability either way."""
    device = torch.device(device)
    if backend == "auto":
        backend = "cpu"
        if device.type == "cuda":
            backend = next((name for name in ("mamba_ssm", "triton") if _importable(name)), "cpu")
    check_scan_backend(backend, device)
    return backend


def _mamba_ssm_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _triton_scan(*args, **kwargs):
    from .scan_triton import selective_scan_triton
    return selective_scan_triton(*args, **kwargs)


_IMPLS = {"ref": selective_scan_ref, "cpu": selective_scan_cpu, "triton": _triton_scan,
          "mamba_ssm": _mamba_ssm_scan}


# ----------------------------------------------------------------------------------------------------
# Custom ops: what the models call, so that FLOP counters and fake-tensor memory tracking see the scan.
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("vimbench::selective_scan", mutates_args=())
def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
             backend: str) -> tuple[Tensor, Tensor]:
    out, last = _IMPLS[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
    return out, last


# Fake implementations allocate what each backend allocates on a GPU, so that a storage tracker sees it
# (vimbench.memory runs them inside its tracker): the outputs, plus temporaries allocated and freed at the
# backend's peak. Shapes: b, E, L from u, N from A, T = min(scan_cpu.CHUNK, L).

def _ref_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """scan_ref: prepare_delta's copies, h and dA (b, E, N), the three (b, E, N) temporaries of the last
    step, the L per-step outputs y_t (b, E) (one buffer here: the same bytes when b*E*4 is a multiple of
    512, as for every Vim model), torch.stack's (b, E, L), then finish_output's temporaries."""
    dt = compute_dtype(u)
    b, E, L = u.shape
    delta = prepare_delta(delta, delta_bias, delta_softplus, dt)
    uf, Bf, Cf = u.to(dt), expand_groups(B.to(dt), E), expand_groups(C.to(dt), E)  # noqa: F841  (held, as in the loop)
    h, dA = u.new_zeros(b, E, A.shape[1], dtype=dt), u.new_empty(b, E, A.shape[1], dtype=dt)  # noqa: F841
    ys = u.new_empty(max(L - 1, 0), b, E, dtype=dt)  # noqa: F841  (held to the end, as the loop holds them)
    step = [torch.empty_like(h) for _ in range(3)]   # dA*h, dBu, their sum
    del step
    ys_last = u.new_empty(b, E, dtype=dt)  # noqa: F841  (the last y_t, alive until the end like ys)
    y = u.new_empty(b, E, L, dtype=dt)
    out = finish_output(y, u, D, z, dt)
    return (out, h) if return_last_state else out


def _cpu_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """scan_cpu itself: on fake tensors it allocates exactly what it allocates for real (it skips only its
    step loop, which allocates nothing)."""
    return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _mamba_ssm_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False):
    """mamba_ssm's selective_scan_cuda.fwd: out (b, E, L), the chunk states x (b, E, ceil(L/2048), 2N)
    float32 (the last state is a view of it), and out_z (b, E, L) when z is given (then out is dropped)."""
    b, E, L = u.shape
    out = torch.empty_like(u)
    x = u.new_empty(b, E, max(1, -(-L // 2048)), 2 * A.shape[1], dtype=compute_dtype(u))
    if z is not None:
        out = torch.empty_like(z)
    return (out, x[:, :, -1, 1::2]) if return_last_state else out


def _triton_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False):
    """scan_triton (fused): the (N, E) copy of A, out, and the last state (b, E, N) float32."""
    A_t = A.t().contiguous()
    out = torch.empty_like(u)
    del A_t
    last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=compute_dtype(u))
    return (out, last) if return_last_state else out


_FAKES = {"ref": _ref_fake, "cpu": _cpu_fake, "triton": _triton_fake, "mamba_ssm": _mamba_ssm_fake}


@_scan_op.register_fake
def selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    """The fake implementation of ``vimbench::selective_scan``: ``backend``'s allocations (see above)."""
    return _FAKES[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)


def bidirectional_scan_ref(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z=None,
                           delta_bias=None, delta_bias_b=None, delta_softplus=True, scan=selective_scan_ref):
    """Both directions of a Vim mixer layer, the obvious way: the second by flipping along L.

    Returns (y_f + y_b) * silu(z) of shape (b, E, L) in u's dtype, where y_f scans
    (u, delta, A, B, C, D) from t=0 to L-1 and y_b scans (u_b, delta_b, A_b, B_b, C_b, D_b) from t=L-1
    down to 0. All inputs are in original (unflipped) order; shapes as in ``selective_scan``.
    ``scan`` is the one-direction implementation used for both.
    """
    y_f = scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    y_b = scan(u_b.flip(-1), delta_b.flip(-1), A_b, B_b.flip(-1), C_b.flip(-1), D_b, None,
               delta_bias_b, delta_softplus).flip(-1)
    dt = compute_dtype(u)
    y = y_f.to(dt) + y_b.to(dt)
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(dt))
    return y.to(u.dtype)


@torch.library.custom_op("vimbench::bidirectional_scan", mutates_args=())
def _bidir_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_bias_b: Optional[Tensor],
              delta_softplus: bool, backend: str) -> Tensor:
    if backend == "triton":
        from .scan_triton import bidirectional_scan_triton
        return bidirectional_scan_triton(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z,
                                         delta_bias, delta_bias_b, delta_softplus)
    return bidirectional_scan_ref(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                                  delta_bias_b, delta_softplus, scan=_IMPLS[backend])


@_bidir_op.register_fake
def bidirectional_scan_fake(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                            delta_softplus, backend):
    """The fake implementation of ``vimbench::bidirectional_scan``: triton runs both directions in one
    kernel (the two (N, E) copies of A, then out); the other backends go through
    ``bidirectional_scan_ref`` (flipped copies, two outputs, the sum and the gate) with their one-direction
    allocations."""
    if backend == "triton":
        A_t = (A.t().contiguous(), A_b.t().contiguous())
        out = torch.empty_like(u)
        del A_t
        return out
    return bidirectional_scan_ref(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                                  delta_bias_b, delta_softplus, scan=_FAKES[backend])


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------

SCAN_FLOPS_PER_STATE = 7
"""FLOPs per (b, e, t, n) of the recurrence: delta*A (1), exp (1), dA*h (1), + dBu (1), (delta*u)*B (1),
C*h (1) and the accumulation over n (1). exp and other elementwise functions count as 1 FLOP each."""


def scan_flops(b: int, E: int, L: int, N: int, *, has_D: bool, has_z: bool, has_delta_bias: bool,
               delta_softplus: bool) -> int:
    """FLOPs of one direction of the selective scan (convention: 1 per add, mul or elementwise function).

    Per (b, e, t): delta*u (1), the bias add (1), softplus (1), D*u + y (2), and the gate y*silu(z), where
    silu(z) = z*sigmoid(z) (3). Per (b, e, t, n): ``SCAN_FLOPS_PER_STATE``.
    """
    per_step = 1 + has_delta_bias + delta_softplus + 2 * has_D + 3 * has_z
    return b * E * L * (SCAN_FLOPS_PER_STATE * N + per_step)


@register_flop_formula(torch.ops.vimbench.selective_scan)
def _scan_flop_formula(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend, out_shape=None, **kw):
    b, E, L = u
    return scan_flops(b, E, L, A[1], has_D=D is not None, has_z=z is not None,
                      has_delta_bias=delta_bias is not None, delta_softplus=delta_softplus)


@register_flop_formula(torch.ops.vimbench.bidirectional_scan)
def _bidir_flop_formula(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                        delta_softplus, backend, out_shape=None, **kw):
    b, E, L = u
    one = functools.partial(scan_flops, b, E, L, A[1], has_z=False, delta_softplus=delta_softplus)
    # the two directions, then y_f + y_b (1) and the shared gate (3) per (b, e, t)
    return (one(has_D=D is not None, has_delta_bias=delta_bias is not None)
            + one(has_D=D_b is not None, has_delta_bias=delta_bias_b is not None)
            + b * E * L * (1 + 3 * (z is not None)))


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------

def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, E, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    b, E, L = u.shape
    if A.dim() != 2 or A.shape[0] != E:
        raise ValueError(f"A must be (E={E}, N); got {tuple(A.shape)}")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = (M.dim() == 3 and tuple(M.shape) == (b, N, L)) or \
             (M.dim() == 4 and M.shape[0] == b and M.shape[2:] == (N, L) and E % M.shape[1] == 0)
        if not ok:
            raise ValueError(f"{name} must be (batch, N, L) or (batch, G, N, L) with G dividing E; "
                             f"got {tuple(M.shape)} for u {tuple(u.shape)}, N={N}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (E,):
            raise ValueError(f"{name} must be (E={E},); got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}; got {tuple(z.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    """Selective scan with mamba_ssm's ``selective_scan_fn`` semantics (see ``scan_ref``).

    u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L) or (b, G, N, L); D, delta_bias: (E,).
    Math in float32 (float64 stays float64); returns out (b, E, L) in u's dtype, and with
    ``return_last_state`` also the final state (b, E, N). ``backend``: one of ``SCAN_CHOICES``.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    out, last = _scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                         resolve_scan_backend(backend, u.device))
    return (out, last) if return_last_state else out


def bidirectional_scan(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z=None, delta_bias=None,
                       delta_bias_b=None, delta_softplus=True, backend="auto"):
    """Both scans of a Vim mixer layer; same semantics as ``bidirectional_scan_ref``.

    Forward direction inputs (u, delta, A, B, C, D, delta_bias) and backward direction inputs
    (u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b) are all in original token order, shapes as in
    ``selective_scan``; the backward scan runs from t=L-1 to 0. Returns (y_f + y_b) * silu(z), (b, E, L).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    _check_shapes(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b)
    return _bidir_op(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                     delta_softplus, resolve_scan_backend(backend, u.device))
