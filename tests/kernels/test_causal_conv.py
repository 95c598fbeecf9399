"""Vim's causal conv pair (kernels/causal_conv.py): the compiled kernel against the float64 reference, the
reference against the official flipped formulation, the op's fake and FLOP formula; the gradients of both paths
against float64 autograd of the reference, and the compiled backward's fake, FLOP formula and determinism."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_close, num_threads
from vimbench.kernels.causal_conv import CONV_IMPLS, causal_conv1d_pair, causal_conv1d_pair_ref
from vimbench.kernels.selective_scan import compiled_cpu

needs_cpp = pytest.mark.skipif(not compiled_cpu.available()[0],
                               reason=f"compiled CPU kernels unavailable: {compiled_cpu.available()[1]}")


def conv_case(b, E, L, K, dtype=torch.float32, time_major=True, bias=True, seed=0):
    """x (b, E, L) in ``dtype``, as a view of an in_proj-like (b, L, 2E) output when time_major (stride 1
    along E), else contiguous; weights (E, 1, K) and biases (E,) float32."""
    g = torch.Generator().manual_seed(seed)
    if time_major:
        x = torch.randn(b, L, 2 * E, generator=g).to(dtype)[:, :, :E].transpose(1, 2)
    else:
        x = torch.randn(b, E, L, generator=g).to(dtype)
    w_f, w_b = (torch.randn(E, 1, K, generator=g) * 0.5 for _ in range(2))
    b_f, b_b = (torch.randn(E, generator=g) if bias else None for _ in range(2))
    return x, w_f, b_f, w_b, b_b


def ref64(x, w_f, b_f, w_b, b_b):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return causal_conv1d_pair_ref(d(x), d(w_f), d(b_f), d(w_b), d(b_b))


def test_reference_matches_the_official_flipped_conv():
    x, w_f, b_f, w_b, b_b = (t.double() for t in conv_case(2, 6, 9, 4))
    x_f, x_b = causal_conv1d_pair_ref(x, w_f, b_f, w_b, b_b)
    # the official mixer: conv1d with padding K-1 keeping the first L outputs, on x and on flip(x)
    official_f = F.silu(F.conv1d(x, w_f, b_f, padding=3, groups=6)[..., :9])
    official_b = F.silu(F.conv1d(x.flip(-1), w_b, b_b, padding=3, groups=6)[..., :9]).flip(-1)
    torch.testing.assert_close(x_f, official_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_b, official_b, rtol=1e-12, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("b,E,L,K", [(1, 16, 1, 4), (2, 37, 7, 4), (1, 48, 130, 4), (2, 5, 3, 4), (1, 20, 11, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("time_major", [True, False])
def test_compiled_matches_reference(b, E, L, K, dtype, time_major):
    args = conv_case(b, E, L, K, dtype, time_major)
    ref_f, ref_b = ref64(*args)
    out_f, out_b = causal_conv1d_pair(*args, impl="cpp")
    assert out_f.dtype == dtype and out_b.dtype == dtype
    assert_close("x_f", ref_f, out_f)
    assert_close("x_b", ref_b, out_b)
    if E > 1 and L > 1:   # time-major memory, what x_proj reads without a copy
        assert out_f.transpose(1, 2).is_contiguous() and out_b.transpose(1, 2).is_contiguous()


@needs_cpp
def test_compiled_without_bias():
    args = conv_case(1, 24, 10, 4, bias=False)
    for out, ref in zip(causal_conv1d_pair(*args, impl="cpp"), ref64(*args)):
        assert_close("no bias", ref, out)


@needs_cpp
def test_fake_and_flops_agree_with_the_torch_path():
    x, w_f, b_f, w_b, b_b = (t.to("meta") for t in conv_case(2, 32, 50, 4))
    counts = {}
    for impl in ("torch", "cpp"):
        with FlopCounterMode(display=False) as fc:
            out_f, out_b = causal_conv1d_pair(x, w_f, b_f, w_b, b_b, impl=impl)
        counts[impl] = fc.get_total_flops()
        assert out_f.shape == out_b.shape == (2, 32, 50)
    assert counts["torch"] == counts["cpp"] == 2 * (2 * 2 * 32 * 50 * 4)  # two convs, 2 FLOPs per MAC
    assert out_f.transpose(1, 2).is_contiguous()    # the cpp fake is time-major, as the kernel's output


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown causal conv implementation 'cuda'"):
        causal_conv1d_pair(*conv_case(1, 4, 4, 4), impl="cuda")


def grads(impl, x, w_f, b_f, w_b, b_b, dx_f, dx_b):
    """The gradients (x, w_f, b_f, w_b, b_b) of sum(x_f * dx_f + x_b * dx_b) through ``impl`` (None: float64
    autograd of the reference); None for an absent bias."""
    leaves = [None if t is None else (t.double() if impl is None else t).detach().requires_grad_()
              for t in (x, w_f, b_f, w_b, b_b)]
    if impl is None:
        x_f, x_b = causal_conv1d_pair_ref(*leaves)
        dx_f, dx_b = dx_f.double(), dx_b.double()
    else:
        x_f, x_b = causal_conv1d_pair(*leaves, impl=impl)
    torch.autograd.backward((x_f, x_b), (dx_f, dx_b))
    return [None if t is None else t.grad for t in leaves]


# L = 1, L < K, E = 1, E not a multiple of 16, K = 3, several blocks of rows
GRAD_SHAPES = [(1, 16, 1, 4), (2, 37, 7, 4), (2, 5, 3, 4), (2, 1, 6, 4), (1, 20, 11, 3), (1, 48, 130, 4)]


@pytest.mark.parametrize("impl", [pytest.param(i, marks=needs_cpp) if i == "cpp" else i for i in CONV_IMPLS])
@pytest.mark.parametrize("b,E,L,K", GRAD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("time_major,bias", [(True, True), (False, True), (True, False)])
def test_gradients_match_float64_autograd(impl, b, E, L, K, dtype, time_major, bias):
    """dx in x's dtype, the weights' and biases' gradients in theirs, each against float64 autograd of the
    reference. The compiled path takes float32 parameters with a bf16 x; F.conv1d needs x's dtype for all."""
    args = conv_case(b, E, L, K, dtype, time_major, bias)
    if impl == "torch":
        args = (args[0], *(None if t is None else t.to(dtype) for t in args[1:]))
    g = torch.Generator().manual_seed(1)
    dys = [torch.randn(b, E, L, generator=g).to(dtype) for _ in range(2)]
    names = ("dx", "dw_f", "db_f", "dw_b", "db_b")
    for name, ref, out, arg in zip(names, grads(None, *args, *dys), grads(impl, *args, *dys), args):
        if arg is None:
            assert out is None, name
            continue
        assert out.dtype == arg.dtype and out.shape == arg.shape, name
        assert_close(name, ref, out)


