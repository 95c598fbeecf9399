"""The compiled Triton scan on a real GPU against the sequential reference (skipped without CUDA).

Run by `vimbench gpu-check` on a GPU. Every case draws fresh random inputs (the seed is in the test
output on failure) and poisons the output buffers with NaN before the kernel runs, so unwritten elements
fail. Shapes include the Vim-Ti/S/B widths at 224 and 1248 px. The backward: every gradient against float64
autograd of the reference, and against mamba_ssm's backward when it imports. Also: the memory model's SDPA kernel
choice against the kernel SDPA runs on this card.
"""
import importlib.util
import os

import pytest
import torch

from helpers import assert_close, assert_grads_close, scan_case
from vimbench.kernels.selective_scan.ref import selective_scan_ref
from vimbench.kernels.selective_scan import bidirectional_scan_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (batch, E, L, N, G), G = 0: the 3-dim (batch, N, L) form of B and C
SHAPES = [(1, 384, 197, 16, 0), (2, 384, 6085, 16, 0), (1, 768, 2117, 16, 0), (1, 1536, 197, 16, 0),
          (3, 100, 1000, 16, 2), (1, 33, 4097, 16, 0), (2, 64, 1, 16, 0), (4, 96, 333, 8, 3), (1, 40, 2049, 5, 4)]
IDS = ["vimTi-224", "vimTi-1248-b2", "vimS-738", "vimB-224", "E100-G2", "E33-L4097", "L1", "N8-G3", "N5-G4"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DESIGNS = ["triton", "triton_pipelined"]  # triton_kernel.DESIGNS


@pytest.fixture
def fresh_seed():
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def _cuda(args, kw):
    return tuple(a.cuda() for a in args), {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("extras", [True, False], ids=["D-z-bias-softplus", "plain"])
@pytest.mark.parametrize("design", DESIGNS)
def test_scan_cuda_matches_ref(shape, dtype, extras, design, fresh_seed):
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton
    args, kw = _cuda(*scan_case(*shape, dtype=dtype, extras=extras))
    ref, ref_h = selective_scan_ref(*args, **kw, return_last_state=True)
    out, h = selective_scan_triton(*args, **kw, return_last_state=True, design=design)
    assert_close(f"out (seed {fresh_seed})", ref, out, dtype)
    assert_close(f"last_state (seed {fresh_seed})", ref_h, h, torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("design", DESIGNS)
def test_bidirectional_cuda_matches_ref(shape, dtype, design, fresh_seed):
    from vimbench.kernels.selective_scan.triton_kernel import bidirectional_scan_triton
    (u, d, A, B, C), kw = _cuda(*scan_case(*shape, dtype=dtype, extras=True))
    (ub, db, Ab, Bb, Cb), kwb = _cuda(*scan_case(*shape, dtype=dtype, extras=True))
    args = (u, d, A, B, C, kw["D"], ub, db, Ab, Bb, Cb, kwb["D"], kw["z"], kw["delta_bias"], kwb["delta_bias"], True)
    assert_close(f"bidirectional (seed {fresh_seed})", bidirectional_scan_ref(*args),
                 bidirectional_scan_triton(*args, design=design), dtype)


@pytest.mark.parametrize("design", DESIGNS)
def test_vim_tiny_triton_matches_ref_on_cuda(design, fresh_seed):
    """fp32 only: in bf16 the 24 layers amplify the scans' last-bit differences past the per-op tolerance."""
    import vimbench
    model = vimbench.create_model("vim_tiny", img_size=224, scan="ref").eval().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        ref = model.forward_features(x)
        model.set_scan(design)
        out = model.forward_features(x)
    assert_close(f"vim_tiny forward_features (seed {fresh_seed})", ref, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_kernel_model_matches_the_dispatcher(dtype):
    """The memory model's SDPA choice (torch's rules, ``sdpa_fused_kernel``) against the kernel the
    dispatcher runs on this card at DeiT's head_dim 64 (``sdpa_kernel_used``)."""
    from vimbench.kernels.attention import sdpa_fused_kernel, sdpa_kernel_used
    assert sdpa_fused_kernel(dtype) == sdpa_kernel_used("cuda", dtype, 197, 64, 3)


# The backward: Vim-Ti at 224 and 1248 px, and awkward shapes (groups, N padded, E tails, L = 1)
BWD_SHAPES = [(2, 384, 197, 16, 0), (1, 384, 6085, 16, 0), (3, 100, 1000, 16, 2), (1, 40, 2049, 5, 4),
              (2, 64, 1, 16, 0)]
BWD_IDS = ["vimTi-224-b2", "vimTi-1248", "E100-G2", "N5-G4", "L1"]


def _backward_inputs(shape, dtype):
    args, kw = _cuda(*scan_case(*shape, dtype=dtype, extras=True))
    return (*args, kw["D"], kw["z"], kw["delta_bias"], True), torch.randn(args[0].shape, device="cuda").to(dtype)


@pytest.mark.parametrize("shape", BWD_SHAPES, ids=BWD_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("design", DESIGNS)
def test_backward_cuda_matches_float64_autograd_of_ref(shape, dtype, design, fresh_seed):
    from vimbench.kernels.selective_scan.ref import selective_scan_ref_backward
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton_backward
    inputs, dout = _backward_inputs(shape, dtype)
    want = selective_scan_ref_backward(*(t.double() if torch.is_tensor(t) else t for t in inputs), dout.double())
    got = selective_scan_triton_backward(*inputs, dout, design=design)
    assert_grads_close(want, got, dtype)


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba_ssm")
@pytest.mark.parametrize("shape", BWD_SHAPES[:2], ids=BWD_IDS[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("design", DESIGNS)
def test_backward_cuda_matches_mamba_ssm(shape, dtype, design, fresh_seed):
    """Against mamba_ssm's own CUDA backward (float32 math in both), by the gradient check's rule."""
    from vimbench.kernels.selective_scan.backends import scan_backward
    inputs, dout = _backward_inputs(shape, dtype)
    assert_grads_close(scan_backward("mamba_ssm")(*inputs, dout), scan_backward(design)(*inputs, dout), dtype)
