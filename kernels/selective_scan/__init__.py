"""The selective scan: one public entry point, several backends, a torch custom op, and a FLOP formula.

Public API (shapes use the legend of ``ref.py``: b batch, E channels, L length, N state, G groups):

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto")
    bidirectional_scan(...)   both directions of one Vim mixer layer, see its docstring
    run_bidirectional_scan(backend, ...)   the same on a resolved backend, without the input checks

Data flow of this package, each file with one job:
    ref.py            the sequential loops: ``selective_scan_ref`` and ``bidirectional_scan_ref`` (the oracle), and
                      ``selective_scan_ref_backward`` (autograd through the loop)
    chunked.py        the chunked pure-PyTorch scan and its backward (backend ``cpu``)
    compiled_cpu.py   the compiled C++ scan on ATen's vector types, source in csrc/ (backend ``cpp``)
    triton_kernel.py  the fused Triton kernel (backends ``triton`` and ``triton_pipelined``: two launch designs)
    backends.py       one record per backend (``ScanBackend``: forward, pair, fakes, layouts read, devices,
                      availability, backward, package) in one registry: the built-ins' declarations, plug-in
                      registration, availability checks, which backends can train and what ``auto`` resolves to
    fakes.py          what each built-in allocates on a GPU, on fake tensors (its record's fakes)
    ops.py            the torch custom ops the entry points below call (running the record's forward or pair),
                      their autograd through backward ops, their fakes (the record's) and FLOP formulas; the
                      same for the compiled ops of a record with ``own_ops``
    check.py          a backend against ``ref`` on awkward shapes, its gradients too: run before any timing
The entry points below dispatch through the record only: they name no backend.
No backend ever falls back to another: an unavailable one raises ``BackendUnavailable`` naming why; so does
the backward of a forward-only one (a plug-in without a backward).
"""
from __future__ import annotations

from vimbench.errors import BackendUnavailable
from vimbench.kernels.selective_scan.backends import (REGISTRY, SCAN_BACKENDS, SCAN_CHOICES, ScanBackend,
                                                      check_scan_backend, register_scan_backend, resolve_scan_backend,
                                                      scan_backends, scan_choices)
from vimbench.kernels.selective_scan.ops import (_bidir_op, _scan_op, bidirectional_scan_fake, has_memory_model,
                                                 scan_flops, selective_scan_fake)
from vimbench.kernels.selective_scan.ref import bidirectional_scan_ref, selective_scan_ref

__all__ = ["REGISTRY", "SCAN_BACKENDS", "SCAN_CHOICES", "BackendUnavailable", "ScanBackend", "bidirectional_scan",
           "bidirectional_scan_fake", "bidirectional_scan_ref", "check_scan_backend", "has_memory_model",
           "register_scan_backend", "resolve_scan_backend", "run_bidirectional_scan", "scan_backends", "scan_choices",
           "scan_flops", "selective_scan", "selective_scan_fake", "selective_scan_ref"]


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


def _as_read(record: ScanBackend, *tensors) -> tuple:
    """The tensors in a layout ``record``'s backend reads: as they are for one that reads any strides
    (``strided``), else contiguous."""
    return tensors if record.strided else tuple(None if t is None else t.contiguous() for t in tensors)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    """Selective scan with mamba_ssm's ``selective_scan_fn`` semantics (see ``ref.py``).

    u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L) or (b, G, N, L); D, delta_bias: (E,).
    Inputs may have any strides (a backend that reads them as they are gets them so, the others get contiguous
    copies).
    Math in float32 (float64 stays float64); returns out (b, E, L) in u's dtype, and with
    ``return_last_state`` also the final state (b, E, N). ``backend``: one of ``scan_choices()``.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    backend = resolve_scan_backend(backend, u.device)
    record = REGISTRY[backend]
    tensors = _as_read(record, u, delta, A, B, C, D, z, delta_bias)
    if record.own_ops:  # its own op directly (see ``ops.py``: its fake and FLOP formula are registered on it)
        return record.forward(*tensors, delta_softplus, return_last_state)
    out, last = _scan_op(*tensors, delta_softplus, backend)
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
    return run_bidirectional_scan(resolve_scan_backend(backend, u.device), u, delta, A, B, C, D, u_b, delta_b, A_b,
                                  B_b, C_b, D_b, z, delta_bias, delta_bias_b, delta_softplus)


def run_bidirectional_scan(backend, u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                           delta_bias_b, delta_softplus):
    """``bidirectional_scan`` on a concrete ``backend`` (as ``resolve_scan_backend`` returns it), without its
    input checks: for a caller that resolved the backend and builds well-formed inputs, as the Vim model does
    once per forward for all its layers."""
    record = REGISTRY[backend]
    tensors = _as_read(record, u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b)
    if record.own_ops:  # its own pair op directly
        return record.pair(*tensors, delta_softplus)
    return _bidir_op(*tensors, delta_softplus, backend)
