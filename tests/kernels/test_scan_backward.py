"""The scan's backward: ref and the chunked cpu backend against float64 autograd of the sequential reference
(one direction and the bidirectional pair, every gradient), torch's gradcheck, the gradient check that gates
train timing (passing right backwards, refusing a planted wrong one and naming forward-only backends), the
backward's FLOP formula under FlopCounterMode, and the backward on meta tensors."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vimbench
from helpers import fresh_plugins, scan_case  # noqa: F401
from vimbench.errors import BackendUnavailable
from vimbench.kernels.selective_scan import bidirectional_scan, bidirectional_scan_ref, selective_scan, selective_scan_ref
from vimbench.kernels.selective_scan.backends import has_backward
from vimbench.kernels.selective_scan.check import CASES, check_backward, check_named_backend
from vimbench.kernels.selective_scan.ops import scan_bwd_flops, scan_flops
from vimbench.kernels.selective_scan.ref import selective_scan_ref_backward

OPTIONAL = ("D", "z", "delta_bias")


def _inputs(shape, dtype, extras):
    """The present inputs of a scan_case, each a fresh leaf that requires grad, by name."""
    args, kw = scan_case(*shape, dtype=dtype, extras=extras)
    named = dict(zip(("u", "delta", "A", "B", "C"), args), **{k: kw[k] for k in OPTIONAL if k in kw})
    return {k: v.clone().requires_grad_() for k, v in named.items()}


def _grads_f64(fn, named, dout, **kw):
    """float64 autograd of ``fn`` (a reference) on the named inputs."""
    x = {k: v.detach().double().requires_grad_() for k, v in named.items()}
    return torch.autograd.grad(fn(**x, **kw), list(x.values()), dout.double())


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("shape", [CASES["L1"], CASES["G2-multi-chunk"], CASES["G4-L129"], CASES["long-L-3dim"]],
                         ids=["L1", "G2-L131", "G4-L129", "L300-3dim"])
@pytest.mark.parametrize("extras", [True, False], ids=["D-z-bias-softplus", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_gradient_matches_float64_autograd_of_ref(backend, shape, extras, dtype):
    """Elementwise, with the forward's tolerance scaled by each gradient's largest value (gradients sum over L)."""
    torch.manual_seed(1)
    x = _inputs(shape, dtype, extras)
    out = selective_scan(**x, delta_softplus=extras, backend=backend)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, list(x.values()), dout)
    want = _grads_f64(selective_scan_ref, x, dout, delta_softplus=extras)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for name, g, w, inp in zip(x, got, want, x.values()):
        assert g.shape == inp.shape and g.dtype == inp.dtype, name
        err = (g.double() - w).abs().max().item()
        assert err <= rtol * w.abs().max().item() + 1e-7, f"d{name}: {err:.3g} vs max {w.abs().max().item():.3g}"


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("with_gate", [True, False], ids=["D-z-bias", "bare"])
def test_bidirectional_gradients_match_float64_autograd_of_ref(backend, with_gate):
    torch.manual_seed(2)
    f, b = _inputs((2, 8, 70, 4, 2), torch.float32, with_gate), _inputs((2, 8, 70, 4, 2), torch.float32, with_gate)
    x = [f["u"], f["delta"], f["A"], f["B"], f["C"], f.get("D"), b["u"], b["delta"], b["A"], b["B"], b["C"], b.get("D"),
         f.get("z"), f.get("delta_bias"), b.get("delta_bias")]
    present = [t for t in x if t is not None]
    out = bidirectional_scan(*x, delta_softplus=with_gate, backend=backend)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, present, dout)
    x64 = [None if t is None else t.detach().double().requires_grad_() for t in x]
    want = torch.autograd.grad(bidirectional_scan_ref(*x64[:12], *x64[12:], delta_softplus=with_gate),
                               [t for t in x64 if t is not None], dout.double())
    assert len(got) == (15 if with_gate else 10)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.double() - w).abs().max() <= 1e-5 * w.abs().max() + 1e-7, i


def test_cpu_backward_passes_gradcheck():
    """torch.autograd.gradcheck (finite differences in float64) of the chunked backward through the op, every
    input, grouped B and C, two chunks."""
    torch.manual_seed(3)
    x = {k: v.detach().double().requires_grad_() for k, v in _inputs((1, 4, 70, 3, 2), torch.float64, True).items()}
    names = list(x)

    def fn(*tensors):
        return selective_scan(**dict(zip(names, tensors)), delta_softplus=True, backend="cpu")
    assert torch.autograd.gradcheck(fn, tuple(x.values()), eps=1e-6, atol=1e-6)


def test_last_state_is_not_differentiable():
    x = _inputs((1, 4, 5, 2, 0), torch.float32, False)
    out, last = selective_scan(**x, return_last_state=True, backend="cpu")
    assert out.requires_grad and not last.requires_grad


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_the_gradient_check_passes_ref_and_cpu(backend):
    result = check_backward(backend, dtypes=(torch.float32,))
    assert result.ok, result.failure
    assert result.cases == len(CASES) * 2 * 2          # shapes x extras x {one direction, pair}


def _dB_one_percent_off(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
    grads = list(selective_scan_ref_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout))
    grads[3] = grads[3] * 1.01
    return tuple(grads)


def test_a_plugin_backward_is_used_checked_and_a_wrong_one_refused(fresh_plugins):
    calls = []

    def right(*args):
        calls.append(args[0].shape)
        return selective_scan_ref_backward(*args)
    vimbench.register_scan_backend("mine", selective_scan_ref, devices="cpu", backward=right)
    vimbench.register_scan_backend("wrong", selective_scan_ref, devices="cpu", backward=_dB_one_percent_off)
    assert has_backward("mine") and has_backward("wrong")
    assert check_backward("mine", dtypes=(torch.float32,)).ok and calls
    wrong = check_backward("wrong")
    assert not wrong.ok and wrong.cases == 0
    assert wrong.failure.startswith("L1 (1, 4, 1, 4, 0) float32 extras one direction: dB differs")
    assert wrong.worst == pytest.approx(0.01, rel=1e-3)
    named = check_named_backend("wrong", grads=True)
    assert named["check_ok"] and not named["forward_only"] and not named["grad_ok"]


def test_a_plugin_without_backward_is_forward_only(fresh_plugins):
    vimbench.register_scan_backend("fwd", selective_scan_ref, devices="cpu")
    assert not has_backward("fwd")
    named = check_named_backend("fwd", grads=True)
    assert named["check_ok"] and "forward-only" in named["forward_only"] and "grad_ok" not in named
    out = selective_scan(**_inputs((1, 4, 3, 2, 0), torch.float32, False), backend="fwd")
    with pytest.raises(BackendUnavailable, match="scan backend 'fwd' .* is forward-only"):
        out.sum().backward()


@pytest.mark.parametrize("extras", [True, False], ids=["D-z-bias-softplus", "plain"])
def test_backward_flops_are_the_formula(extras):
    """FlopCounterMode around the forward and loss.backward(): scan_flops + scan_bwd_flops; the pair: the
    forward's count plus two directions' backwards and the gate's (8 per element)."""
    b, E, L, N = 2, 4, 9, 3
    x = _inputs((b, E, L, N, 0), torch.float32, extras)
    flags = dict(has_D=extras, has_z=extras, has_delta_bias=extras, delta_softplus=extras)
    with FlopCounterMode(display=False) as counter:
        selective_scan(**x, delta_softplus=extras, backend="cpu").sum().backward()
    assert counter.get_total_flops() == scan_flops(b, E, L, N, **flags) + scan_bwd_flops(b, E, L, N, **flags)
    one = dict(has_D=extras, has_z=False, has_delta_bias=extras, delta_softplus=extras)
    args = [x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D")] * 2
    with FlopCounterMode(display=False) as counter:
        bidirectional_scan(*args, z=x.get("z"), delta_bias=x.get("delta_bias"), delta_bias_b=x.get("delta_bias"),
                           delta_softplus=extras, backend="cpu").sum().backward()
    forward = 2 * scan_flops(b, E, L, N, **one) + b * E * L * (1 + 3 * extras)
    assert counter.get_total_flops() == forward + 2 * scan_bwd_flops(b, E, L, N, **one) + b * E * L * 8 * extras


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_backward_on_meta_tensors_gives_the_gradients_shapes(backend):
    """Memory prediction and FLOP counting run the backward ops' fakes: every gradient in its input's shape."""
    with torch.device("meta"):
        x = _inputs((2, 8, 300, 16, 2), torch.bfloat16, True)
        grads = torch.autograd.grad(selective_scan(**x, delta_softplus=True, backend=backend), list(x.values()),
                                    torch.empty(2, 8, 300, dtype=torch.bfloat16))
    assert [(g.shape, g.dtype, g.device.type) for g in grads] == \
        [(t.shape, t.dtype, "meta") for t in x.values()]
