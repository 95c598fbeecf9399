"""Vim's backward through the compiled CPU kernels: every parameter's gradient against float64 autograd of the
reference model (the sequential reference scan, F.conv1d, torch's RMSNorm), with the compiled causal convs and
add + RMSNorm around the reference scan, and with the whole ``cpp`` path (compiled scan too).

The reference scan runs as plain autograd through ``bidirectional_scan_ref``, not through the ``vimbench::``
custom op the model calls for scan ``ref``, so that these tests need no backward of that op."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import assert_close
from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.kernels.selective_scan.ref import bidirectional_scan_ref
from vimbench.models import vim
from vimbench.models.vim import VisionMamba

needs_cpp = pytest.mark.skipif(not compiled_cpu.available()[0],
                               reason=f"compiled CPU kernels unavailable: {compiled_cpu.available()[1]}")


def small_vim() -> VisionMamba:
    """Two blocks, D 36 (E 72: not a multiple of 16), 48 px: 9 patches + the cls token, more tokens than conv
    taps; norm weights away from 1."""
    model = VisionMamba(img_size=48, embed_dim=36, depth=2, num_classes=10, scan="ref")
    with torch.no_grad():
        for norm in [layer.norm for layer in model.layers] + [model.norm_f]:
            norm.weight.uniform_(0.5, 1.5)
    return model


def param_grads(model, x, dout) -> dict:
    """Each parameter's gradient of sum(model(x) * dout), x and dout cast to the model's dtype."""
    dtype = next(model.parameters()).dtype
    model.zero_grad()
    torch.autograd.backward(model(x.to(dtype)), dout.to(dtype))
    return {name: p.grad for name, p in model.named_parameters()}


def ref_scan(backend, *args):
    """``run_bidirectional_scan`` as the sequential reference with plain autograd, whatever the backend."""
    return bidirectional_scan_ref(*args)


def grads_and_float64_reference(model, run, monkeypatch):
    """(run's parameter gradients, a float64 copy of ``model``'s with the reference scan and the torch convs and
    norms), on one input and output gradient; run(model, x, dout) -> gradients, given a float32 copy."""
    x, dout = torch.randn(2, 3, 48, 48), torch.randn(2, 10)
    with monkeypatch.context() as m:
        m.setattr(vim, "run_bidirectional_scan", ref_scan)
        ref = param_grads(copy.deepcopy(model).double(), x, dout)
    return run(copy.deepcopy(model), x, dout), ref


def assert_grads_close(out, ref) -> None:
    for name, g in ref.items():
        assert out[name] is not None, f"{name}: no gradient"
        assert_close(name, g, out[name])


@needs_cpp
def test_compiled_conv_and_norm_backward_in_the_model(monkeypatch):
    """The compiled convs and add + RMSNorm (time-major conv input, float32 residual stream, norm_f's unused
    residual) between the reference scan's autograd and the model's linear layers."""
    def cpp_around_ref(model, x, dout):
        with monkeypatch.context() as m:
            m.setattr(vim, "fused_impl", lambda scan: "cpp")
            m.setattr(vim, "run_bidirectional_scan", ref_scan)
            return param_grads(model, x, dout)
    assert_grads_close(*grads_and_float64_reference(small_vim(), cpp_around_ref, monkeypatch))


@needs_cpp
def test_cpp_path_gradients_match_the_float64_reference(monkeypatch):
    """A train step's backward on compiled code end to end: scan, convs and add + RMSNorm all ``cpp``."""
    def cpp(model, x, dout):
        model.set_scan("cpp")
        return param_grads(model, x, dout)
    assert_grads_close(*grads_and_float64_reference(small_vim(), cpp, monkeypatch))
