"""The selective scan as torch custom ops, so that FLOP counters and fake-tensor memory tracking see it.

``torch.ops.vimbench.selective_scan`` and ``torch.ops.vimbench.bidirectional_scan`` take the backend name
as an argument; their fake implementations allocate what that backend allocates on a GPU (for
``vimbench.count.memory``), and their FLOP formulas follow ``scan_flops`` (for ``vimbench.count.flops``).
Their autograd (``torch.library.register_autograd``) saves the inputs only and calls the backward ops
``vimbench::selective_scan_bwd`` and ``vimbench::bidirectional_scan_bwd``, which recompute what they need
through the backend's backward (``backends.scan_backward``; a forward-only backend raises
``BackendUnavailable`` there); they have fakes per backend too, and FLOP formulas from ``scan_bwd_flops``.
The last state returned by ``vimbench::selective_scan`` is not differentiable (as in mamba_ssm).
What runs inside, and each fake, is the backend's record (``backends.ScanBackend``: ``forward``, ``pair``, their
fakes, ``backward``, ``backward_fake``). A backend whose record has ``own_ops`` (``cpp``) is not behind these
ops: the entry points call its compiled ops directly, and the end of this file registers their fakes and the
same FLOP formulas on them, and their autograd (the compiled backward ops, with their own fakes and
``scan_bwd_flops``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.kernels.selective_scan.backends import REGISTRY, scan_backward
from vimbench.kernels.selective_scan.fakes import grads_fake, outputs_fake
from vimbench.kernels.selective_scan.ref import bidirectional_scan_ref, compute_dtype

@torch.library.custom_op("vimbench::selective_scan", mutates_args=())
def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
             backend: str) -> tuple[Tensor, Tensor]:
    out, last = REGISTRY[backend].forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
    return out, last


def _fake(backend: str):
    """``backend``'s fake: its record's (``fakes.outputs_fake`` for a plug-in that registered none)."""
    return REGISTRY[backend].fake or outputs_fake


@_scan_op.register_fake
def selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    """The fake implementation of ``vimbench::selective_scan``: ``backend``'s allocations (``fakes``)."""
    return _fake(backend)(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)

@torch.library.custom_op("vimbench::bidirectional_scan", mutates_args=())
def _bidir_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_bias_b: Optional[Tensor],
              delta_softplus: bool, backend: str) -> Tensor:
    record = REGISTRY[backend]
    if record.pair is not None:
        return record.pair(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                           delta_softplus)
    return bidirectional_scan_ref(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                                  delta_bias_b, delta_softplus, scan=record.forward)


@_bidir_op.register_fake
def bidirectional_scan_fake(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                            delta_softplus, backend):
    """The fake implementation of ``vimbench::bidirectional_scan``: the record's ``pair_fake`` (triton: both
    directions in one kernel); the generic pair goes through ``bidirectional_scan_ref`` (flipped copies, two
    outputs, the sum and the gate) with the one-direction allocations."""
    pair_fake = REGISTRY[backend].pair_fake
    if pair_fake is not None:
        return pair_fake(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                         delta_softplus)
    return bidirectional_scan_ref(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                                  delta_bias_b, delta_softplus, scan=_fake(backend))


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------

def _present(*tensors) -> list[Tensor]:
    return [t for t in tensors if t is not None]


@torch.library.custom_op("vimbench::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], dout: Tensor, delta_softplus: bool,
                 backend: str) -> list[Tensor]:
    """The gradients of ``vimbench::selective_scan``'s out for ``dout`` (b, E, L, contiguous, u's dtype): those
    of u, delta, A, B, C and of each of D, z, delta_bias that is given, in that order, each in its input's
    shape and dtype (see ``register_scan_backend``'s ``backward``)."""
    return _present(*scan_backward(backend)(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout))


def _bwd_fake(backend: str):
    """``backend``'s backward fake; ``BackendUnavailable`` for a forward-only backend, as its backward raises."""
    scan_backward(backend)
    return REGISTRY[backend].backward_fake or grads_fake


def has_memory_model(backend: str, train: bool = False) -> bool:
    """Whether fake tensors see what ``backend`` allocates on a GPU: its record has a ``fake`` (every built-in
    with a CUDA implementation, a plug-in that registered one); with ``train`` a ``backward_fake`` too."""
    record = REGISTRY.get(backend)
    return record is not None and record.fake is not None and (not train or record.backward_fake is not None)


@_scan_bwd_op.register_fake
def selective_scan_bwd_fake(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, backend):
    """The fake implementation of ``vimbench::selective_scan_bwd``: ``backend``'s backward's allocations."""
    return _present(*_bwd_fake(backend)(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout))


