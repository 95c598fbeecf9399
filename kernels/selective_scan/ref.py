"""The selective scan as an obvious sequential loop: the correctness oracle for every other backend.

Shape legend used across vimbench.kernels:
    b batch, E channels (Vim's d_inner = 2 * embed_dim), L sequence length, N state size (d_state),
    G groups of B/C (E/G channels share one B_t, C_t).

Semantics are those of mamba_ssm's ``selective_scan_fn`` / ``selective_scan_ref``:

    delta <- softplus(delta + delta_bias)            (bias and softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t       h: (b, E, N), h_{-1} = 0
    y_t    = <C_t, h_t> + D * u_t
    out    = y * silu(z)                              (gate optional)

All arithmetic is float32 (float64 inputs stay float64); the output has u's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(u: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other input dtype computes in float32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def expand_groups(M: torch.Tensor, E: int) -> torch.Tensor:
    """B or C of shape (b, N, L) or (b, G, N, L) -> (b, E, N, L) view, channel e using group e // (E/G)."""
    if M.dim() == 3:
        return M.unsqueeze(1).expand(M.shape[0], E, *M.shape[1:])
    G = M.shape[1]
    return M.repeat_interleave(E // G, dim=1)


def prepare_delta(delta, delta_bias, delta_softplus, dtype):
    """delta (b, E, L) -> float delta with the optional bias (E,) and softplus applied."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def finish_output(y, u, D, z, dtype):
    """Adds the D * u skip and the silu(z) gate to y (b, E, L) in ``dtype``; casts to u's dtype."""
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Sequential selective scan.

    u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L) or (b, G, N, L); D, delta_bias: (E,).
    Returns out (b, E, L) in u's dtype, and with ``return_last_state`` also h_{L-1} (b, E, N) in the
    compute dtype.
    """
    dt = compute_dtype(u)
    E, L = u.shape[1], u.shape[2]
    delta = prepare_delta(delta, delta_bias, delta_softplus, dt)
    uf, Af = u.to(dt), A.to(dt)
    Bf, Cf = expand_groups(B.to(dt), E), expand_groups(C.to(dt), E)  # (b, E, N, L)
    h = u.new_zeros(u.shape[0], E, A.shape[1], dtype=dt)
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * Af)                       # (b, E, N)
        h = dA * h + (delta[:, :, t] * uf[:, :, t])[..., None] * Bf[..., t]
        ys.append((h * Cf[..., t]).sum(-1))                               # (b, E)
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(uf.shape)
    out = finish_output(y, u, D, z, dt)
    return (out, h) if return_last_state else out


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



def selective_scan_ref_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
    """The gradients of ``selective_scan_ref``'s out for the upstream gradient ``dout`` (b, E, L), by autograd
    through the sequential loop (``torch.func.vjp``, which differentiates inside a custom op's implementation,
    where autograd is otherwise switched off): (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its
    input's shape and dtype, None for an absent input. The oracle of every backward (in float64)."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    present = [i for i, t in enumerate(inputs) if t is not None]

    def out(*tensors):
        args = list(inputs)
        for i, t in zip(present, tensors):
            args[i] = t
        return selective_scan_ref(*args, delta_softplus=delta_softplus)

    _, vjp = torch.func.vjp(out, *(inputs[i] for i in present))
    grads = iter(vjp(dout.to(u.dtype)))
    return tuple(None if t is None else next(grads) for t in inputs)
