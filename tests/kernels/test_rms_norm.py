"""Vim's residual add + RMSNorm (kernels/rms_norm.py): the reference against the closed-form float64 formula and
the official block's formulation, the compiled kernel against the float64 formula, and the op's fake; the
gradients of both paths against float64 autograd of the formula, and the compiled backward's fake and
determinism."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import assert_close, num_threads
from vimbench.kernels.rms_norm import NORM_IMPLS, add_rms_norm, add_rms_norm_ref
from vimbench.kernels.selective_scan import compiled_cpu

needs_cpp = pytest.mark.skipif(not compiled_cpu.available()[0],
                               reason=f"compiled CPU kernels unavailable: {compiled_cpu.available()[1]}")
EPS = 1e-5


def norm_case(shape, dtype=torch.float32, w_dtype=torch.float32, residual=True, seed=0):
    """x in ``dtype``, a float32 residual (or None) and a (D,) weight in ``w_dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    res = torch.randn(*shape, generator=g) if residual else None
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(w_dtype)
    return x, res, w


def formula64(x, res, w, eps=EPS):
    """residual_out = residual + x; out = residual_out / sqrt(mean(residual_out^2) + eps) * w, in float64."""
    r = x.double() + (0 if res is None else res.double())
    return r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * w.double(), r


def test_reference_is_the_official_block():
    """The torch path computes what the official block does: residual + hidden in float32, then nn.RMSNorm of
    it; in float32 it equals the float64 formula."""
    x, res, w = norm_case((2, 7, 24))
    norm = torch.nn.RMSNorm(24, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(w)
        official = norm(res + x.float())
    out, r = add_rms_norm_ref(x, res, w, EPS)
    assert torch.equal(r, res + x) and torch.equal(out, official)
    ref_out, ref_r = formula64(x, res, w)
    assert_close("out", ref_out, out)


@needs_cpp
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 4, 16), (1, 9, 37), (2, 197, 192)])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("residual", [True, False])
def test_compiled_matches_formula(shape, dtype, w_dtype, residual):
    x, res, w = norm_case(shape, dtype, w_dtype, residual)
    out, r = add_rms_norm(x, res, w, EPS, impl="cpp")
    ref_out, ref_r = formula64(x, res, w)
    assert out.dtype == w_dtype and r.dtype == torch.float32 and out.shape == x.shape == r.shape
    assert torch.equal(r, x.float() + (0 if res is None else res))   # the same float32 add
    assert_close("out", ref_out, out)


@needs_cpp
def test_compiled_reads_strided_inputs():
    x, res, w = norm_case((5, 3, 40))
    x_t, res_t = x.transpose(0, 1), res.transpose(0, 1)     # non-contiguous views
    out, r = add_rms_norm(x_t, res_t, w, EPS, impl="cpp")
    assert_close("out", formula64(x_t, res_t, w)[0], out)


@needs_cpp
def test_compiled_refuses_a_half_residual():
    x, res, w = norm_case((2, 8))
    with pytest.raises(RuntimeError, match="residual must be float32"):
        add_rms_norm(x, res.half(), w, EPS, impl="cpp")


def test_fake_allocates_the_outputs():
    with FakeTensorMode():
        x, w = torch.empty(2, 9, 24, dtype=torch.bfloat16), torch.empty(24, dtype=torch.bfloat16)
        out, r = add_rms_norm(x, torch.empty(2, 9, 24), w, EPS, impl="cpp")
    assert (out.shape, out.dtype, r.shape, r.dtype) == ((2, 9, 24), torch.bfloat16, (2, 9, 24), torch.float32)


def test_unknown_impl():
    x, res, w = norm_case((2, 8))
    with pytest.raises(ValueError, match="unknown add"):
        add_rms_norm(x, res, w, EPS, impl="fast")


