"""A vimbench plug-in in a few lines: one scan backend, ``example``, registered through an entry point.

``pyproject.toml`` declares ``register`` under the ``vimbench.scan_backends`` entry-point group; vimbench
calls it the first time a command asks for a scan backend. The backend wraps vimbench's sequential reference
scan, so it is correct by construction; a real plug-in passes its own kernel, which must have the same
signature and semantics (see ``vimbench.register_scan_backend``).
"""
from __future__ import annotations


def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The selective scan: u, delta, z (b, E, L); A (E, N); B, C (b, N, L) or (b, G, N, L); D, delta_bias
    (E,). Returns out (b, E, L) in u's dtype, and with ``return_last_state`` the last state (b, E, N)."""
    from vimbench.kernels.selective_scan import selective_scan_ref
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """What ``scan`` allocates, run on fake tensors for memory prediction: the reference's allocations, as
    vimbench's own fake of ``ref`` models them (a kernel of your own allocates its outputs and workspaces)."""
    from vimbench.kernels.selective_scan import selective_scan_fake
    out, last = selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, "ref")
    return (out, last) if return_last_state else out


def backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
    """The gradients of ``scan``'s out for ``dout`` (b, E, L): (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias),
    None for an absent input (see ``vimbench.register_scan_backend``); here autograd through the reference."""
    from vimbench.kernels.selective_scan.ref import selective_scan_ref_backward
    return selective_scan_ref_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout)


def register() -> None:
    import vimbench
    vimbench.register_scan_backend("example", scan, devices=("cpu", "cuda"), fake=fake, backward=backward,
                                   description="the sequential reference scan, as a plug-in")