@needs_cpp
def test_compiled_backward_takes_two_dim_weights():
    x, w_f, b_f, w_b, b_b = conv_case(2, 21, 9, 4)
    dys = torch.randn(2, 2, 21, 9).unbind(0)
    ref = grads(None, x, w_f, b_f, w_b, b_b, *dys)
    out = grads("cpp", x, w_f.squeeze(1), b_f, w_b.squeeze(1), b_b, *dys)
    assert out[1].shape == out[3].shape == (21, 4)
    for name, r, o in zip(("dx", "dw_f", "db_f", "dw_b", "db_b"), ref, out):
        assert_close(name, r.reshape(o.shape), o)


@needs_cpp
def test_compiled_backward_is_deterministic_across_thread_counts():
    """dw and db are summed per block of rows, then over blocks in order: bitwise the same with 1 and 2 threads
    (several blocks per batch element here)."""
    args = conv_case(2, 40, 700, 4)
    dys = torch.randn(2, 2, 40, 700).unbind(0)
    with num_threads(1):
        one = grads("cpp", *args, *dys)
    with num_threads(2):
        two = grads("cpp", *args, *dys)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
def test_backward_fake_allocates_what_the_kernel_does(bias):
    """The fake's shapes, dtypes and strides are the kernel's: dx time-major (here from a contiguous x), the
    parameters' gradients in their shapes, an absent bias's empty."""
    args = conv_case(2, 19, 6, 4, torch.bfloat16, time_major=False, bias=bias)
    dys = [torch.randn(2, 19, 6).to(torch.bfloat16) for _ in range(2)]
    real = torch.ops.vimbench_cpu.causal_conv1d_pair_bwd(*args, *dys)
    with FakeTensorMode() as mode:
        fake = torch.ops.vimbench_cpu.causal_conv1d_pair_bwd(*(None if t is None else mode.from_tensor(t)
                                                                for t in (*args, *dys)))
    for r, f in zip(real, fake):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())
    assert real[0].transpose(1, 2).is_contiguous() and real[2].shape == ((19,) if bias else (0,))


