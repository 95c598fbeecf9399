"""The Triton scan (kernels/scan_triton.py) against the sequential reference, under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when a kernel is decorated, and the rest of the suite needs the compiled
(non-interpreted) kernels and 'triton needs CUDA' on CPU. So the interpreter cases run in a child pytest
process with TRITON_INTERPRET=1 (``test_interpreter_cases``) and are skipped in the parent; run
``TRITON_INTERPRET=1 pytest tests/test_scan_triton.py`` to see them one by one.

Every output buffer the launcher allocates is filled with NaN first, so unwritten elements fail.
"""
import os
import subprocess
import sys

import pytest
import torch

from helpers import assert_close, scan_case
from vimbench.kernels.selective_scan.ref import selective_scan_ref
from vimbench.kernels.selective_scan import bidirectional_scan_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the child process of test_interpreter_cases")

# (batch, E, L, N, G): G = 0 means the 3-dim (batch, N, L) form of B and C. The kernel's programs cover 32
# channels of one group and step through L in tiles of 4 tokens; N is padded to a power of two.
SHAPES = [(1, 32, 1, 16, 0), (2, 40, 37, 16, 2), (1, 72, 30, 8, 1), (2, 8, 19, 5, 4), (1, 96, 6, 16, 3)]
IDS = ["L1", "odd-L-G2-20-channel-groups", "L30-8-tiles-E72-tail-block", "N5-padded-G4", "E96-G3"]



DESIGNS = ["triton", "triton_pipelined"]  # triton_kernel.DESIGNS: 1 warp / 32 channels; 4 warps / 128, pipelined


@interpreter_only
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("extras", [True, False], ids=["D-z-bias-softplus", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scan_matches_ref(shape, extras, dtype, design):
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton
    args, kw = scan_case(*shape, dtype=dtype, extras=extras)
    ref, ref_h = selective_scan_ref(*args, **kw, return_last_state=True)
    out, h = selective_scan_triton(*args, **kw, return_last_state=True, design=design)
    assert out.dtype == dtype and h.dtype == torch.float32
    assert_close("out", ref, out, dtype)
    assert_close("last_state", ref_h, h, torch.float32)
    assert_close("out without last state", ref, selective_scan_triton(*args, **kw, design=design), dtype)


@interpreter_only
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bidirectional_matches_ref(shape, dtype, design):
    from vimbench.kernels.selective_scan.triton_kernel import bidirectional_scan_triton
    (u, delta, A, B, C), kw = scan_case(*shape, dtype=dtype, extras=True)
    (u_b, delta_b, A_b, B_b, C_b), kw_b = scan_case(*shape, dtype=dtype, extras=True)
    args = (u, delta, A, B, C, kw["D"], u_b, delta_b, A_b, B_b, C_b, kw_b["D"], kw["z"], kw["delta_bias"],
            kw_b["delta_bias"], True)
    out = bidirectional_scan_triton(*args, design=design)
    assert_close("bidirectional", bidirectional_scan_ref(*args), out, dtype)


@interpreter_only
@pytest.mark.parametrize("missing", ["D_b-bias_b-z", "D-bias"])
def test_bidirectional_optional_inputs(missing):
    """One direction without D or delta_bias (zeros are substituted), no gate, no softplus."""
    from vimbench.kernels.selective_scan.triton_kernel import bidirectional_scan_triton
    (u, delta, A, B, C), kw = scan_case(2, 40, 9, 16, 2, torch.float32, extras=True)
    D, D_b, bias, bias_b, z = kw["D"], kw["D"] * 2, kw["delta_bias"], kw["delta_bias"] + 1, kw["z"]
    if missing == "D_b-bias_b-z":
        D_b = bias_b = z = None
    else:
        D = bias = None
    args = (u, delta, A, B, C, D, u.flip(0), delta * 2, A / 2, B.flip(1), C, D_b, z, bias, bias_b, False)
    assert_close("bidirectional", bidirectional_scan_ref(*args), bidirectional_scan_triton(*args))


@interpreter_only
@pytest.mark.parametrize("design", DESIGNS)
def test_vim_model_with_triton_scan_matches_ref(design):
    """vim_tiny's forward (5 tokens, its first 2 of 24 layers to keep the interpreter fast) with each
    Triton design as its scan backend against scan='ref'."""
    import vimbench
    model = vimbench.create_model("vim_tiny", img_size=32, scan="ref").eval()
    del model.layers[2:]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x)
        model.set_scan(design)
        out = model.forward_features(x)
    assert_close("forward_features", ref, out)


@interpreter_only
@pytest.mark.parametrize("design", DESIGNS)
def test_backward_is_refused_as_forward_only(design):
    """No Triton backward yet: the forward runs, its backward raises BackendUnavailable naming why, and the
    gradient check reports the backend forward-only instead of failing it."""
    from vimbench.errors import BackendUnavailable
    from vimbench.kernels.selective_scan import bidirectional_scan, selective_scan
    from vimbench.kernels.selective_scan.check import check_named_backend
    (u, delta, A, B, C), kw = scan_case(1, 32, 5, 16, 0)
    u.requires_grad_()
    with pytest.raises(BackendUnavailable, match=f"scan backend '{design}' is forward-only: the Triton kernel"):
        selective_scan(u, delta, A, B, C, **kw, backend=design).sum().backward()
    with pytest.raises(BackendUnavailable, match="is forward-only"):
        bidirectional_scan(u, delta, A, B, C, None, u, delta, A, B, C, None, backend=design).sum().backward()
    result = check_named_backend(design, "cpu", grads=True)
    assert result["check_ok"] and result["forward_only"].startswith(f"scan backend '{design}' is forward-only")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the parent test that starts the interpreter run")
def test_interpreter_cases():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" in proc.stdout  # the cases ran; the parent test skipped
