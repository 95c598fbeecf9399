"""Chunked selective scan in pure PyTorch: the fast path for CPU tensors (and any device without a kernel).

The recurrence h_t = dA_t * h_{t-1} + dBu_t is evaluated step by step, but each step is one in-place
``addcmul_`` on a contiguous (b, E, N) slab; everything else (delta's bias and softplus, exp(delta*A),
delta*u*B, the C contraction, the D skip and the silu(z) gate) is done for a chunk of T steps at once on
small tensors that stay in cache. Memory is O(b*E*T*N), never O(b*E*L*N), and the arithmetic only
multiplies by decays exp(delta*A), so it cannot overflow (the cumulative-sum / log-space trick divides by
exp(sum delta*A) and reaches inf once a chunk's |sum delta*A| passes ~88 in float32).

The backward (``selective_scan_cpu_backward``) keeps the same bound: one forward pass keeps only the state at
each chunk's start, (ceil(L/T), b, E, N); then, chunk by chunk from the last, it recomputes the chunk's T
states from its start state and runs the reverse recurrence dh_t = dA_{t+1} * dh_{t+1} + C_t * dy_t the
same way (one in-place ``addcmul_`` per step, the rest batched over the chunk).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from vimbench.kernels.selective_scan.ref import compute_dtype

CHUNK = 64  # steps per chunk: amortises the batched ops, keeps the (T, b, E, N) buffers ~1.5 MiB at Vim-Ti


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) from vectorised exp and log (torch's softplus and log1p run scalar code on CPU, ~4x
    slower): x above 20 passes through (as in mamba_ssm), below -8 it is exp(x) (log1p(y) = y - y^2/2 + ...,
    y < 3.4e-4). Absolute error below 1e-7 everywhere, relative below 2e-4."""
    e = torch.exp(x)
    return torch.where(x > 20, x, torch.where(x < -8, e, torch.log(e + 1)))


