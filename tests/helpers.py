"""Test helpers: one closeness check against the project's tolerance table (``check.TOLERANCES``), the
scan input builder (``check.scan_case``), and NaN-poisoned allocations."""
from __future__ import annotations

import pytest
import torch

from vimbench.kernels.selective_scan.check import TOLERANCES, scan_case  # noqa: F401 (re-exported)

TOL = TOLERANCES


def assert_close(name, ref, out, dtype=None):
    """Fails on NaN/inf, a shape mismatch, or an error beyond ``TOL[dtype]`` (dtype defaults to out's);
    the message gives the max absolute and relative error."""
    tol = TOL[dtype or out.dtype]
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ref, out = ref.double(), out.double()
    err = (ref - out).abs()
    rel = (err / ref.abs().clamp_min(1e-6)).max().item()
    assert torch.allclose(out, ref, **tol), \
        f"{name}: max abs err {err.max().item():.3g}, max rel err {rel:.3g}, tol {tol}"


def poison_empty(monkeypatch) -> None:
    """Make torch.empty, torch.empty_like and Tensor.new_empty return NaN-filled floating tensors, so an
    output element a kernel never writes cannot pass a comparison."""
    def poisoned(fn):
        def wrapper(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return wrapper
    # torch.device(...) as a context manager caches the set of factory functions it redirects on first
    # use: fill that cache with the real functions first, or later device contexts would miss them
    torch.utils._device._device_constructors()
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        monkeypatch.setattr(owner, name, poisoned(getattr(owner, name)))


needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="checks what happens on a host without a CUDA GPU; this host has one")
"""For tests of the refusals a host without a GPU gives (on a GPU host those calls would start real work)."""
