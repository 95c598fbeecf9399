"""Peers as scan backends (kernels/peers.py): mambapy's two scans against the float64 reference, forward, last
state and gradients, through vimbench's own entry point; without mambapy, no registration and one line naming
why wherever a user asks for one of the names."""
import sys

import pytest
import torch

from helpers import GRAD_NAMES, assert_close, fresh_plugins, scan_case  # noqa: F401 (a fixture)
from vimbench.commands import main
from vimbench.errors import BackendUnavailable, InputError
from vimbench.kernels import peers
from vimbench.kernels.selective_scan import check_scan_backend, scan_backends, selective_scan_ref
from vimbench.kernels.selective_scan.backends import REGISTRY
from vimbench.kernels.selective_scan.check import GRAD_ATOL, GRAD_TOLERANCES, check_named_backend
from vimbench.kernels.selective_scan.ref import selective_scan_ref_backward
from vimbench.models.registry import check_backends

needs_mambapy = pytest.mark.skipif(bool(peers.why_absent("mambapy_seq")),
                                   reason=f"mambapy is not installed ({peers.INSTALL})")
CASES = {"L1": (1, 4, 1, 4, 0), "odd-L-G1": (2, 6, 7, 4, 1), "G2-L9": (2, 8, 9, 3, 2)}  # (b, E, L, N, G)


def _f64(args, kw):
    return ([a.double() for a in args],
            {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})


@pytest.fixture
def no_mambapy(fresh_plugins, monkeypatch):
    """A process where mambapy does not import (a None entry in sys.modules makes import raise ImportError)."""
    monkeypatch.setitem(sys.modules, "mambapy", None)
    monkeypatch.setitem(sys.modules, "mambapy.mamba", None)
    for name in peers.MAMBAPY:
        REGISTRY.pop(name, None)


def test_without_mambapy_nothing_registers_and_asking_says_why(no_mambapy, capsys):
    assert not set(peers.MAMBAPY) & set(scan_backends())
    assert capsys.readouterr().err == ""                          # absent is not a broken plug-in
    why = peers.why_absent("mambapy_seq")
    assert "needs the mambapy package" in why and peers.INSTALL in why and "\n" not in why
    with pytest.raises(BackendUnavailable, match="needs the mambapy package"):
        check_scan_backend("mambapy_pscan", "cpu")
    with pytest.raises(InputError, match="needs the mambapy package"):
        check_backends("scan", ["mambapy_seq"])
    assert main(["check-backend", "mambapy_seq"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the mambapy package" in err[0]
    with pytest.raises(ValueError, match="unknown scan backend 'nope'"):  # not a peer: the usual message
        check_scan_backend("nope", "cpu")


def test_intel_extension_says_why_in_one_line():
    why = peers.why_absent("ipex")
    try:
        import intel_extension_for_pytorch  # noqa: F401
    except Exception:
        assert why.startswith("Intel's extension for PyTorch does not import here") and torch.__version__ in why
    else:
        assert why == "Intel's extension for PyTorch imports, but vimbench has no adapter for it"
    assert "\n" not in why and peers.why_absent("cpp") == ""


@needs_mambapy
@pytest.mark.parametrize("name", list(peers.MAMBAPY))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_mambapy_matches_the_reference(fresh_plugins, name, case):
    """Forward, last state and every gradient of mambapy's scans (through the entry point, fp32, with D, z,
    delta_bias and softplus) against float64 ``ref`` and its autograd."""
    assert name in scan_backends() and REGISTRY[name].package == "vimbench"
    torch.manual_seed(0)
    args, kw = scan_case(*CASES[case])
    out, last = REGISTRY[name].forward(*args, **kw, return_last_state=True)
    ref, ref_last = selective_scan_ref(*_f64(args, kw)[0], **_f64(args, kw)[1], return_last_state=True)
    assert_close(f"{name} out", ref, out)
    assert_close(f"{name} last state", ref_last, last, torch.float32)
    inputs = (*args, kw["D"], kw["z"], kw["delta_bias"], True)
    dout = torch.randn_like(out)
    grads = REGISTRY[name].backward(*inputs, dout)
    want = selective_scan_ref_backward(*_f64(inputs[:8], {})[0], True, dout.double())
    for n, g, w in zip(GRAD_NAMES, grads, want):
        err, bound = (g.double() - w).abs().max().item(), GRAD_TOLERANCES[torch.float32] * w.abs().max().item()
        assert g.dtype == torch.float32 and err <= bound + GRAD_ATOL, f"d{n}: {err:.3g} > {bound:.3g}"


@needs_mambapy
@pytest.mark.slow
@pytest.mark.parametrize("name", list(peers.MAMBAPY))
def test_mambapy_passes_the_check_every_timing_runs(name):
    result = check_named_backend(name, "cpu", grads=True)
    assert result["check_ok"] and result["grad_ok"], result