def _setup_scan(ctx, inputs, output):
    *tensors, ctx.delta_softplus, ctx.backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.mark_non_differentiable(output[1])


def _scan_autograd(ctx, dout, dlast):
    tensors = ctx.saved_tensors
    grads = iter(_scan_bwd_op(*tensors, dout.contiguous(), ctx.delta_softplus, ctx.backend))
    return (*(None if t is None else next(grads) for t in tensors), None, None)


_scan_op.register_autograd(_scan_autograd, setup_context=_setup_scan)


def _flipped(*tensors):
    return tuple(None if t is None else t.flip(-1) for t in tensors)


def _bidir_backward(scan, backward, u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                    delta_bias_b, delta_softplus, dout):
    """The gradients of ``bidirectional_scan_ref(..., scan=scan)`` for ``dout`` from the one-direction
    ``backward`` (its signature, see ``register_scan_backend``): with the gate, dz needs y_f + y_b, which the
    two directions' ``scan`` recompute; then each direction's backward on dy = dout * silu(z) (flipped for the
    backward direction, its gradients flipped back). Returns the gradients of all 15 inputs, None for absent."""
    dt = compute_dtype(u)
    dy = dout.to(dt)
    dz = None
    if z is not None:
        y = (scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus).to(dt)
             + scan(*_flipped(u_b, delta_b), A_b, *_flipped(B_b, C_b), D_b, None, delta_bias_b,
                    delta_softplus).flip(-1).to(dt))
        zf = z.to(dt)
        sig = torch.sigmoid(zf)
        dz = (dy * y * sig * (1 + zf * (1 - sig))).to(z.dtype)
        dy = dy * zf * sig
    dy = dy.to(u.dtype)
    f = backward(u, delta, A, B, C, D, None, delta_bias, delta_softplus, dy)
    bk = backward(*_flipped(u_b, delta_b), A_b, *_flipped(B_b, C_b), D_b, None, delta_bias_b, delta_softplus,
                  dy.flip(-1).contiguous())
    du_b, ddelta_b, dA_b, dB_b, dC_b, dD_b, _, ddelta_bias_b = bk
    return (*f[:6], *_flipped(du_b, ddelta_b), dA_b, *_flipped(dB_b, dC_b), dD_b, dz, f[7], ddelta_bias_b)


@torch.library.custom_op("vimbench::bidirectional_scan_bwd", mutates_args=())
def _bidir_bwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
                  z: Optional[Tensor], delta_bias: Optional[Tensor], delta_bias_b: Optional[Tensor], dout: Tensor,
                  delta_softplus: bool, backend: str) -> list[Tensor]:
    """The gradients of ``vimbench::bidirectional_scan``'s out for ``dout``: those of the 15 inputs that are
    given, in argument order (``_bidir_backward`` with ``backend``'s scan and backward)."""
    return _present(*_bidir_backward(REGISTRY[backend].forward, scan_backward(backend), u, delta, A, B, C, D, u_b,
                                     delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b, delta_softplus, dout))


@_bidir_bwd_op.register_fake
def bidirectional_scan_bwd_fake(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                                delta_bias_b, dout, delta_softplus, backend):
    """The fake implementation of ``vimbench::bidirectional_scan_bwd``: ``_bidir_backward`` with ``backend``'s
    forward and backward fakes."""
    return _present(*_bidir_backward(_fake(backend), _bwd_fake(backend), u, delta, A, B, C, D, u_b, delta_b, A_b,
                                     B_b, C_b, D_b, z, delta_bias, delta_bias_b, delta_softplus, dout))


def _setup_bidir(ctx, inputs, output):
    *tensors, ctx.delta_softplus, ctx.backend = inputs
    ctx.save_for_backward(*tensors)


def _bidir_autograd(ctx, dout):
    tensors = ctx.saved_tensors
    grads = iter(_bidir_bwd_op(*tensors, dout.contiguous(), ctx.delta_softplus, ctx.backend))
    return (*(None if t is None else next(grads) for t in tensors), None, None)


_bidir_op.register_autograd(_bidir_autograd, setup_context=_setup_bidir)


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


def _scan_flop_formula(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *_, out_shape=None, **kw):
    """FLOPs of one scan call from its argument shapes (registered below, on this op and on the compiled scan's,
    whose further arguments, the backend or the layout flags, do not count)."""
    b, E, L = u
    return scan_flops(b, E, L, A[1], has_D=D is not None, has_z=z is not None,
                      has_delta_bias=delta_bias is not None, delta_softplus=delta_softplus)


