"""The selective scan as torch custom ops, so that FLOP counters and fake-tensor memory tracking see it.

``torch.ops.vimbench.selective_scan`` and ``torch.ops.vimbench.bidirectional_scan`` take the backend name
as an argument; their fake implementations allocate what that backend allocates on a GPU (for
``vimbench.count.memory``), and their FLOP formulas follow ``scan_flops`` (for ``vimbench.count.flops``).
The ``cpp`` backend is not behind these ops: the entry points call its compiled ops directly, and the end of
this file registers their fakes and the same FLOP formulas on them, and their autograd (the compiled backward
ops, with their own fakes and ``scan_bwd_flops``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.kernels.selective_scan.backends import IMPLS, PLUGINS, TRITON_DESIGNS
from vimbench.kernels.selective_scan.chunked import selective_scan_cpu
from vimbench.kernels.selective_scan.ref import (bidirectional_scan_ref, compute_dtype, expand_groups,
                                                 finish_output, prepare_delta)

@torch.library.custom_op("vimbench::selective_scan", mutates_args=())
def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
             backend: str) -> tuple[Tensor, Tensor]:
    out, last = IMPLS[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
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


def _outputs_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  return_last_state=False):
    """The outputs alone, for a plug-in that registered no fake: shapes for FLOP counting on the meta device.
    Memory prediction refuses such a backend (``has_memory_model``) instead of trusting this."""
    out = torch.empty_like(u)
    last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=compute_dtype(u))
    return (out, last) if return_last_state else out


_FAKES = {"ref": _ref_fake, "cpu": _cpu_fake, "triton": _triton_fake, "triton_pipelined": _triton_fake,
          "mamba_ssm": _mamba_ssm_fake}
"""The fakes of the backends that run through these ops (``cpp`` calls its compiled ops directly: their fakes
are at the end of this file)."""


def _fake(backend: str):
    """``backend``'s fake: a built-in's above, or a plug-in's own (``_outputs_fake`` when it has none)."""
    return _FAKES.get(backend) or PLUGINS[backend].fake or _outputs_fake


def has_memory_model(backend: str) -> bool:
    """Whether fake tensors see what ``backend`` allocates on a GPU: every built-in with a CUDA implementation,
    and a plug-in with a fake."""
    return backend in _FAKES or (backend in PLUGINS and PLUGINS[backend].fake is not None)


@_scan_op.register_fake
def selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    """The fake implementation of ``vimbench::selective_scan``: ``backend``'s allocations (see above)."""
    return _fake(backend)(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)

@torch.library.custom_op("vimbench::bidirectional_scan", mutates_args=())
def _bidir_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_bias_b: Optional[Tensor],
              delta_softplus: bool, backend: str) -> Tensor:
    if backend in TRITON_DESIGNS:
        from vimbench.kernels.selective_scan.triton_kernel import bidirectional_scan_triton
        return bidirectional_scan_triton(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z,
                                         delta_bias, delta_bias_b, delta_softplus, design=backend)
    return bidirectional_scan_ref(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                                  delta_bias_b, delta_softplus, scan=IMPLS[backend])


@_bidir_op.register_fake
def bidirectional_scan_fake(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                            delta_softplus, backend):
    """The fake implementation of ``vimbench::bidirectional_scan``: triton runs both directions in one
    kernel (the two (N, E) copies of A, then out); the other backends go through ``bidirectional_scan_ref``
    (flipped copies, two outputs, the sum and the gate) with their one-direction allocations."""
    if backend in TRITON_DESIGNS:
        A_t = (A.t().contiguous(), A_b.t().contiguous())
        out = torch.empty_like(u)
        del A_t
        return out
    return bidirectional_scan_ref(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                                  delta_bias_b, delta_softplus, scan=_fake(backend))


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


SCAN_BWD_FLOPS_PER_STATE = 20
"""FLOPs per (b, e, t, n) of the recurrence's backward (convention of ``SCAN_FLOPS_PER_STATE``): recomputing the
forward state from a checkpoint, delta*A (1), exp (1), dA*h (1), + dBu (1), (delta*u)*B (1); then in reverse
dh_t = dA_{t+1}*dh_{t+1} + C_t*dy_t (3), dC_t += h_t*dy_t (2), dB_t += dh_t*(delta_t*u_t) (2),
g = dh_t*h_{t-1}*dA_t, the gradient of delta*A (2), dA += g*delta_t (2), ddelta_t += g*A (2) and
d(delta*u)_t += dh_t*B_t (2)."""


