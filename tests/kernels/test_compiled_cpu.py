"""The compiled CPU selective scan (backend ``cpp``) against the sequential float64 reference (ref.py).

Covers awkward shapes (L = 1, odd L, E not a multiple of the vector width, N in {1, 4, 16, 17}, groups), every
optional input, float32 / bfloat16 / float16 inputs, time-major strided inputs, output layouts, extreme deltas
for softplus, the bidirectional op, and the forward parametrisations of mamba_ssm's
tests/ops/test_selective_scan.py (re-expressed here: itype x seqlen x groups, batch 2, dim 4, dstate 8).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.kernels.selective_scan.ref import selective_scan_ref

ok, why = compiled_cpu.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"compiled CPU scan unavailable: {why}")

# (rtol, atol) of the output per input dtype: fp32 is the kernel's own accuracy; half dtypes are dominated by
# rounding the output to that dtype. The last state is float32 whatever the input dtype.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
STATE_TOL = (1e-5, 1e-5)


def d64(x):
    return None if x is None else x.double()


def ref64(u, delta, A, B, C, D, z, bias, softplus, last=True):
    """selective_scan_ref in float64 on the very values the kernel sees."""
    return selective_scan_ref(d64(u), d64(delta), d64(A), d64(B), d64(C), d64(D), d64(z), d64(bias), softplus,
                              return_last_state=last)


def bidir_ref64(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, bias, bias_b, softplus):
    """bidirectional_scan_ref's semantics in float64: forward scan + scan of the flipped backward inputs."""
    y_f = ref64(u, delta, A, B, C, D, None, bias, softplus, last=False)
    y_b = ref64(u_b.flip(-1), delta_b.flip(-1), A_b, B_b.flip(-1), C_b.flip(-1), D_b, None, bias_b, softplus,
                last=False).flip(-1)
    y = y_f + y_b
    return y * F.silu(z.double()) if z is not None else y


def close(out, ref, rtol, atol, what="out"):
    out64 = out.double()
    scale = ref.abs().max().item() + 1e-12
    err = (out64 - ref).abs()
    # elementwise rtol plus an absolute floor proportional to the output's scale (atol is relative to it)
    bad = err > rtol * ref.abs() + atol * scale
    assert not bad.any(), (f"{what}: max abs err {err.max().item():.3g} (scale {scale:.3g}), "
                           f"{bad.sum().item()} of {bad.numel()} elements out of tolerance")


