"""Vim's causal conv pair (kernels/causal_conv.py): the compiled kernel against the float64 reference, the
reference against the official flipped formulation, and the op's fake and FLOP formula."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_close
from vimbench.kernels.causal_conv import causal_conv1d_pair, causal_conv1d_pair_ref
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