def scan_bwd_flops(b: int, E: int, L: int, N: int, *, has_D: bool, has_z: bool, has_delta_bias: bool,
                   delta_softplus: bool) -> int:
    """FLOPs of the backward of one direction of the selective scan (same convention as ``scan_flops``).

    Per (b, e, t): d(delta*u) into du and ddelta (4); the skip's dD += dy*u and du += D*dy (4); the gate,
    dy = dout*silu(z) and dz = dout*y*silu'(z) with silu recomputed (8); softplus' derivative, a sigmoid and
    a product (3); the bias gradient's sum (1). Per (b, e, t, n): ``SCAN_BWD_FLOPS_PER_STATE``.
    """
    per_step = 4 + 4 * has_D + 8 * has_z + 3 * delta_softplus + has_delta_bias
    return b * E * L * (SCAN_BWD_FLOPS_PER_STATE * N + per_step)


def _scan_flop_formula(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend, out_shape=None, **kw):
    """FLOPs of one scan call from its argument shapes (registered below, on this op and on the compiled scan's)."""
    b, E, L = u
    return scan_flops(b, E, L, A[1], has_D=D is not None, has_z=z is not None,
                      has_delta_bias=delta_bias is not None, delta_softplus=delta_softplus)


def _bidir_flop_formula(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                        delta_softplus, backend, out_shape=None, **kw):
    """FLOPs of one bidirectional call from its argument shapes (registered as the one-direction formula)."""
    b, E, L = u
    one = functools.partial(scan_flops, b, E, L, A[1], has_z=False, delta_softplus=delta_softplus)
    # the two directions, then y_f + y_b (1) and the shared gate (3) per (b, e, t)
    return (one(has_D=D is not None, has_delta_bias=delta_bias is not None)
            + one(has_D=D_b is not None, has_delta_bias=delta_bias_b is not None)
            + b * E * L * (1 + 3 * (z is not None)))


register_flop_formula(torch.ops.vimbench.selective_scan)(_scan_flop_formula)
register_flop_formula(torch.ops.vimbench.bidirectional_scan)(_bidir_flop_formula)


def _scan_bwd_flop_formula(u, delta, A, B, C, D, z, delta_bias, dout, dlast, delta_softplus, out_shape=None, **kw):
    """FLOPs of one compiled scan backward (``vimbench_cpu::selective_scan_bwd``) from its argument shapes."""
    b, E, L = u
    return scan_bwd_flops(b, E, L, A[1], has_D=D is not None, has_z=z is not None,
                          has_delta_bias=delta_bias is not None, delta_softplus=delta_softplus)


def _bidir_bwd_flop_formula(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                            dout, delta_softplus, out_shape=None, **kw):
    """FLOPs of one compiled bidirectional backward (``vimbench_cpu::bidirectional_scan_bwd``): the two
    directions' backwards without their gates, then per (b, e, t) the shared gate's dy and dz (8, as in
    ``scan_bwd_flops``) and the sum y_f + y_b that dz needs (1)."""
    b, E, L = u
    one = functools.partial(scan_bwd_flops, b, E, L, A[1], has_z=False, delta_softplus=delta_softplus)
    return (one(has_D=D is not None, has_delta_bias=delta_bias is not None)
            + one(has_D=D_b is not None, has_delta_bias=delta_bias_b is not None)
            + b * E * L * 9 * (z is not None))


# ----------------------------------------------------------------------------------------------------
# The compiled CPU scan's own ops (backend ``cpp``), which the entry points call directly: their fakes
# (compiled_cpu's allocations: out in the requested layout, the last state float32, the gradients; its
# per-thread tile buffers and checkpoints are not tensors), the FLOP formulas above, and their autograd (the
# forward ops' backward is the compiled backward op), registered once the library is loaded.
# ----------------------------------------------------------------------------------------------------

