"""What each scan backend allocates on a GPU, run on fake tensors: the fakes of the built-in backends' records
(``backends.BUILT_INS``), which the custom ops of ``ops.py`` run for memory prediction (``vimbench.count.memory``
runs them inside its storage tracker) and FLOP counting on the meta device.

Each forward fake has ``ref.selective_scan_ref``'s signature, each pair fake ``ref.bidirectional_scan_ref``'s
(without ``scan``), each backward fake the signature of ``register_scan_backend``'s ``backward``. They allocate
the outputs, plus the temporaries allocated and freed at the backend's peak. Shapes: b, E, L from u, N from A,
T = min(chunked.CHUNK, L).
"""
from __future__ import annotations

import torch

from vimbench.kernels.selective_scan.chunked import selective_scan_cpu
from vimbench.kernels.selective_scan.ref import compute_dtype, expand_groups, finish_output, prepare_delta


def ref_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
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


def cpu_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """scan_cpu itself: on fake tensors it allocates exactly what it allocates for real (it skips only its
    step loop, which allocates nothing)."""
    return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def mamba_ssm_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """mamba_ssm's selective_scan_cuda.fwd: out (b, E, L), the chunk states x (b, E, ceil(L/2048), 2N)
    float32 (the last state is a view of it), and out_z (b, E, L) when z is given (then out is dropped)."""
    b, E, L = u.shape
    out = torch.empty_like(u)
    x = u.new_empty(b, E, max(1, -(-L // 2048)), 2 * A.shape[1], dtype=compute_dtype(u))
    if z is not None:
        out = torch.empty_like(z)
    return (out, x[:, :, -1, 1::2]) if return_last_state else out


def triton_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False):
    """scan_triton (fused): the (N, E) copy of A, out, and the last state (b, E, N) float32."""
    A_t = A.t().contiguous()
    out = torch.empty_like(u)
    del A_t
    last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=compute_dtype(u))
    return (out, last) if return_last_state else out


def triton_pair_fake(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z=None, delta_bias=None,
                     delta_bias_b=None, delta_softplus=True):
    """The Triton pair runs both directions in one kernel: the two (N, E) copies of A, then out."""
    A_t = (A.t().contiguous(), A_b.t().contiguous())
    out = torch.empty_like(u)
    del A_t
    return out


def outputs_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False):
    """The outputs alone, for a plug-in that registered no fake: shapes for FLOP counting on the meta device.
    Memory prediction refuses such a backend (``has_memory_model``) instead of trusting this."""
    out = torch.empty_like(u)
    last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=compute_dtype(u))
    return (out, last) if return_last_state else out


def grads_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
    """The gradients alone: for a plug-in that registered no ``backward_fake`` (shapes for FLOP counting), and
    what every backward returns."""
    return tuple(None if t is None else torch.empty_like(t) for t in (u, delta, A, B, C, D, z, delta_bias))


def ref_bwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
    """autograd through scan_ref's loop, approximately: what the loop saves per step, the state h_t and
    exp(delta_t*A) (b, E, N) each, so two (L, b, E, N) in the compute dtype; the gradients of the expanded
    B and C, (b, E, N, L) each; then the gradients."""
    dt = compute_dtype(u)
    b, E, L = u.shape
    saved = u.new_empty(2, L, b, E, A.shape[1], dtype=dt)  # noqa: F841  (held through the backward)
    expanded = u.new_empty(2, b, E, A.shape[1], L, dtype=dt)  # noqa: F841
    return grads_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout)


def mamba_ssm_bwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
    """mamba_ssm's fwd (its allocations, see ``mamba_ssm_fake``), then its bwd: du, ddelta and dz like their
    inputs, float32 dA, dD, ddelta_bias and dB, dC in B's shape (cast to B's dtype after), out_z again when
    z is given."""
    held = mamba_ssm_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)  # noqa: F841
    f32 = compute_dtype(u)
    grads = [torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A, dtype=f32),
             torch.empty_like(B, dtype=f32), torch.empty_like(C, dtype=f32),
             None if D is None else torch.empty_like(D, dtype=f32), None if z is None else torch.empty_like(z),
             None if delta_bias is None else torch.empty_like(delta_bias, dtype=f32)]
    out_z = None if z is None else torch.empty_like(z)  # noqa: F841
    grads[3], grads[4] = grads[3].to(B.dtype), grads[4].to(C.dtype)
    return tuple(grads)


def triton_bwd_fake(design):
    """The Triton backward of ``design`` with its kernel skipped: its allocations (the (N, E) copy of A, the
    gradients, the float32 partials, checkpoints and chunk states; ``triton_kernel._bwd_buffers``) and the sums."""
    def fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
        from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton_backward
        return selective_scan_triton_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout,
                                              design=design, launch=False)
    return fake
