"""Peers as scan backends: other packages' CPU selective scans, registered when they are installed by vimbench's
own ``vimbench.scan_backends`` entry point (``register``), so that they are checked against ``ref`` and timed
beside ours in ``kernels`` and ``scaling`` like any plug-in.

    mambapy_seq    mambapy's MambaBlock.selective_scan_seq: exp(delta A) and delta B u built as (b, L, E, N)
                   tensors, a Python loop over L of h = exp(delta_t A) h + delta_t B_t u_t, the states stacked
                   (b, L, E, N) and contracted with C, plus D u
    mambapy_pscan  mambapy's MambaBlock.selective_scan: the same tensors with its Blelloch parallel scan
                   ``pscan`` (padded to the next power of two of L) in place of the loop

Both come with ``pip install 'vimbench[peers]'`` (mambapy >= 1.2, pure PyTorch); without mambapy ``register``
registers nothing and ``why_absent`` says why in one line (shown when a user asks for one of the names).
What mambapy does not do is done here in torch around its call (``_mambapy_scan``): delta_bias and softplus
before it (``ref.prepare_delta``), the silu(z) gate after it, D = 0 when absent, groups G > 1 by one call per
group of E/G channels with that group's B and C; inputs in float32 (mambapy's loop keeps its state in
float32), the output cast to u's dtype. mambapy reads (b, L, channels) inputs; ours, (b, E, L) and (b, N, L),
go in as transposed views, not copies. mambapy returns no state, and vimbench's scan op asks every backend
for the last state (timed calls included): it is computed here in closed form (``_last_state``: one more
(b, L, E, N) exp, two products and a sum over L), which adds to the peers' times: at the Vim-Ti 1248 shape,
1 thread, about 0.7-0.8 s to mambapy_seq's 1.2 s and 1.3 s to mambapy_pscan's 3.0 s (CPU time on a loaded
2-core AVX-512 Xeon VM).
Backward (``_mambapy_backward``): autograd through mambapy's own code (the loop; PScan.backward for
pscan), the forward recomputed with grad enabled, in a fresh thread (see there). mambapy's pscan is an old-style
autograd.Function, which ``torch.func`` transforms refuse, so this uses ``torch.autograd.grad`` rather than
``ref``'s ``torch.func.vjp``.

Intel's extension for PyTorch ships a CPU selective scan too, but each release pins one torch release; it is
not registered (``why_absent("ipex")`` says why here).
"""
from __future__ import annotations

import functools
import importlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from vimbench.kernels.selective_scan.ref import prepare_delta

MAMBAPY = {"mambapy_seq": "selective_scan_seq", "mambapy_pscan": "selective_scan"}
"""Backend name -> the mambapy.mamba.MambaBlock method it calls."""
INSTALL = "pip install 'vimbench[peers]'"


def why_absent(name: str) -> str:
    """Why peer ``name`` (a key of ``MAMBAPY``, or "ipex") is not registered here, in one line; "" when it is
    not a peer or its package imports."""
    package = "mambapy" if name in MAMBAPY else "intel_extension_for_pytorch" if name == "ipex" else None
    if package is None:
        return ""
    try:
        importlib.import_module(package)
    except Exception as e:  # an absent package, or one built for another torch
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
        if name == "ipex":
            return (f"Intel's extension for PyTorch does not import here ({reason}); each of its releases pins one "
                    f"torch release (this is torch {torch.__version__})")
        return f"scan backend {name!r} needs the mambapy package ({INSTALL}), which does not import here ({reason})"
    return "" if name in MAMBAPY else "Intel's extension for PyTorch imports, but vimbench has no adapter for it"