@needs_cpp
def test_backward_flops_count_the_input_and_weight_gradients():
    """Forward + backward of the cpp path: 3 * 2 * (2 b E L K), i.e. per direction the forward conv, its input
    gradient and its weight gradient, 2 FLOPs per multiply-add. (The torch path's count differs: this torch's
    formula for aten.convolution_backward ignores groups in the weight gradient, counting a depthwise conv's
    E times over; fixed upstream in pytorch/pytorch#183405.)"""
    x, w_f, b_f, w_b, b_b = (t.to("meta").requires_grad_() for t in conv_case(2, 32, 50, 4))
    with FlopCounterMode(display=False) as fc:
        out_f, out_b = causal_conv1d_pair(x, w_f, b_f, w_b, b_b, impl="cpp")
        torch.autograd.backward((out_f, out_b), (torch.ones_like(out_f), torch.ones_like(out_b)))
    assert fc.get_total_flops() == 3 * 2 * (2 * 2 * 32 * 50 * 4)


@needs_cpp
def test_compiled_training_graph_has_no_break_and_the_eager_gradients():
    """torch.compile (fullgraph, AOT autograd) traces the op's forward and backward through their fakes; the
    compiled gradients equal the eager ones."""
    args = conv_case(2, 21, 9, 4)
    dys = torch.randn(2, 2, 21, 9).unbind(0)
    fn = torch.compile(lambda *a: causal_conv1d_pair(*a, impl="cpp"), backend="aot_eager", fullgraph=True)
    leaves = [t.detach().requires_grad_() for t in args]
    torch.autograd.backward(fn(*leaves), dys)
    for name, eager, t in zip(("dx", "dw_f", "db_f", "dw_b", "db_b"), grads("cpp", *args, *dys), leaves):
        assert torch.equal(eager, t.grad), name


@needs_cpp
def test_compiled_saturated_silu_forward_and_backward():
    """Pre-activations far past exp's float32 range (|v| up to 1000, and just beyond ±88.7) in whole vectors
    of channels: outputs and gradients finite and equal to the float64 reference."""
    bias = torch.tensor([-1000., -100., -88.8, -88.5, -87., -20., -1., 0., 1., 20., 87., 88.5, 88.8, 100., 1000., 3.])
    x, w = torch.ones(1, 16, 6), torch.zeros(16, 1, 4)
    args = (x, w, bias, w, -bias)
    for out, ref in zip(causal_conv1d_pair(*args, impl="cpp"), ref64(*args)):
        assert_close("x_f, x_b", ref, out)
    dys = torch.randn(2, 1, 16, 6).unbind(0)
    names = ("dx", "dw_f", "db_f", "dw_b", "db_b")
    for name, ref, out in zip(names, grads(None, *args, *dys), grads("cpp", *args, *dys)):
        assert_close(name, ref, out)
