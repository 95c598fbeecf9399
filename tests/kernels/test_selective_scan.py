"""Every scan backend against the sequential reference; the custom ops, their fake impls and FLOPs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_close, scan_case
from vimbench.kernels.selective_scan.check import CASES, check_backend
from vimbench.kernels import BackendUnavailable, bidirectional_scan, selective_scan
from vimbench.kernels.selective_scan.chunked import selective_scan_cpu
from vimbench.kernels.selective_scan.ref import selective_scan_ref
from vimbench.kernels.selective_scan import bidirectional_scan_ref

SHAPES, IDS = list(CASES.values()), list(CASES)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("extras", [True, False], ids=["D-z-bias-softplus", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_backend_matches_ref(shape, extras, dtype):
    args, kw = scan_case(*shape, dtype=dtype, extras=extras)
    ref, ref_h = selective_scan_ref(*args, **kw, return_last_state=True)
    out, h = selective_scan(*args, **kw, return_last_state=True, backend="cpu")
    assert out.dtype == dtype
    assert_close("out", ref, out, dtype)
    assert_close("last_state", ref_h, h, torch.float32)


def test_ref_matches_float64_oracle_and_closed_form():
    """ref in fp32 against itself in float64, and one step against the formula written out by hand."""
    args, kw = scan_case(2, 4, 33, 4, 2)
    out = selective_scan_ref(*args, **kw)
    out64 = selective_scan_ref(*(a.double() for a in args), **{k: v.double() if torch.is_tensor(v) else v
                                                                for k, v in kw.items()})
    assert out64.dtype == torch.float64
    assert_close("fp32 vs fp64", out64, out, torch.float32)
    # L = 1 closed form: y = (C . (softplus(d + bias) * u * B)) + D u, gated by silu(z)
    (u, d, A, B, C), kw = scan_case(1, 3, 1, 2, 0)
    dt = torch.nn.functional.softplus(d + kw["delta_bias"][:, None])
    y = (C[:, None, :, 0] * (dt * u)[..., 0:1] * B[:, None, :, 0]).sum(-1, keepdim=True) + kw["D"][:, None] * u
    y = y * kw["z"] * torch.sigmoid(kw["z"])
    assert_close("L=1", y, selective_scan_ref(u, d, A, B, C, **kw))


def test_cpu_backend_is_safe_for_large_decays():
    """sum(|delta*A|) over a chunk far beyond 88: the log-space trick would overflow; ours must not."""
    args, kw = scan_case(1, 4, 300, 4, 0, extras=False)
    u, delta, A, B, C = args
    delta = torch.full_like(delta, 5.0)  # |delta * A| up to 20 per step, thousands per chunk
    out = selective_scan_cpu(u, delta, A * 4, B, C)
    assert torch.isfinite(out).all()
    assert_close("large decay", selective_scan_ref(u.double(), delta.double(), A.double() * 4, B.double(),
                                                   C.double()), out, torch.float32)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_bidirectional_matches_two_flipped_scans(backend):
    (u, d, A, B, C), kw = scan_case(2, 6, 19, 4, 0)
    (ub, db, Ab, Bb, Cb), _ = scan_case(2, 6, 19, 4, 0)
    D, Db, z = torch.randn(6), torch.randn(6), torch.randn(2, 6, 19)
    out = bidirectional_scan(u, d, A, B, C, D, ub, db, Ab, Bb, Cb, Db, z=z, delta_bias=kw["delta_bias"],
                             delta_bias_b=None, backend=backend)
    # the official formulation: scan the flipped sequence, flip the result back, add, gate
    y_f = selective_scan_ref(u, d, A, B, C, D, delta_bias=kw["delta_bias"], delta_softplus=True)
    y_b = selective_scan_ref(ub.flip(-1), db.flip(-1), Ab, Bb.flip(-1), Cb.flip(-1), Db,
                             delta_softplus=True).flip(-1)
    assert_close("bidirectional", (y_f + y_b) * torch.nn.functional.silu(z), out)


def test_unavailable_backends_say_why():
    args, _ = scan_case(1, 4, 5, 2, 0)
    with pytest.raises(BackendUnavailable, match="mamba_ssm"):
        selective_scan(*args, backend="mamba_ssm")
    with pytest.raises(ValueError, match="unknown scan backend"):
        selective_scan(*args, backend="fast")


def test_shape_errors_name_the_tensor():
    (u, d, A, B, C), _ = scan_case(1, 4, 5, 2, 0)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, d, A[:3], B, C)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(u, d, A, B[..., :4], C)


def closed_form_scan_flops(b, E, L, N, D, bias, softplus, z):
    """Written out independently of kernels/selective_scan.py: per (b,e,t,n) exp(dA) 2, h update 2,
    dBu 1, C*h + sum 2 = 7; per (b,e,t) delta*u 1, bias 1, softplus 1, D skip 2, silu gate 3."""
    return b * E * L * N * 7 + b * E * L * (1 + bias + softplus + 2 * D + 3 * z)


def test_flop_formula_and_fake_impl_on_meta():
    with torch.device("meta"):
        (u, d, A, B, C), kw = scan_case(2, 8, 50, 16, 0)
        with FlopCounterMode(display=False) as counter:
            out, h = selective_scan(u, d, A, B, C, **kw, return_last_state=True)
    assert out.device.type == "meta" and out.shape == u.shape and h.shape == (2, 8, 16)
    assert counter.get_total_flops() == closed_form_scan_flops(2, 8, 50, 16, True, True, True, True)


def test_bidirectional_flops():
    (u, d, A, B, C), _ = scan_case(1, 4, 10, 3, 0)
    with FlopCounterMode(display=False) as counter:
        bidirectional_scan(u, d, A, B, C, torch.ones(4), u, d, A, B, C, torch.ones(4), z=u,
                           delta_bias=torch.zeros(4), delta_bias_b=torch.zeros(4), backend="cpu")
    one = closed_form_scan_flops(1, 4, 10, 3, True, True, True, False)
    assert counter.get_total_flops() == 2 * one + 1 * 4 * 10 * (1 + 3)


def test_bidirectional_ref_uses_given_scan():
    (u, d, A, B, C), _ = scan_case(1, 4, 9, 2, 0)
    a = bidirectional_scan_ref(u, d, A, B, C, None, u, d, A, B, C, None, scan=selective_scan_cpu)
    assert_close("bidir ref cpu vs ref", bidirectional_scan_ref(u, d, A, B, C, None, u, d, A, B, C, None), a)


def test_cpu_scan_on_meta_tensors_skips_its_step_loop():
    """FLOP counting runs the cpu scan as the op's fake implementation on meta tensors: it must not walk
    the sequence (6085 steps per call would make counting a Vim model take minutes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.device("meta"):
        (u, d, A, B, C), kw = scan_case(1, 8, 6085, 16, 0)
        with Count():
            out = selective_scan_cpu(u, d, A, B, C, **kw)
    assert out.device.type == "meta" and out.shape == u.shape
    assert Count.calls < 200  # three chunks of batched ops, no per-step ops


def test_auto_on_cpu_is_the_compiled_scan_when_it_builds():
    from vimbench.kernels.selective_scan import compiled_cpu, resolve_scan_backend
    assert resolve_scan_backend("auto", "cpu") == ("cpp" if compiled_cpu.available()[0] else "cpu")
    assert resolve_scan_backend("auto", "meta") == "cpu"   # FLOP counting: no kernel to build


def test_without_a_compiler_cpp_is_refused_and_auto_says_cpu(tmp_path):
    """A fresh process where no C++ compiler can be found: --scan cpp is one line and exit 2; auto runs
    the chunked backend and the row's impl says so."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), VIMBENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", "import sys; from vimbench.commands import main; "
                           "sys.exit(main(sys.argv[1:]))", "kernels", "--scan", "cpp", "--models", "vim_tiny",
                           "--res", "32", "--out", str(tmp_path / "k.csv")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no C++ compiler" in proc.stderr and "--scan cpp" in proc.stderr
    assert not (tmp_path / "k.csv").exists()
    proc = subprocess.run([sys.executable, "-c", "from vimbench.kernels.selective_scan import resolve_scan_backend;"
                           "print(resolve_scan_backend('auto', 'cpu'))"], env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == "cpu", proc.stderr


def test_the_correctness_check_passes_a_right_backend_and_names_a_wrong_one():
    """check_backend, which runs before any timing: the chunked scan passes every case; a scan 1% off and
    one that crashes are refused at the first case, with what went wrong."""
    right = check_backend(selective_scan_cpu)
    assert right.ok and right.cases == 2 * 2 * len(CASES)

    def one_percent_off(*args, **kw):
        out, h = selective_scan_ref(*args, **kw)
        return out * 1.01, h

    def crashes(*args, **kw):
        raise RuntimeError("boom")

    off = check_backend(one_percent_off)
    assert not off.ok and off.cases == 0 and off.failure.startswith("L1 (1, 4, 1, 4, 0) float32 extras: out differs")
    assert off.worst > 0
    crash = check_backend(crashes)
    assert not crash.ok and "raised RuntimeError: boom" in crash.failure


def test_the_correctness_check_requires_a_float32_last_state():
    def bf16_state(*args, **kw):
        out, h = selective_scan_ref(*args, **kw)
        return out, h.to(torch.bfloat16)

    result = check_backend(bf16_state, dtypes=(torch.bfloat16,))
    assert not result.ok and result.cases == 0
    assert "last state has shape (1, 4, 4) torch.bfloat16, expected (1, 4, 4) torch.float32" in result.failure


def _wrong_on_time_major(real):
    """``real`` (the compiled one-direction scan) with 0.1 added to its output when u is not contiguous."""
    def scan(u, *args, **kw):
        result = real(u, *args, **kw)
        if u.is_contiguous():
            return result
        return (result[0] + 0.1, result[1]) if isinstance(result, tuple) else result + 0.1
    return scan


def _wrong_pair(real):
    """``real`` (the compiled bidirectional pair) with 0.1 added to its output."""
    return lambda *args, **kw: real(*args, **kw) + 0.1


@pytest.mark.parametrize("plant, attr, first, where", [
    (_wrong_pair, "bidirectional_scan_compiled", "L1 (1, 4, 1, 4, 0)", "extras pair contiguous"),
    # at L = 1 time-major memory is contiguous memory: the first case it differs in is odd-L
    (_wrong_on_time_major, "selective_scan_compiled", "odd-L (2, 6, 7, 4, 1)", "extras one direction time-major")],
    ids=["pair", "time-major"])
def test_a_cpp_scan_wrong_only_in_the_pair_or_only_on_time_major_inputs_is_not_timed(plant, attr, first, where,
                                                                                    monkeypatch):
    """The contiguous one-direction scan stays right (check_backend passes), but the backend is checked as it is
    timed too: check_scans, which gate, kernels and gpu-check run before any timing, refuses it, naming the
    first case (of ``check_entry_points``) that is 0.1 off."""
    from vimbench.kernels.selective_scan import compiled_cpu
    from vimbench.kernels.selective_scan.backends import REGISTRY
    from vimbench.measure import verify
    try:
        compiled_cpu.build()
    except Exception as e:  # no compiler here
        pytest.skip(f"the cpp scan does not build here: {e}")
    monkeypatch.setattr(compiled_cpu, attr, plant(getattr(compiled_cpu, attr)))
    monkeypatch.setattr(verify, "run_isolated", lambda fn, args, timeout=None: {"status": "ok", **fn(*args)})
    assert check_backend(REGISTRY["cpp"].forward).ok
    failed = verify.check_scans(["cpp"], "cpu", log=lambda line: None)
    assert list(failed) == ["cpp"]
    assert failed["cpp"].startswith(f"correctness check failed: {first} float32 {where}: out differs from the "
                                    f"reference by up to 0.1")


def test_a_backend_whose_vim_mixer_is_wrong_is_not_timed(monkeypatch):
    """The cpp scan right everywhere, but the compiled causal conv pair the Vim mixer runs with it 1% off:
    check_mixer (run by check_named_backend, so by check_scans before any timing) refuses the backend."""
    from vimbench.kernels.selective_scan import compiled_cpu
    from vimbench.kernels.selective_scan.check import check_mixer, check_named_backend
    try:
        compiled_cpu.build()
    except Exception as e:  # no compiler here
        pytest.skip(f"the cpp scan does not build here: {e}")
    assert check_mixer("cpp").ok and check_mixer("cpp").cases == 2
    real = compiled_cpu.causal_conv1d_pair_compiled
    monkeypatch.setattr(compiled_cpu, "causal_conv1d_pair_compiled",
                        lambda *args: tuple(x * 1.01 for x in real(*args)))
    result = check_named_backend("cpp")
    assert not result["check_ok"]
    assert result["check_failure"].startswith("mixer-L7 mixer (b=2, M=7, D=16, N=4) float32: out differs from the "
                                              "ref mixer in float64")