def _mambapy_scan(method: str, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  return_last_state=False):
    """``ref.selective_scan_ref``'s signature and semantics through mambapy's MambaBlock.<method> (see the
    module docstring). u, delta, z (b, E, L); A (E, N); B, C (b, N, L) or (b, G, N, L); D, delta_bias (E,)."""
    from mambapy.mamba import MambaBlock
    scan = getattr(MambaBlock, method)
    b, E, L = u.shape
    N = A.shape[1]
    f32 = torch.float32
    x = u.to(f32).transpose(1, 2)                                                   # (b, L, E)
    dt = prepare_delta(delta, delta_bias, delta_softplus, f32).transpose(1, 2)      # (b, L, E)
    Af = A.to(f32)
    Df = D.to(f32) if D is not None else u.new_zeros(E, dtype=f32)
    Bg, Cg = ((M.unsqueeze(1) if M.dim() == 3 else M).to(f32) for M in (B, C))    # (b, G, N, L)
    G = Bg.shape[1]
    width = E // G
    ys, lasts = [], []
    for g in range(G):
        ch = slice(g * width, (g + 1) * width)
        block = SimpleNamespace(config=SimpleNamespace(d_inner=width, d_state=N))  # what the method reads of self
        Bt, Ct = Bg[:, g].transpose(1, 2), Cg[:, g].transpose(1, 2)                # (b, L, N)
        ys.append(scan(block, x[..., ch], dt[..., ch], Af[ch], Bt, Ct, Df[ch]))    # (b, L, E/G)
        if return_last_state:
            lasts.append(_last_state(x[..., ch], dt[..., ch], Af[ch], Bt))
    y = torch.cat(ys, dim=-1).transpose(1, 2)                                      # (b, E, L)
    if z is not None:
        y = y * F.silu(z.to(f32))
    out = y.to(u.dtype)
    return (out, torch.cat(lasts, dim=1)) if return_last_state else out


def _last_state(x, dt, A, B):
    """h_{L-1} (b, E, N) of the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t in closed form:
    sum_t exp(A * (dt_{t+1} + ... + dt_{L-1})) dt_t x_t B_t. x, dt (b, L, E); A (E, N); B (b, L, N); float32."""
    later = dt.flip(1).cumsum(1).flip(1) - dt                                      # (b, L, E)
    weights = torch.exp(later[..., None] * A).mul_((dt * x)[..., None]).mul_(B[:, :, None, :])  # (b, L, E, N)
    return weights.sum(1)


def _mambapy_grads(method: str, inputs: tuple, delta_softplus: bool, dout) -> tuple:
    """Autograd of ``_mambapy_scan``'s out for ``dout`` with respect to each present tensor of ``inputs`` (u, delta,
    A, B, C, D, z, delta_bias), the forward recomputed with grad enabled."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        out = _mambapy_scan(method, *leaves[:7], delta_bias=leaves[7], delta_softplus=delta_softplus)
        grads = iter(torch.autograd.grad(out, [t for t in leaves if t is not None], dout.to(out.dtype)))
    return tuple(None if t is None else next(grads) for t in leaves)


def _mambapy_backward(method: str, u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
    """The gradients of ``_mambapy_scan``'s out for ``dout`` (b, E, L), by autograd through mambapy's code
    (``register_scan_backend``'s backward contract): (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its
    input's dtype, None for an absent input. vimbench calls a backward inside a custom op, which runs with the
    autograd dispatch keys excluded for its thread; dispatch state is per thread, so autograd runs in a fresh
    one (where grad mode is on and no key is excluded)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_mambapy_grads, method, (u, delta, A, B, C, D, z, delta_bias), delta_softplus,
                           dout).result()


def register() -> None:
    """The ``vimbench.scan_backends`` entry point: registers ``MAMBAPY``'s backends (CPU and CUDA: pure torch),
    with their backward, when mambapy imports; nothing otherwise (``why_absent`` says why)."""
    if why_absent("mambapy_seq"):
        return
    from vimbench.kernels.selective_scan.backends import register_scan_backend
    for name, method in MAMBAPY.items():
        register_scan_backend(name, functools.partial(_mambapy_scan, method), devices=("cpu", "cuda"),
                              backward=functools.partial(_mambapy_backward, method),
                              description=f"mambapy's MambaBlock.{method} (pure PyTorch), a peer")