def norm_grads(impl, x, res, w, dout, dres):
    """The gradients (x, residual, weight) of sum(out * dout) + sum(residual_out * dres) (dres None: residual_out
    unused, as after norm_f) through ``impl`` (None: float64 autograd of ``formula64``); None for no residual."""
    leaves = [None if t is None else (t.double() if impl is None else t).detach().requires_grad_()
              for t in (x, res, w)]
    if impl is None:
        out, r = formula64(*leaves)
        dout, dres = dout.double(), None if dres is None else dres.double()
    else:
        out, r = add_rms_norm(leaves[0], leaves[1], leaves[2], EPS, impl=impl)
    torch.autograd.backward((out,) if dres is None else (out, r), (dout,) if dres is None else (dout, dres))
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("impl", [pytest.param(i, marks=needs_cpp) if i == "cpp" else i for i in NORM_IMPLS])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (1, 9, 37), (2, 197, 192)])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("residual,stream", [(True, True), (False, True), (True, False)])
def test_gradients_match_float64_autograd(impl, shape, dtype, w_dtype, residual, stream):
    """dx in x's dtype, dresidual float32, dweight in weight's dtype, each against float64 autograd of the
    formula; with the residual stream's gradient (``stream``) and without (norm_f's residual_out is unused)."""
    x, res, w = norm_case(shape, dtype, w_dtype, residual)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(*shape, generator=g).to(w_dtype)
    dres = torch.randn(*shape, generator=g) if stream else None
    for name, ref, out, arg in zip(("dx", "dresidual", "dweight"), norm_grads(None, x, res, w, dout, dres),
                                   norm_grads(impl, x, res, w, dout, dres), (x, res, w)):
        if arg is None:
            assert out is None, name
            continue
        assert out.dtype == arg.dtype and out.shape == arg.shape, name
        # the torch path normalises residual_out rounded to a bf16 weight's dtype (module docstring)
        assert_close(name, ref, out, w_dtype if impl == "torch" and w_dtype != torch.float32 else None)


@needs_cpp
def test_compiled_backward_is_deterministic_across_thread_counts():
    """dweight is summed per block of rows, then over blocks in order: bitwise the same with 1 and 2 threads."""
    x, res, w = norm_case((4, 600, 40))
    dout, dres = torch.randn(4, 600, 40), torch.randn(4, 600, 40)
    with num_threads(1):
        one = norm_grads("cpp", x, res, w, dout, dres)
    with num_threads(2):
        two = norm_grads("cpp", x, res, w, dout, dres)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_cpp
@pytest.mark.parametrize("residual", [True, False])
def test_backward_fake_allocates_what_the_kernel_does(residual):
    x, res, w = norm_case((2, 9, 24), torch.bfloat16, torch.bfloat16, residual)
    _, r = add_rms_norm(x, res, w, EPS, impl="cpp")
    args = (torch.randn(2, 9, 24).to(torch.bfloat16), torch.randn(2, 9, 24), r, w, EPS, x.dtype, residual)
    real = torch.ops.vimbench_cpu.add_rms_norm_bwd(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.vimbench_cpu.add_rms_norm_bwd(*(mode.from_tensor(t) if torch.is_tensor(t) else t
                                                         for t in args))
    for rt, ft in zip(real, fake):
        assert (ft.shape, ft.dtype, ft.stride()) == (rt.shape, rt.dtype, rt.stride())
    assert real[1].shape == ((2, 9, 24) if residual else (0,))


@needs_cpp
def test_compiled_training_graph_has_no_break_and_the_eager_gradients():
    """torch.compile (fullgraph, AOT autograd) traces the op's forward and backward through their fakes; the
    compiled gradients equal the eager ones."""
    x, res, w = norm_case((2, 9, 24))
    dout, dres = torch.randn(2, 9, 24), torch.randn(2, 9, 24)
    fn = torch.compile(lambda *a: add_rms_norm(*a, EPS, impl="cpp"), backend="aot_eager", fullgraph=True)
    leaves = [t.detach().requires_grad_() for t in (x, res, w)]
    torch.autograd.backward(fn(*leaves), (dout, dres))
    for name, eager, t in zip(("dx", "dresidual", "dweight"), norm_grads("cpp", x, res, w, dout, dres), leaves):
        assert torch.equal(eager, t.grad), name
