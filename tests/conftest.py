"""Shared test helpers: one closeness check and one tolerance table (mamba_ssm's scan tolerances)."""
import pytest
import torch

TOL = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.float16: dict(rtol=3e-3, atol=5e-3),
       torch.bfloat16: dict(rtol=3e-2, atol=5e-2), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def assert_close(name, ref, out, dtype=None):
    """Fails on NaN/inf, a shape mismatch, or an error beyond ``TOL[dtype]`` (dtype defaults to out's);
    the message gives the max absolute and relative error."""
    tol = TOL[dtype or out.dtype]
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ref, out = ref.double(), out.double()
    err = (ref - out).abs()
    rel = (err / ref.abs().clamp_min(1e-6)).max().item()
    assert torch.allclose(out, ref, **tol), f"{name}: max abs err {err.max().item():.3g}, max rel err {rel:.3g}, tol {tol}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def nan_outputs(monkeypatch):
    """torch.empty, torch.empty_like and Tensor.new_empty return NaN-filled floating tensors."""
    def poisoned(fn):
        def wrapper(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return wrapper
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        monkeypatch.setattr(owner, name, poisoned(getattr(owner, name)))