def make_inputs(b, E, L, N, G=1, dtype=torch.float32, time_major=False, seed=0, delta_scale=None):
    """Random inputs of one direction. time_major: u, delta, z are (b, E, L) views of one (b, L, 3E) tensor
    (stride 1 along E, 3E along L) and B, C views of a (b, L, 5 + 2GN) x_proj-like output."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if time_major:  # cast before slicing, so half dtypes keep the strided layout
        x = rnd(b, L, 3 * E)
        x[:, :, E:2 * E] *= delta_scale if delta_scale is not None else 0.5
        x = x.to(dtype)
        u, delta, z = (x[:, :, i * E:(i + 1) * E].transpose(1, 2) for i in range(3))
        bc = rnd(b, L, 5 + 2 * G * N).to(dtype)
        B = bc[:, :, 5:5 + G * N].reshape(b, L, G, N).permute(0, 2, 3, 1)
        C = bc[:, :, 5 + G * N:].reshape(b, L, G, N).permute(0, 2, 3, 1)
    else:
        u, delta, z = rnd(b, E, L), rnd(b, E, L), rnd(b, E, L)
        B, C = rnd(b, G, N, L), rnd(b, G, N, L)
        delta = delta * (delta_scale if delta_scale is not None else 0.5)
        u, delta, z, B, C = (t.to(dtype) for t in (u, delta, z, B, C))
    if G == 1:
        B, C = B[:, 0], C[:, 0]   # the ungrouped (b, N, L) form
    A = -torch.exp(rnd(E, N) * 0.5)
    D, bias = rnd(E), rnd(E) * 0.5
    if time_major and E > 1 and L > 1:
        assert u.stride(1) == 1 and delta.stride(1) == 1 and B.stride(-2) == 1
    return u, delta, A, B, C, D, z, bias


# ------------------------------------------------------------------------------------------------------
# one direction, awkward shapes and every option
# ------------------------------------------------------------------------------------------------------

SHAPES = [  # (b, E, L, N, G)
    (1, 5, 1, 4, 1), (2, 37, 7, 16, 1), (1, 16, 65, 17, 1), (2, 5, 33, 1, 1), (1, 37, 130, 16, 1),
    (2, 32, 19, 4, 2), (1, 48, 70, 16, 2), (1, 20, 9, 16, 2), (1, 64, 1, 17, 4),
]


@pytest.mark.parametrize("b,E,L,N,G", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("time_major", [False, True])
def test_shapes(b, E, L, N, G, dtype, time_major):
    u, delta, A, B, C, D, z, bias = make_inputs(b, E, L, N, G, dtype, time_major)
    out, last = compiled_cpu.selective_scan_compiled(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    ref, last_ref = ref64(u, delta, A, B, C, D, z, bias, True)
    assert out.dtype == dtype and out.shape == (b, E, L) and last.dtype == torch.float32
    assert last.shape == (b, E, N)
    close(out, ref, *TOL[dtype])
    close(last, last_ref, *STATE_TOL, what="last state")


@pytest.mark.parametrize("has_D,has_z,has_bias,softplus",
                         list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("time_major", [False, True])
def test_options(has_D, has_z, has_bias, softplus, time_major):
    u, delta, A, B, C, D, z, bias = make_inputs(2, 37, 29, 16, 1, time_major=time_major, seed=1)
    if not softplus:
        delta = delta.abs()  # a decaying scan, as softplus would give
    args = (u, delta, A, B, C, D if has_D else None, z if has_z else None, bias if has_bias else None, softplus)
    out = compiled_cpu.selective_scan_compiled(*args)
    assert isinstance(out, torch.Tensor)
    out2, last = compiled_cpu.selective_scan_compiled(*args, return_last_state=True)
    ref, last_ref = ref64(*args)
    close(out, ref, *TOL[torch.float32])
    assert torch.equal(out, out2)
    close(last, last_ref, *STATE_TOL, what="last state")


@pytest.mark.parametrize("scale,shift", [(30.0, 0.0), (5.0, 25.0), (5.0, -40.0), (1.0, 20.0), (60.0, -60.0)])
def test_softplus_extremes(scale, shift):
    """delta far into both tails of softplus and around its threshold of 20."""
    u, delta, A, B, C, D, z, bias = make_inputs(1, 37, 41, 16, seed=2)
    delta = delta * scale / 0.5 + shift
    A = A * 0.05  # keep exp(delta * A) away from flushing everything to 0 at large delta
    out, last = compiled_cpu.selective_scan_compiled(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    ref, last_ref = ref64(u, delta, A, B, C, D, z, bias, True)
    close(out, ref, *TOL[torch.float32])
    close(last, last_ref, *STATE_TOL, what="last state")


def test_gate_far_negative():
    """silu(z) for z far below -87, where exp(-z) overflows float32: the gate is ~0, not NaN."""
    u, delta, A, B, C, D, z, bias = make_inputs(1, 37, 9, 16, seed=10)
    z = z * 0 - 100.0
    out = compiled_cpu.selective_scan_compiled(u, delta, A, B, C, D, z, bias, True)
    ref = ref64(u, delta, A, B, C, D, z, bias, True, last=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-30)


def test_mixed_dtypes():
    """bf16 u / delta / z with float32 B, C; float32 u with bf16 delta (read as float32)."""
    u, delta, A, B, C, D, z, bias = make_inputs(2, 37, 23, 16, seed=3)
    ub, db, zb = (t.bfloat16() for t in (u, delta, z))
    out = compiled_cpu.selective_scan_compiled(ub, db, A, B, C, D, zb, bias, True)
    assert out.dtype == torch.bfloat16
    close(out, ref64(ub, db, A, B, C, D, zb, bias, True, last=False), *TOL[torch.bfloat16])
    out = compiled_cpu.selective_scan_compiled(u, db, A, B.half(), C.half(), D, z, bias, True)
    assert out.dtype == torch.float32
    close(out, ref64(u, db, A, B.half(), C.half(), D, z, bias, True, last=False), *TOL[torch.float32])


def test_output_layout():
    """Time-major inputs give time-major output memory (out.transpose(1, 2) contiguous); channel-major inputs
    give contiguous (b, E, L); time_major_out overrides."""
    u, delta, A, B, C, D, z, bias = make_inputs(2, 40, 17, 16, time_major=True)
    out = compiled_cpu.selective_scan_compiled(u, delta, A, B, C, D, z, bias, True)
    assert out.transpose(1, 2).is_contiguous()
    ref = ref64(u, delta, A, B, C, D, z, bias, True, last=False)
    close(out, ref, *TOL[torch.float32])
    uc, dc, zc = u.contiguous(), delta.contiguous(), z.contiguous()
    out_c = compiled_cpu.selective_scan_compiled(uc, dc, A, B.contiguous(), C.contiguous(), D, zc, bias, True)
    assert out_c.is_contiguous()
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)  # same math whatever the layout
    out_t = compiled_cpu.selective_scan_compiled(uc, dc, A, B, C, D, zc, bias, True, time_major_out=True)
    assert out_t.transpose(1, 2).is_contiguous() and torch.equal(out_t, out)


def test_threads_do_not_change_results():
    u, delta, A, B, C, D, z, bias = make_inputs(2, 100, 50, 16, time_major=True)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled_cpu.selective_scan_compiled(u, delta, A, B, C, D, z, bias, True)
        torch.set_num_threads(2)
        two = compiled_cpu.selective_scan_compiled(u, delta, A, B, C, D, z, bias, True)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)


@pytest.mark.parametrize("E", [192, 200])
def test_many_lanes_on_one_thread(E):
    """One thread scans 3 * E / 16 > 32 lanes, so lanes are staged in several groups (the last one partial);
    E = 192: every lane full, time-major rows read in place; E = 200: a partial lane per batch, rows gathered."""
    u, delta, A, B, C, D, z, bias = make_inputs(3, E, 70, 16, time_major=True, seed=8)
    u_b, delta_b, A_b, B_b, C_b, D_b, _, bias_b = make_inputs(3, E, 70, 16, time_major=True, seed=9)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out, last = compiled_cpu.selective_scan_compiled(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
        pair = compiled_cpu.bidirectional_scan_compiled(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z,
                                                        bias, bias_b, True)
    finally:
        torch.set_num_threads(prev)
    ref, last_ref = ref64(u, delta, A, B, C, D, z, bias, True)
    close(out, ref, *TOL[torch.float32])
    close(last, last_ref, *STATE_TOL, what="last state")
    close(pair, bidir_ref64(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, bias, bias_b, True),
          *TOL[torch.float32], what="bidirectional")


def test_float64_refused():
    u, delta, A, B, C, D, z, bias = make_inputs(1, 5, 3, 4)
    with pytest.raises(RuntimeError, match="float64"):
        compiled_cpu.selective_scan_compiled(u.double(), delta.double(), A, B, C)


def test_inside_custom_op():
    @torch.library.custom_op("vimbench_test::compiled_scan", mutates_args=())
    def op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, last = compiled_cpu.selective_scan_compiled(u, delta, A, B, C, D, z, bias, True,
                                                         return_last_state=True)
        return out.clone(), last

    u, delta, A, B, C, D, z, bias = make_inputs(1, 37, 11, 16)
    out, last = op(u, delta, A, B, C, D, z, bias)
    ref, last_ref = ref64(u, delta, A, B, C, D, z, bias, True)
    close(out, ref, *TOL[torch.float32])


# ------------------------------------------------------------------------------------------------------
# bidirectional
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,E,L,N,G", [(1, 5, 1, 4, 1), (2, 37, 31, 16, 1), (1, 48, 70, 17, 2), (2, 20, 9, 16, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("has_z,has_D,has_bias,softplus", [(True, True, True, True), (False, False, False, False),
                                                           (True, False, True, True)])
def test_bidirectional(b, E, L, N, G, dtype, time_major, has_z, has_D, has_bias, softplus):
    u, delta, A, B, C, D, z, bias = make_inputs(b, E, L, N, G, dtype, time_major, seed=4)
    u_b, delta_b, A_b, B_b, C_b, D_b, _, bias_b = make_inputs(b, E, L, N, G, dtype, time_major, seed=5)
    if not softplus:
        delta, delta_b = delta.abs(), delta_b.abs()
    if not has_D:
        D = D_b = None
    if not has_bias:
        bias = bias_b = None
    z = z if has_z else None
    out = compiled_cpu.bidirectional_scan_compiled(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, bias,
                                                   bias_b, softplus)
    ref = bidir_ref64(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, bias, bias_b, softplus)
    assert out.dtype == dtype and out.shape == (b, E, L)
    close(out, ref, *TOL[dtype])


def test_bidirectional_groups_differ():
    """Forward with G = 2, backward ungrouped (blocks must respect both group sizes)."""
    u, delta, A, B, C, D, z, bias = make_inputs(1, 40, 21, 16, 2, seed=6)
    u_b, delta_b, A_b, B_b, C_b, D_b, _, bias_b = make_inputs(1, 40, 21, 16, 1, seed=7)
    out = compiled_cpu.bidirectional_scan_compiled(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, bias,
                                                   bias_b, True)
    close(out, bidir_ref64(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, bias, bias_b, True),
          *TOL[torch.float32])


# ------------------------------------------------------------------------------------------------------
# mamba_ssm's forward parametrisation (tests/ops/test_selective_scan.py): batch 2, dim 4, dstate 8,
# A = -0.5 rand, B, C, u, z randn in itype, delta = 0.5 rand in itype, D randn and delta_bias 0.5 rand in
# float32, softplus, return_last_state; its tolerances. The reference is our float64 scan on the same values.
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("itype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("groups", [1, 2])
def test_mamba_forward_cases(itype, seqlen, groups):
    rtol, atol = (6e-4, 2e-3) if itype == torch.float32 else (3e-3, 5e-3)
    if itype == torch.bfloat16:
        rtol, atol = 3e-2, 5e-2
    torch.random.manual_seed(0)
    batch, dim, dstate = 2, 4, 8
    A = -0.5 * torch.rand(dim, dstate)
    bc_shape = (batch, dstate, seqlen) if groups == 1 else (batch, groups, dstate, seqlen)
    B = torch.randn(*bc_shape, dtype=itype)
    C = torch.randn(*bc_shape, dtype=itype)
    D = torch.randn(dim)
    z = torch.randn(batch, dim, seqlen, dtype=itype)
    bias = 0.5 * torch.rand(dim)
    u = torch.randn(batch, dim, seqlen, dtype=itype)
    delta = 0.5 * torch.rand(batch, dim, seqlen, dtype=itype)
    out, state = compiled_cpu.selective_scan_compiled(u, delta, A, B, C, D, z=z, delta_bias=bias,
                                                      delta_softplus=True, return_last_state=True)
    ref, state_ref = ref64(u, delta, A, B, C, D, z, bias, True)
    assert torch.allclose(out.double(), ref, rtol=rtol, atol=atol)
    assert torch.allclose(state.double(), state_ref, rtol=rtol, atol=atol)
    # and our own, tighter tolerance
    close(out, ref, *TOL[itype])
    close(state, state_ref, *STATE_TOL, what="last state")
