"""Chunked selective scan in pure PyTorch: the fast path for CPU tensors (and any device without a kernel).

The recurrence h_t = dA_t * h_{t-1} + dBu_t is evaluated step by step, but each step is one in-place
``addcmul_`` on a contiguous (b, E, N) slab; everything else (delta's bias and softplus, exp(delta*A),
delta*u*B, the C contraction as a batched matmul, the D skip and the silu(z) gate) is done for a chunk of
T steps at once on small tensors that stay in cache. Memory is O(b*E*T*N), never O(b*E*L*N), and the
arithmetic only multiplies by decays exp(delta*A), so it cannot overflow (the cumulative-sum / log-space
trick divides by exp(sum delta*A) and reaches inf once a chunk's |sum delta*A| passes ~88 in float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .scan_ref import compute_dtype

CHUNK = 128  # steps per chunk: amortises the batched ops, keeps the (T, b, E, N) buffers a few MiB


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Same signature, shapes and semantics as ``scan_ref.selective_scan_ref``."""
    dt = compute_dtype(u)
    b, E, L = u.shape
    N = A.shape[1]
    # B, C as (L, b, G, N) so that a chunk is a contiguous leading slice; G = 1 for the ungrouped form.
    Bt = (B.unsqueeze(1) if B.dim() == 3 else B).permute(3, 0, 1, 2).to(dt)
    Ct = (C.unsqueeze(1) if C.dim() == 3 else C).permute(3, 0, 1, 2).to(dt)
    G = Bt.shape[2]
    Af = A.to(dt)
    bias = None if delta_bias is None else delta_bias.to(dt)[:, None]
    out = torch.empty_like(u)
    h = u.new_zeros(b, E, N, dtype=dt)
    dA = u.new_empty(min(CHUNK, L), b, E, N, dtype=dt)
    H = torch.empty_like(dA)
    for t0 in range(0, L, CHUNK):
        t1 = min(t0 + CHUNK, L)
        T = t1 - t0
        d = delta[:, :, t0:t1].to(dt)                                          # (b, E, T)
        if bias is not None:
            d = d + bias
        if delta_softplus:
            d = F.softplus(d)
        uc = u[:, :, t0:t1].to(dt)
        du = (d * uc).permute(2, 0, 1).reshape(T, b, G, E // G, 1)
        torch.mul(d.permute(2, 0, 1).unsqueeze(-1), Af, out=dA[:T]).exp_()     # (T, b, E, N)
        torch.mul(du, Bt[t0:t1].unsqueeze(3), out=H[:T].view(T, b, G, E // G, N))  # dBu
        Hs, dAs = H[:T].unbind(0), dA[:T].unbind(0)
        Hs[0].addcmul_(dAs[0], h)
        for t in range(1, T):
            Hs[t].addcmul_(dAs[t], Hs[t - 1])
        h = Hs[T - 1].clone()
        # y[t, b, e] = sum_n H[t, b, e, n] * C[t, b, group(e), n], as a batched matmul
        y = torch.matmul(H[:T].view(T * b * G, E // G, N), Ct[t0:t1].reshape(T * b * G, N, 1))
        y = y.view(T, b, E).permute(1, 2, 0)                                    # (b, E, T)
        if D is not None:
            y = y + D.to(dt)[:, None] * uc
        if z is not None:
            y = y * F.silu(z[:, :, t0:t1].to(dt))
        out[:, :, t0:t1] = y
    return (out, h) if return_last_state else out