def _compiled_out(u: Tensor, time_major_out: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    b, E, L = u.shape
    dtype = dtype or u.dtype
    return u.new_empty(b, L, E, dtype=dtype).transpose(1, 2) if time_major_out else u.new_empty(b, E, L, dtype=dtype)


def _grad_like(x: Tensor) -> Tensor:
    """The compiled backward's gradient of a (b, E, L) input: x's dtype, time-major memory iff x is."""
    return _compiled_out(x, compiled_cpu.is_time_major(x))


def _grads_fake(u, delta, A, B, C, D, delta_bias) -> list[Tensor]:
    """One direction's gradients as the compiled backward allocates them: du, ddelta, dA, dB, dC, dD,
    ddelta_bias; dB and dC with stride 1 along N; an absent input's gradient empty (0,) float32."""
    def bc(M):
        return M.new_empty(*M.shape[:-2], M.shape[-1], M.shape[-2]).transpose(-1, -2)

    def opt(v):
        return torch.empty_like(v) if v is not None else u.new_empty(0, dtype=torch.float32)

    return [_grad_like(u), _grad_like(delta), torch.empty_like(A), bc(B), bc(C), opt(D), opt(delta_bias)]


def _present(grads, inputs) -> tuple:
    """The gradients of the inputs that were given (None for an absent optional input, whose gradient the
    compiled backward returns empty)."""
    return tuple(None if x is None else g for g, x in zip(grads, inputs))


@compiled_cpu.describe_ops
def _describe_compiled_scan() -> None:
    @torch.library.register_fake("vimbench_cpu::selective_scan_fwd")
    def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, time_major_out):
        return _compiled_out(u, time_major_out), u.new_empty(u.shape[0], u.shape[1], A.shape[1],
                                                            dtype=compute_dtype(u))

    @torch.library.register_fake("vimbench_cpu::bidirectional_scan_fwd")
    def _(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b, delta_softplus,
          time_major_out):
        return _compiled_out(u, time_major_out)

    register_flop_formula(torch.ops.vimbench_cpu.selective_scan_fwd)(_scan_flop_formula)
    register_flop_formula(torch.ops.vimbench_cpu.bidirectional_scan_fwd)(_bidir_flop_formula)

    @torch.library.register_fake("vimbench_cpu::selective_scan_bwd")
    def _(u, delta, A, B, C, D, z, delta_bias, dout, dlast, delta_softplus):
        du, ddelta, dA, dB, dC, dD, dbias = _grads_fake(u, delta, A, B, C, D, delta_bias)
        dz = _grad_like(z) if z is not None else u.new_empty(0, dtype=torch.float32)
        return [du, ddelta, dA, dB, dC, dD, dz, dbias]

    @torch.library.register_fake("vimbench_cpu::bidirectional_scan_bwd")
    def _(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b, dout, delta_softplus):
        f = _grads_fake(u, delta, A, B, C, D, delta_bias)
        r = _grads_fake(u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b)
        dz = _grad_like(z) if z is not None else u.new_empty(0, dtype=torch.float32)
        return f[:6] + r[:6] + [dz, f[6], r[6]]

    register_flop_formula(torch.ops.vimbench_cpu.selective_scan_bwd)(_scan_bwd_flop_formula)
    register_flop_formula(torch.ops.vimbench_cpu.bidirectional_scan_bwd)(_bidir_bwd_flop_formula)

    # autograd: the backward ops recompute the forward states from the saved inputs (nothing else is saved)
    def _setup(ctx, inputs, output):
        *tensors, ctx.delta_softplus, _ = inputs
        ctx.save_for_backward(*tensors)

    def _scan_backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        grads = torch.ops.vimbench_cpu.selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, dlast,
                                                          ctx.delta_softplus)
        du, ddelta, dA, dB, dC, dD, dz, dbias = grads
        return _present((du, ddelta, dA, dB, dC, dD, dz, dbias), ctx.saved_tensors) + (None, None)

    def _bidir_backward(ctx, dout):
        inputs = ctx.saved_tensors
        grads = torch.ops.vimbench_cpu.bidirectional_scan_bwd(*inputs, dout, ctx.delta_softplus)
        return _present(grads, inputs) + (None, None)

    torch.library.register_autograd("vimbench_cpu::selective_scan_fwd", _scan_backward, setup_context=_setup)
    torch.library.register_autograd("vimbench_cpu::bidirectional_scan_fwd", _bidir_backward, setup_context=_setup)
