"""The compiled CPU scan's backward (vimbench_cpu::selective_scan_bwd, bidirectional_scan_bwd, reached through the
autograd registered on the forward ops) against float64 autograd of the sequential reference (ref.py).

Every gradient (u, delta, A, B, C, D, z, delta_bias; both directions of the pair) on the awkward shapes of
check.CASES (L = 1, odd L, several tiles, E not a multiple of the vector width, groups G = 2 and 4, N = 17),
with and without D / z / delta_bias / softplus, channel-major and time-major inputs, float32 and bfloat16.
Tolerance: check.TOLERANCES of the input dtype, with atol relative to the gradient's largest magnitude
(gradients are sums over time and channels, so their scale varies by orders of magnitude between inputs).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.kernels.selective_scan.check import CASES, TOLERANCES, scan_case
from vimbench.kernels.selective_scan.ops import scan_bwd_flops, scan_flops
from vimbench.kernels.selective_scan.ref import bidirectional_scan_ref, selective_scan_ref

ok, why = compiled_cpu.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"compiled CPU scan unavailable: {why}")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def time_major(x):
    """x with the same values in time-major memory: (b, E, L) with stride 1 along E, B / C with stride 1 along N."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def inputs(case, dtype, extras, layout, seed=0):
    """(u, delta, A, B, C, D, z, delta_bias) of check.scan_case (None where absent) and delta_softplus."""
    torch.manual_seed(seed)
    (u, delta, A, B, C), kw = scan_case(*CASES[case], dtype=dtype, extras=extras)
    xs = [u, delta, A, B, C, kw.get("D"), kw.get("z"), kw.get("delta_bias")]
    if layout == "time-major":
        xs = [time_major(x) if x is not None and x.dim() >= 3 else x for x in xs]
    return xs, extras


def leaves(xs, dtype=None):
    return [None if x is None else (x.detach().to(dtype) if dtype else x.detach().clone()).requires_grad_()
            for x in xs]


def assert_grads(got, want, dtype, names):
    tol = TOLERANCES[dtype]
    for name, g, x64 in zip(names, got, want):
        if x64 is None:
            assert g is None, name
            continue
        ref = x64.grad
        assert g.grad.shape == ref.shape and g.grad.dtype == g.dtype, name
        err = (g.grad.double() - ref).abs()
        bound = tol["rtol"] * ref.abs() + tol["atol"] * max(ref.abs().max().item(), 1e-6)
        assert torch.isfinite(g.grad).all() and (err <= bound).all(), \
            f"d{name}: max abs err {err.max().item():.3g}, gradient scale {ref.abs().max().item():.3g}"


def compare_backward(scan, ref, xs, softplus, dtype, names):
    """Backpropagates one random dout (in dtype) through ``scan`` on xs and through ``ref`` on xs in float64;
    asserts every gradient; returns scan's leaves."""
    x, x64 = leaves(xs), leaves(xs, torch.float64)
    out = scan(*x, delta_softplus=softplus)
    dout = torch.randn(out.shape).to(dtype)
    out.backward(dout)
    ref(*x64, delta_softplus=softplus).backward(dout.double())
    assert_grads(x, x64, dtype, names)
    return x


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extras", [True, False])
@pytest.mark.parametrize("layout", ["channel-major", "time-major"])
def test_selective_scan_grads(case, dtype, extras, layout):
    xs, softplus = inputs(case, dtype, extras, layout)
    x = compare_backward(compiled_cpu.selective_scan_compiled, selective_scan_ref, xs, softplus, dtype, NAMES)
    if layout == "time-major" and xs[0].shape[1] > 1 and xs[0].shape[2] > 1:
        assert x[0].grad.transpose(1, 2).is_contiguous() and x[1].grad.transpose(1, 2).is_contiguous()


def test_last_state_grad():
    """The gradient of the last state starts the reverse recurrence."""
    xs, softplus = inputs("G2-multi-chunk", torch.float32, True, "time-major")
    x, x64 = leaves(xs), leaves(xs, torch.float64)
    out, last = compiled_cpu.selective_scan_compiled(*x, delta_softplus=softplus, return_last_state=True)
    w_out, w_last = torch.randn(out.shape), torch.randn(last.shape)
    ((out * w_out).sum() + (last * w_last).sum()).backward()
    o64, l64 = selective_scan_ref(*x64, delta_softplus=softplus, return_last_state=True)
    ((o64 * w_out.double()).sum() + (l64 * w_last.double()).sum()).backward()
    assert_grads(x, x64, torch.float32, NAMES)


BIDIR_NAMES = ("u", "delta", "A", "B", "C", "D", "u_b", "delta_b", "A_b", "B_b", "C_b", "D_b", "z", "delta_bias",
               "delta_bias_b")


def pair_inputs(case, dtype, extras, layout):
    f, softplus = inputs(case, dtype, extras, layout, seed=1)
    r, _ = inputs(case, dtype, extras, layout, seed=2)
    return [*f[:6], *r[:6], f[6], f[7], r[7]], softplus


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extras", [True, False])
@pytest.mark.parametrize("layout", ["channel-major", "time-major"])
def test_bidirectional_grads(case, dtype, extras, layout):
    xs, softplus = pair_inputs(case, dtype, extras, layout)
    compare_backward(compiled_cpu.bidirectional_scan_compiled, bidirectional_scan_ref, xs, softplus, dtype,
                     BIDIR_NAMES)