@dataclass
class _Scan:
    """One call's inputs as the chunk loops read them: B and C as contiguous (L, b, G, N) in the compute dtype
    ``dt`` (so that a chunk is a leading slice; G = 1 for the ungrouped form), the per-step buffers dA and H
    (T, b, E, N) with their per-step views, and whether only shapes matter (fake or meta tensors: the step
    loops, which allocate nothing, are skipped)."""
    u: torch.Tensor
    delta: torch.Tensor
    Af: torch.Tensor
    Bt: torch.Tensor
    Ct: torch.Tensor
    bias: torch.Tensor | None
    delta_softplus: bool
    dt: torch.dtype
    dA: torch.Tensor
    H: torch.Tensor
    shapes_only: bool

    def __post_init__(self):
        self.Hs, self.dAs = self.H.unbind(0), self.dA.unbind(0)                 # per-step views, made once

    @classmethod
    def of(cls, u, delta, A, B, C, delta_bias, delta_softplus) -> "_Scan":
        dt = compute_dtype(u)
        b, E, L = u.shape
        Bt = (B.unsqueeze(1) if B.dim() == 3 else B).permute(3, 0, 1, 2).to(dt).contiguous()
        Ct = (C.unsqueeze(1) if C.dim() == 3 else C).permute(3, 0, 1, 2).to(dt).contiguous()
        bias = None if delta_bias is None else delta_bias.to(dt)[:, None]
        T = min(CHUNK, L)
        buffers = [u.new_empty(T, b, E, A.shape[1], dtype=dt) for _ in range(2)]
        return cls(u, delta, A.to(dt), Bt, Ct, bias, delta_softplus, dt, *buffers,
                   is_fake(u) or u.device.type == "meta")

    @property
    def G(self) -> int:
        return self.Bt.shape[2]

    def starts(self) -> list[int]:
        """The first step of each chunk. On fake or meta tensors (memory prediction and FLOP counting run these
        functions as the ops' fakes) every full chunk after the first allocates what the second does (while
        the previous chunk's temporaries are still referenced), so the first, second and last chunks stand
        for all."""
        starts = range(0, self.u.shape[2], CHUNK)
        return sorted({starts[0], starts[min(1, len(starts) - 1)], starts[-1]}) if self.shapes_only else list(starts)

    def states(self, t0: int, h: torch.Tensor):
        """Steps t0 .. t1-1 (t1 = min(t0 + CHUNK, L)) from the state h before t0: fills dA[:n] = exp(delta*A)
        and H[:n] = the states h_t, (n, b, E, N). Returns (d, ds, uc): delta + bias, delta after the softplus,
        and u for the chunk, (b, E, n) in the compute dtype."""
        b, E, L = self.u.shape
        n, N, G = min(t0 + CHUNK, L) - t0, self.Af.shape[1], self.G
        d = self.delta[:, :, t0:t0 + n].to(self.dt)
        if self.bias is not None:
            d = d + self.bias
        ds = softplus(d) if self.delta_softplus else d
        uc = self.u[:, :, t0:t0 + n].to(self.dt)
        du = (ds * uc).permute(2, 0, 1).reshape(n, b, G, E // G, 1)
        torch.mul(ds.permute(2, 0, 1).unsqueeze(-1), self.Af, out=self.dA[:n]).exp_()        # (n, b, E, N)
        torch.mul(du, self.Bt[t0:t0 + n].unsqueeze(3), out=self.H[:n].view(n, b, G, E // G, N))  # dBu
        if not self.shapes_only:
            Hs, dAs = self.Hs, self.dAs
            Hs[0].addcmul_(dAs[0], h)
            for t in range(1, n):
                Hs[t].addcmul_(dAs[t], Hs[t - 1])
        return d, ds, uc

    def y(self, t0: int, n: int) -> torch.Tensor:
        """y[b, e, t] = sum_n H[t, b, e, n] * C[t, b, group(e), n] for the chunk at t0 of n steps: (b, E, n)."""
        b, E, _ = self.u.shape
        H = self.H[:n].view(n, b, self.G, E // self.G, -1)
        return torch.einsum("tbgen,tbgn->bget", H, self.Ct[t0:t0 + n]).reshape(b, E, n)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Same signature, shapes and semantics as ``ref.selective_scan_ref``."""
    s = _Scan.of(u, delta, A, B, C, delta_bias, delta_softplus)
    dt = s.dt
    out = torch.empty_like(u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=dt)
    for t0 in s.starts():
        _, _, uc = s.states(t0, h)
        n = uc.shape[2]
        h = s.H[n - 1].clone()
        y = s.y(t0, n)
        if D is not None:
            y = y + D.to(dt)[:, None] * uc
        if z is not None:
            y = y * F.silu(z[:, :, t0:t0 + n].to(dt))
        out[:, :, t0:t0 + n] = y
    return (out, h) if return_last_state else out


def selective_scan_cpu_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
    """The gradients of ``selective_scan_cpu``'s out for the upstream gradient ``dout`` (b, E, L):
    (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's shape and dtype, None for an absent
    input; ddelta is the gradient of the raw delta (before bias and softplus), dB and dC of a grouped form
    are summed over each group's channels. Inputs as ``selective_scan_cpu`` takes them.

    Memory beyond the inputs and gradients: the chunk start states (ceil(L/T), b, E, N) and six (T, b, E, N)
    buffers, never (b, E, L, N). Reverse recurrence per chunk, with dh_t the gradient of the state h_t:
        dh_t   = dA_{t+1} * dh_{t+1} + C_t * dy_t                    (dh after the last step: 0)
        dC_t  += sum_e h_t * dy_t;  dB_t += sum_e dh_t * (ds_t u_t);  d(ds_t u_t) = sum_n dh_t * B_t
        g_t    = dh_t * h_{t-1} * dA_t   (the gradient of ds_t * A);  dA += sum g_t * ds_t;  dds_t += sum_n g_t * A
    with ds = softplus(delta + bias) (or delta + bias), dy = dout * silu(z) and dz = dout * y * silu'(z).
    """
    s = _Scan.of(u, delta, A, B, C, delta_bias, delta_softplus)
    dt, (b, E, L), N, G = s.dt, u.shape, A.shape[1], s.G
    Eg = E // G
    starts = s.starts()
    # forward pass: the state before each chunk
    h0 = u.new_zeros(len(starts), b, E, N, dtype=dt)
    for i, t0 in enumerate(starts[:-1]):
        n = s.states(t0, h0[i])[2].shape[2]
        h0[i + 1].copy_(s.H[n - 1])
    T = s.dA.shape[0]
    dH, Gr = u.new_empty(T, b, E, N, dtype=dt), u.new_empty(T, b, E, N, dtype=dt)
    dHs = dH.unbind(0)
    carry = u.new_zeros(b, E, N, dtype=dt)                       # dA_{t1} * dh_{t1}, from the chunk after
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = None if z is None else torch.empty_like(z)
    dBt, dCt = torch.empty_like(s.Bt), torch.empty_like(s.Ct)    # (L, b, G, N)
    dA = A.new_zeros(E, N, dtype=dt)
    dD = None if D is None else D.new_zeros(E, dtype=dt)
    dbias = None if delta_bias is None else delta_bias.new_zeros(E, dtype=dt)
    Df = None if D is None else D.to(dt)[:, None]
    for i in reversed(range(len(starts))):
        t0 = starts[i]
        d, ds, uc = s.states(t0, h0[i])
        n = uc.shape[2]
        dy = dout[:, :, t0:t0 + n].to(dt)
        if z is not None:
            zc = z[:, :, t0:t0 + n].to(dt)
            y = s.y(t0, n) + (0 if D is None else Df * uc)
            sig = torch.sigmoid(zc)
            dz[:, :, t0:t0 + n] = dy * y * sig * (1 + zc * (1 - sig))
            dy = dy * zc * sig
        dyt = dy.permute(2, 0, 1)                                                     # (n, b, E)
        H5, dH5 = s.H[:n].view(n, b, G, Eg, N), dH[:n].view(n, b, G, Eg, N)
        dCt[t0:t0 + n] = torch.einsum("tbgen,tbge->tbgn", H5, dyt.reshape(n, b, G, Eg))
        torch.mul(dyt.reshape(n, b, G, Eg, 1), s.Ct[t0:t0 + n].unsqueeze(3), out=dH5)   # C_t * dy_t
        if not s.shapes_only:
            dHs[n - 1].add_(carry)
            for t in range(n - 2, -1, -1):
                dHs[t].addcmul_(s.dAs[t + 1], dHs[t + 1])
        torch.mul(s.dA[0], dH[0], out=carry)
        dsu = (ds * uc).permute(2, 0, 1).reshape(n, b, G, Eg)
        dBt[t0:t0 + n] = torch.einsum("tbgen,tbge->tbgn", dH5, dsu)
        ddsu = torch.einsum("tbgen,tbgn->bget", dH5, s.Bt[t0:t0 + n]).reshape(b, E, n)
        torch.mul(dH[:n], s.dA[:n], out=Gr[:n])                                       # g_t before h_{t-1}
        Gr[1:n].mul_(s.H[:n - 1])
        Gr[0].mul_(h0[i])
        dA += torch.einsum("tben,bet->en", Gr[:n], ds)
        dds = torch.einsum("tben,en->bet", Gr[:n], s.Af) + ddsu * uc
        dui = ddsu * ds
        if D is not None:
            dD += (dy * uc).sum((0, 2))
            dui = dui + Df * dy
        du[:, :, t0:t0 + n] = dui
        dd = dds * torch.sigmoid(d) if delta_softplus else dds
        ddelta[:, :, t0:t0 + n] = dd
        if dbias is not None:
            dbias += dd.sum((0, 2))
    dB, dC = (M.permute(1, 2, 3, 0).reshape(B.shape).to(B.dtype) for M in (dBt, dCt))
    return (du, ddelta, dA.to(A.dtype), dB, dC, None if D is None else dD.to(D.dtype), dz,
            None if dbias is None else dbias.to(delta_bias.dtype))
