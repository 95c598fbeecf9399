"""The Triton scan (kernels/selective_scan/triton_kernel.py), forward and backward, against the sequential
reference (its gradients: float64 autograd of it), under TRITON_INTERPRET=1.

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

from helpers import assert_close, assert_grads_close, poison_empty, scan_case
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


# The backward checkpoints the state every BWD_CHUNK = 32 tokens: L = 70 is three chunks, the last one partial.
BWD_SHAPES = [(1, 32, 1, 16, 0), (2, 40, 37, 16, 2), (1, 37, 70, 17, 0), (2, 8, 19, 3, 2)]
BWD_IDS = ["L1", "odd-L-G2-20-channel-groups", "3-chunks-E37-tail-N17-padded", "N3-padded-G2"]
@interpreter_only
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=BWD_IDS)
@pytest.mark.parametrize("extras", [True, False], ids=["D-z-bias-softplus", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_matches_float64_autograd_of_ref(shape, extras, dtype, design, monkeypatch):
    """Every gradient of the one-direction scan against float64 autograd of ``ref``, each in its input's dtype;
    the backward's buffers (gradients, partials, checkpoints, chunk states) start as NaN."""
    from vimbench.kernels.selective_scan.ref import selective_scan_ref_backward
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton_backward
    args, kw = scan_case(*shape, dtype=dtype, extras=extras)
    extra = [kw.get(k) for k in ("D", "z", "delta_bias")]
    softplus = kw.get("delta_softplus", False)
    dout = torch.randn(args[0].shape).to(dtype)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    want = selective_scan_ref_backward(*map(f64, args), *map(f64, extra), softplus, dout.double())
    poison_empty(monkeypatch)
    got = selective_scan_triton_backward(*args, *extra, softplus, dout, design=design)
    assert [None if g is None else g.dtype for g in got] == [None if x is None else x.dtype
                                                             for x in (*args, *extra)]
    assert_grads_close(want, got, dtype)


@interpreter_only
@pytest.mark.parametrize("design", DESIGNS)
def test_training_through_the_entry_points_matches_ref(design):
    """Gradients through ``selective_scan`` and ``bidirectional_scan`` (the custom ops' autograd, the
    Triton backward in its record) against the same calls with backend 'ref', float32."""
    from vimbench.kernels.selective_scan import bidirectional_scan, selective_scan
    from vimbench.kernels.selective_scan.backends import has_backward
    assert has_backward(design)
    (u, delta, A, B, C), kw = scan_case(2, 16, 37, 5, 2, extras=True)
    (u_b, delta_b, A_b, B_b, C_b), kw_b = scan_case(2, 16, 37, 5, 2, extras=True)
    inputs = [u, delta, A, B, C, kw["D"], kw["z"], kw["delta_bias"], u_b, delta_b, A_b, B_b, C_b, kw_b["D"],
              kw_b["delta_bias"]]

    def grads(backend):
        x = [t.detach().clone().requires_grad_() for t in inputs]
        one = selective_scan(*x[:5], D=x[5], z=x[6], delta_bias=x[7], delta_softplus=True, backend=backend)
        pair = bidirectional_scan(*x[:6], *x[8:14], z=x[6], delta_bias=x[7], delta_bias_b=x[14], backend=backend)
        return torch.autograd.grad((one * pair.detach() + pair).sum(), x)
    for r, g in zip(grads("ref"), grads(design)):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


@interpreter_only
def test_compiled_training_through_the_triton_scan_has_no_graph_break():
    """torch.compile(fullgraph=True) of both ops' forward and backward with backend 'triton' (the backward
    ops in the compiled backward graph, the kernels interpreted on CPU): the same gradients as eager."""
    from vimbench.kernels.selective_scan import bidirectional_scan, selective_scan
    (u, delta, A, B, C), kw = scan_case(1, 8, 40, 3, 2)
    x = {k: v.requires_grad_() for k, v in dict(u=u, delta=delta, A=A, B=B, C=C, D=kw["D"], z=kw["z"],
                                                 delta_bias=kw["delta_bias"]).items()}

    def loss(**t):
        one = selective_scan(**t, delta_softplus=True, backend="triton")
        pair = bidirectional_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["u"], t["delta"], t["A"],
                                  t["B"], t["C"], t["D"], z=t["z"], delta_bias=t["delta_bias"], backend="triton")
        return (one * pair).sum()
    eager = torch.autograd.grad(loss(**x), list(x.values()))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(**x), list(x.values()))
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-6)


@interpreter_only
@pytest.mark.parametrize("design", DESIGNS)
def test_vim_train_step_with_triton_scan_matches_ref(design):
    """A 2-layer Vim (embed_dim 24, so E 48 channels: vim_tiny's 384 make the interpreter ~8x slower) over 5
    tokens, its backward with each Triton design as its scan backend: every parameter's gradient as with
    scan='ref'."""
    from vimbench.models.vim import VisionMamba
    torch.manual_seed(0)
    model = VisionMamba(img_size=32, embed_dim=24, depth=2, scan="ref")
    x = torch.randn(2, 3, 32, 32)

    def grads():
        model.zero_grad()
        model.forward_features(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref = grads()
    model.set_scan(design)
    got = grads()
    assert got.keys() == ref.keys() and any("A_log" in n for n in ref)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-3, atol=1e-4 * ref[n].abs().max().item()), n


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the parent test that starts the interpreter run")
def test_interpreter_cases():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" in proc.stdout  # the cases ran; the parent test skipped