def _bidir_flop_formula(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                        delta_softplus, *_, out_shape=None, **kw):
    """FLOPs of one bidirectional call from its argument shapes (registered as the one-direction formula)."""
    b, E, L = u
    one = functools.partial(scan_flops, b, E, L, A[1], has_z=False, delta_softplus=delta_softplus)
    # the two directions, then y_f + y_b (1) and the shared gate (3) per (b, e, t)
    return (one(has_D=D is not None, has_delta_bias=delta_bias is not None)
            + one(has_D=D_b is not None, has_delta_bias=delta_bias_b is not None)
            + b * E * L * (1 + 3 * (z is not None)))


def _scan_bwd_flop_formula(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, backend, out_shape=None,
                           **kw):
    """FLOPs of one scan backward call (``scan_bwd_flops``) from its argument shapes."""
    b, E, L = u
    return scan_bwd_flops(b, E, L, A[1], has_D=D is not None, has_z=z is not None,
                          has_delta_bias=delta_bias is not None, delta_softplus=delta_softplus)


def _bidir_bwd_flop_formula(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b,
                            dout, delta_softplus, backend=None, out_shape=None, **kw):
    """FLOPs of one bidirectional backward call (the custom op's, and the compiled one's, which has no
    ``backend``): the two directions' backwards without the gate, and the gate's backward (8 per (b, e, t), as in
    ``scan_bwd_flops``; the sum y_f + y_b passes dy to both for free)."""
    b, E, L = u
    one = functools.partial(scan_bwd_flops, b, E, L, A[1], has_z=False, delta_softplus=delta_softplus)
    return (one(has_D=D is not None, has_delta_bias=delta_bias is not None)
            + one(has_D=D_b is not None, has_delta_bias=delta_bias_b is not None)
            + b * E * L * 8 * (z is not None))


register_flop_formula(torch.ops.vimbench.selective_scan)(_scan_flop_formula)
register_flop_formula(torch.ops.vimbench.bidirectional_scan)(_bidir_flop_formula)
register_flop_formula(torch.ops.vimbench.selective_scan_bwd)(_scan_bwd_flop_formula)
register_flop_formula(torch.ops.vimbench.bidirectional_scan_bwd)(_bidir_bwd_flop_formula)


def _compiled_scan_bwd_flop_formula(u, delta, A, B, C, D, z, delta_bias, dout, dlast, states, delta_softplus,
                                    out_shape=None, **kw):
    """``_scan_bwd_flop_formula`` for the compiled scan backward (``vimbench_cpu::selective_scan_bwd``), whose
    arguments hold the last state's gradient and the forward's kept states, and no backend."""
    return _scan_bwd_flop_formula(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, None)


def _compiled_bidir_bwd_flop_formula(*args, out_shape=None, **kw):
    """``_bidir_bwd_flop_formula`` for ``vimbench_cpu::bidirectional_scan_bwd``, whose arguments hold the two
    directions' kept states between dout and delta_softplus."""
    return _bidir_bwd_flop_formula(*args[:16], args[18])


# ----------------------------------------------------------------------------------------------------
# The compiled CPU scan's own ops (backend ``cpp``), which the entry points call directly: their fakes
# (compiled_cpu's allocations: out in the requested layout, the last state float32, the states a forward keeps
# for its backward, the gradients; the per-thread tile buffers are not tensors), the FLOP formulas above, and
# their autograd (the forward ops' backward is the compiled backward op), registered once the library is loaded.
# ----------------------------------------------------------------------------------------------------