def test_bidirectional_groups_differ():
    """Forward direction grouped (G = 2), backward direction ungrouped: lanes respect both group sizes."""
    f, _ = inputs("G2-multi-chunk", torch.float32, True, "time-major", seed=3)
    r, _ = inputs("G2-multi-chunk", torch.float32, True, "time-major", seed=4)
    r[3], r[4] = r[3][:, 0], r[4][:, 0]
    xs = [*f[:6], *r[:6], f[6], f[7], r[7]]
    x, x64 = leaves(xs), leaves(xs, torch.float64)
    dout = torch.randn(xs[0].shape)
    compiled_cpu.bidirectional_scan_compiled(*x).backward(dout)
    bidirectional_scan_ref(*x64).backward(dout.double())
    assert_grads(x, x64, torch.float32, BIDIR_NAMES)


def test_flops_count_forward_and_backward():
    """FlopCounterMode sees the backward op through autograd, with scan_bwd_flops' count."""
    xs, softplus = inputs("E37-N17", torch.float32, True, "channel-major")
    x = leaves(xs)
    with FlopCounterMode(display=False) as counter:
        compiled_cpu.selective_scan_compiled(*x, delta_softplus=softplus).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    b, E, L, N, _ = CASES["E37-N17"]
    flags = dict(has_D=True, has_z=True, has_delta_bias=True, delta_softplus=True)
    assert counts["vimbench_cpu.selective_scan_fwd"] == scan_flops(b, E, L, N, **flags)
    assert counts["vimbench_cpu.selective_scan_bwd"] == scan_bwd_flops(b, E, L, N, **flags)


@pytest.mark.parametrize("op", ["selective_scan_bwd", "bidirectional_scan_bwd"])
def test_backward_fakes(op):
    """The backward ops' fakes give the real gradients' shapes, dtypes and strides."""
    ops = torch.ops.vimbench_cpu
    if op == "selective_scan_bwd":
        xs, softplus = inputs("G4-L129", torch.bfloat16, True, "time-major")
        states = ops.selective_scan_fwd(*xs, softplus, True, True)[2]
        args = (*xs, torch.randn(xs[0].shape).to(torch.bfloat16), None, states, softplus)
    else:
        xs, softplus = pair_inputs("odd-L", torch.float32, False, "time-major")
        _, states, states_b = ops.bidirectional_scan_fwd(*xs, softplus, True, True)
        args = (*xs, torch.randn(xs[0].shape), states, states_b, softplus)
    torch.library.opcheck(getattr(ops, op), args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("op", ["selective_scan_fwd", "bidirectional_scan_fwd"])
def test_forward_fakes_count_the_kept_states(op, keep):
    """The forward ops' fakes give the real outputs' shapes, dtypes and strides, the kept states included (so that
    fake-tensor memory tracking counts what autograd saves)."""
    if op == "selective_scan_fwd":
        xs, softplus = inputs("G2-multi-chunk", torch.float32, True, "time-major")
    else:
        xs, softplus = pair_inputs("E37-N17", torch.bfloat16, True, "channel-major")
    torch.library.opcheck(getattr(torch.ops.vimbench_cpu, op), (*xs, softplus, False, keep),
                          test_utils=("test_schema", "test_faketensor"))


def test_kept_states_are_the_states_entering_each_tile():
    """keep_states returns (b, ceil(L / 16), N, E) float32: tile k's entry is the state after the first 16 k steps,
    the last state of the reference on that prefix (zero for k = 0); the reverse direction of the pair enters tile
    k from above: the reference's last state on the flipped suffix from 16 (k + 1)."""
    xs, softplus = pair_inputs("G2-multi-chunk", torch.float32, True, "time-major")
    _, states, states_b = torch.ops.vimbench_cpu.bidirectional_scan_fwd(*xs, softplus, True, True)
    b, E, L = xs[0].shape
    T, N = -(-L // 16), xs[2].shape[1]
    assert states.shape == states_b.shape == (b, T, N, E) and states.dtype == torch.float32

    def prefix_state(u, delta, A, B, C, D, bias, t, flip):
        cut = (lambda x: x.flip(-1)[..., :L - t]) if flip else (lambda x: x[..., :t])
        _, last = selective_scan_ref(cut(u), cut(delta), A, cut(B), cut(C), D, delta_bias=bias,
                                     delta_softplus=softplus, return_last_state=True)
        return last.transpose(1, 2)
    f = dict(zip(("u", "delta", "A", "B", "C", "D"), xs[:6]), bias=xs[13])
    r = dict(zip(("u", "delta", "A", "B", "C", "D"), xs[6:12]), bias=xs[14])
    for k in range(T):
        want_f = prefix_state(**f, t=16 * k, flip=False) if k else torch.zeros(b, N, E)
        want_b = prefix_state(**r, t=min(16 * (k + 1), L), flip=True) if k < T - 1 else torch.zeros(b, N, E)
        torch.testing.assert_close(states[:, k], want_f.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(states_b[:, k], want_b.float(), rtol=1e-4, atol=1e-5)


def test_compile_training_has_no_graph_break():
    """torch.compile of forward + backward through the pair traces in one graph (fullgraph) with the same
    gradients as eager."""
    xs, softplus = pair_inputs("G2-multi-chunk", torch.float32, True, "time-major")

    def loss(*a):
        return compiled_cpu.bidirectional_scan_compiled(*a, delta_softplus=softplus).square().sum()

    torch._dynamo.reset()
    x, y = leaves(xs), leaves(xs)
    torch.compile(loss, backend="aot_eager", fullgraph=True)(*x).backward()
    loss(*y).backward()
    for name, a, b in zip(BIDIR_NAMES, x, y):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6, msg=name)
