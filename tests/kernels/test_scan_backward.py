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


def test_check_scans_with_grads_refuses_forward_only_and_wrong_gradients(fresh_plugins, monkeypatch):
    """Before train timing: a forward-only backend and one with a wrong backward fail, each with why; before
    inference timing both pass (their forwards are right)."""
    from vimbench.measure import verify
    monkeypatch.setattr(verify, "run_isolated", lambda fn, args, timeout=None: {"status": "ok", **fn(*args)})
    vimbench.register_scan_backend("fwd", selective_scan_ref, devices="cpu")
    vimbench.register_scan_backend("wrong", selective_scan_ref, devices="cpu", backward=_dB_one_percent_off)
    lines = []
    assert verify.check_scans(["ref", "fwd", "wrong"], "cpu", lines.append) == {} and len(lines) == 2
    failed = verify.check_scans(["ref", "fwd", "wrong"], "cpu", lines.append, grads=True)
    assert set(failed) == {"fwd", "wrong"}
    assert failed["fwd"].startswith("scan backend 'fwd' (package '(direct call)') is forward-only")
    assert failed["wrong"].startswith("gradient check failed: L1 (1, 4, 1, 4, 0) float32 extras one direction: dB")


def test_vim_parameter_gradients_with_the_cpu_scan_match_ref():
    """A Vim train step's backward through the scan ops: vim_tiny's first 2 layers at 32 px, every parameter's
    gradient with scan='cpu' against scan='ref'."""
    torch.manual_seed(4)
    model = vimbench.create_model("vim_tiny", img_size=32, scan="ref").train()
    del model.layers[2:]
    x = torch.randn(2, 3, 32, 32)
    grads = {}
    for scan in ("ref", "cpu"):
        model.set_scan(scan)
        model.zero_grad()
        model(x).pow(2).mean().backward()
        grads[scan] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, want in grads["ref"].items():
        assert (grads["cpu"][name] - want).abs().max() <= 1e-5 * want.abs().max() + 1e-9, name


@pytest.mark.slow
def test_compiled_training_through_the_scan_ops_has_no_graph_break():
    """torch.compile(fullgraph=True) of both ops' forward and backward (the backward ops in the compiled
    backward graph): the same gradients as eager."""
    torch.manual_seed(5)
    x = _inputs((1, 4, 70, 3, 2), torch.float32, True)

    def loss(**t):
        one = selective_scan(**t, delta_softplus=True, backend="cpu")
        pair = bidirectional_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["u"], t["delta"], t["A"],
                                  t["B"], t["C"], t["D"], z=t["z"], delta_bias=t["delta_bias"], backend="cpu")
        return (one * pair).sum()
    eager = torch.autograd.grad(loss(**x), list(x.values()))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(**x), list(x.values()))
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton", "triton_pipelined", "mamba_ssm"])
def test_backward_ops_fakes_give_each_gradient_its_inputs_shape_and_dtype(backend, fresh_plugins):
    """The backward ops called on meta tensors run each backend's fake (memory prediction of training relies on
    them); a forward-only backend's fake refuses as its backward does."""
    vimbench.register_scan_backend("fwd", selective_scan_ref, devices="cpu")
    with torch.device("meta"):
        (u, delta, A, B, C), kw = scan_case(2, 8, 300, 16, 2, dtype=torch.bfloat16)
        inputs = (u, delta, A, B, C, kw["D"], kw["z"], kw["delta_bias"])
        grads = torch.ops.vimbench.selective_scan_bwd(*inputs, torch.empty_like(u), True, backend)
        pair = torch.ops.vimbench.bidirectional_scan_bwd(u, delta, A, B, C, None, u, delta, A, B, C, kw["D"], None,
                                                         None, kw["delta_bias"], torch.empty_like(u), True, backend)
        with pytest.raises(BackendUnavailable, match="forward-only"):
            torch.ops.vimbench.selective_scan_bwd(*inputs, torch.empty_like(u), True, "fwd")
    assert [(g.shape, g.dtype) for g in grads] == [(t.shape, t.dtype) for t in inputs]
    assert [(g.shape, g.dtype) for g in pair] == [(t.shape, t.dtype) for t in (u, delta, A, B, C) * 2
                                                  + (kw["D"], kw["delta_bias"])]


def test_memory_model_of_training_needs_a_backward_fake(fresh_plugins):
    from vimbench.kernels.selective_scan import has_memory_model
    assert has_memory_model("cpu", train=True) and has_memory_model("mamba_ssm", train=True)
    assert has_memory_model("triton", train=True) and has_memory_model("triton_pipelined", train=True)
    vimbench.register_scan_backend("nobwdfake", selective_scan_ref, devices="cuda", fake=selective_scan_ref,
                                   backward=selective_scan_ref_backward)
    vimbench.register_scan_backend("bwdfake", selective_scan_ref, devices="cuda", fake=selective_scan_ref,
                                   backward=selective_scan_ref_backward, backward_fake=selective_scan_ref_backward)
    assert has_memory_model("nobwdfake") and not has_memory_model("nobwdfake", train=True)
    assert has_memory_model("bwdfake", train=True)
    with pytest.raises(ValueError, match="a backward_fake without a backward"):
        vimbench.register_scan_backend("odd", selective_scan_ref, devices="cpu", backward_fake=selective_scan_ref)
    with pytest.raises(ValueError, match="must be callables"):
        vimbench.register_scan_backend("odd", selective_scan_ref, devices="cpu", backward="not a function")


@pytest.mark.parametrize("backend", ["cpu", "triton", "triton_pipelined"])
def test_backward_fake_never_builds_a_tensor_of_the_whole_state_sequence(backend):
    """At the Vim-Ti 1248 px shape on meta tensors (as memory prediction runs it): the largest tensors of the
    backward's fake are (b, E, L) ones like du, 1/N of b*E*L*N (the cpu scan's chunk start states are 1/64 of
    it; the Triton kernel's checkpoints 1/32 and its per-program dB, dC partials E/BLOCK_E x (b, N, L)), and
    the step loops are skipped."""
    from vimbench.kernels.selective_scan.ops import _bwd_fake
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel, calls = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Largest.calls += 1
            Largest.numel = max([Largest.numel] + [t.numel() for t in torch.utils._pytree.tree_leaves(out)
                                                   if isinstance(t, torch.Tensor)])
            return out

    b, E, L, N = 1, 384, 6085, 16
    with torch.device("meta"):
        (u, delta, A, B, C), kw = scan_case(b, E, L, N, 0)
        with Largest():
            _bwd_fake(backend)(u, delta, A, B, C, kw["D"], kw["z"], kw["delta_bias"], True, torch.empty_like(u))
    assert Largest.numel == b * E * L
    assert Largest.calls < 1000                  # three chunks of batched ops; the step loops would be 3 L calls