def _compiled_out(u: Tensor, time_major_out: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    b, E, L = u.shape
    dtype = dtype or u.dtype
    return u.new_empty(b, L, E, dtype=dtype).transpose(1, 2) if time_major_out else u.new_empty(b, E, L, dtype=dtype)


STATE_TILE = 16
"""Steps between the states a compiled forward keeps for its backward (kStateTile in csrc/scan_common.h)."""


def _kept_states(u: Tensor, A: Tensor, keep_states: bool) -> Tensor:
    """The states a compiled forward keeps with ``keep_states``: (b, ceil(L / STATE_TILE), N, E) float32, the state
    entering every STATE_TILE steps; without, an empty (0,) float32 tensor."""
    b, E, L = u.shape
    if not keep_states:
        return u.new_empty(0, dtype=torch.float32)
    return u.new_empty(b, -(-L // STATE_TILE), A.shape[1], E, dtype=torch.float32)


def _grad_like(x: Tensor) -> Tensor:
    """The compiled backward's gradient of a (b, E, L) input: x's dtype, time-major memory iff x is."""
    return _compiled_out(x, compiled_cpu.is_time_major(x))


def _compiled_grads_fake(u, delta, A, B, C, D, delta_bias) -> list[Tensor]:
    """One direction's gradients as the compiled backward allocates them: du, ddelta, dA, dB, dC, dD,
    ddelta_bias; dB and dC with stride 1 along N; an absent input's gradient empty (0,) float32."""
    def bc(M):
        return M.new_empty(*M.shape[:-2], M.shape[-1], M.shape[-2]).transpose(-1, -2)

    def opt(v):
        return torch.empty_like(v) if v is not None else u.new_empty(0, dtype=torch.float32)

    return [_grad_like(u), _grad_like(delta), torch.empty_like(A), bc(B), bc(C), opt(D), opt(delta_bias)]


def _given_grads(grads, inputs) -> tuple:
    """The gradients of the inputs that were given (None for an absent optional input, whose gradient the
    compiled backward returns empty)."""
    return tuple(None if x is None else g for g, x in zip(grads, inputs))


@compiled_cpu.describe_ops
def _describe_compiled_scan() -> None:
    @torch.library.register_fake("vimbench_cpu::selective_scan_fwd")
    def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, time_major_out, keep_states):
        last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=compute_dtype(u))
        return _compiled_out(u, time_major_out), last, _kept_states(u, A, keep_states)

    @torch.library.register_fake("vimbench_cpu::bidirectional_scan_fwd")
    def _(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b, delta_softplus,
          time_major_out, keep_states):
        return _compiled_out(u, time_major_out), _kept_states(u, A, keep_states), _kept_states(u_b, A_b, keep_states)

    register_flop_formula(torch.ops.vimbench_cpu.selective_scan_fwd)(_scan_flop_formula)
    register_flop_formula(torch.ops.vimbench_cpu.bidirectional_scan_fwd)(_bidir_flop_formula)

    @torch.library.register_fake("vimbench_cpu::selective_scan_bwd")
    def _(u, delta, A, B, C, D, z, delta_bias, dout, dlast, states, delta_softplus):
        du, ddelta, dA, dB, dC, dD, dbias = _compiled_grads_fake(u, delta, A, B, C, D, delta_bias)
        dz = _grad_like(z) if z is not None else u.new_empty(0, dtype=torch.float32)
        return [du, ddelta, dA, dB, dC, dD, dz, dbias]

    @torch.library.register_fake("vimbench_cpu::bidirectional_scan_bwd")
    def _(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b, dout, states, states_b,
          delta_softplus):
        f = _compiled_grads_fake(u, delta, A, B, C, D, delta_bias)
        r = _compiled_grads_fake(u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b)
        dz = _grad_like(z) if z is not None else u.new_empty(0, dtype=torch.float32)
        return f[:6] + r[:6] + [dz, f[6], r[6]]

    register_flop_formula(torch.ops.vimbench_cpu.selective_scan_bwd)(_compiled_scan_bwd_flop_formula)
    register_flop_formula(torch.ops.vimbench_cpu.bidirectional_scan_bwd)(_compiled_bidir_bwd_flop_formula)

    # autograd: the forward is called with keep_states when a gradient is needed (compiled_cpu); the backward ops
    # recompute the states of each tile from the kept states and the saved inputs
    def _setup_scan(ctx, inputs, output):
        *tensors, ctx.delta_softplus, _, _ = inputs
        ctx.save_for_backward(*tensors, output[2])
        ctx.mark_non_differentiable(output[2])

    def _compiled_scan_backward(ctx, dout, dlast, _):
        *inputs, states = ctx.saved_tensors
        grads = torch.ops.vimbench_cpu.selective_scan_bwd(*inputs, dout, dlast, states, ctx.delta_softplus)
        du, ddelta, dA, dB, dC, dD, dz, dbias = grads
        return _given_grads((du, ddelta, dA, dB, dC, dD, dz, dbias), inputs) + (None, None, None)

    def _setup_bidir(ctx, inputs, output):
        *tensors, ctx.delta_softplus, _, _ = inputs
        ctx.save_for_backward(*tensors, *output[1:])
        ctx.mark_non_differentiable(*output[1:])

    def _compiled_bidir_backward(ctx, dout, *_):
        *inputs, states, states_b = ctx.saved_tensors
        grads = torch.ops.vimbench_cpu.bidirectional_scan_bwd(*inputs, dout, states, states_b, ctx.delta_softplus)
        return _given_grads(grads, inputs) + (None, None, None)

    torch.library.register_autograd("vimbench_cpu::selective_scan_fwd", _compiled_scan_backward,
                                    setup_context=_setup_scan)
    torch.library.register_autograd("vimbench_cpu::bidirectional_scan_fwd", _compiled_bidir_backward,
                                    setup_context=_setup_bidir)
