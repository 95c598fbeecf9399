"""The compiled kernels' vector math (csrc/vec_math.h) against float64, and the kernels under every ATen CPU
capability this machine can run.

exp2 (the scan's state exp), exp (the accurate exp of softplus and silu), softplus, silu, sigmoid and silu's
derivative are evaluated by the op ``vec_math`` over the whole float32 input range: a dense grid, the edges where
results overflow, turn denormal or underflow, and NaN, +-inf, +-0 and huge values, placed among ordinary lanes
so that vectors mixing in-range and edge lanes are covered. Errors are in units in the last place of the
float32 result (an ulp of a denormal is 2^-149).

The current capability runs in-process; the others (``ATEN_CPU_CAPABILITY=default|avx2|avx512`` on x86, each
its own build of the kernels, compiled on first use) run in subprocesses and are marked slow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vimbench.kernels.selective_scan import compiled_cpu

ok, why = compiled_cpu.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"compiled CPU scan unavailable: {why}")

# The capabilities of one architecture from the least to the most capable: ATen runs any of them at or below
# the machine's own.
CAPABILITY_ORDER = {"x86": ["DEFAULT", "AVX2", "AVX512"], "arm": ["DEFAULT", "SVE256"]}

# Max error in ulps of the float32 result per function (a denormal result's ulp is 2^-149, as the smallest
# normals').
MAX_ULPS = {"exp2": 3, "exp": 3, "softplus": 4, "silu": 4.5, "sigmoid": 4.5, "silu_grad": 10}
# silu's derivative crosses zero (x ~ -1.28), where no float32 formula has a bounded relative error: its errors
# are in ulps of max(|result|, 1/4).
ULP_FLOOR = {"silu_grad": 0.25}
# DEFAULT on x86 is at::vec's scalar emulation without fused multiply-adds: each polynomial step rounds twice.
NO_FMA_SLACK = {"DEFAULT": 0.5}


# Input ranges: the whole float32 line is covered by the specials; silu, sigmoid and silu's derivative are
# measured from -87 up (below, exp(-x) is held at exp(87) so that the division stays finite: the results are
# then below 1e-36 in magnitude rather than correctly rounded; test_compiled_cpu checks the gate there).
RANGE = {"exp2": 160.0, "exp": 110.0}                          # grid over [-r, r]; 120 for the others
FLOOR = {"silu": -87.0, "sigmoid": -87.0, "silu_grad": -87.0}


def inputs(fn: str) -> torch.Tensor:
    """float32 inputs of ``fn`` covering its range, its edges and the special values (numel: a multiple of
    64, so any vector width divides it)."""
    top = RANGE.get(fn, 120.0)
    grid = torch.linspace(-top, top, 1 << 16, dtype=torch.float64)
    edges = torch.tensor([-150.0, -149.5, -149.0, -148.5, -127.0, -126.5, -126.0, -125.5, -125.0, -124.9,
                          124.9, 125.0, 125.5, 126.0, 127.0, 127.5, 127.99, 128.0, 128.5,     # 2^t's edges
                          -104.0, -103.3, -87.3, -87.0, 20.0, 20.001, 19.999, 88.7, 88.72, 89.0],  # exp's
                         dtype=torch.float64)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 3e38, -3e38,
                             1e-40, -1e-40], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    rnd = (torch.rand(1 << 14, generator=g, dtype=torch.float64) * 2 - 1) * top
    x = torch.cat([grid, edges, specials, rnd])
    if fn in FLOOR:
        x = x[x.isnan() | (x >= FLOOR[fn])]
    x = x.float()
    x = x[torch.randperm(x.numel(), generator=g)]          # the edges and specials among ordinary lanes
    pad = (-x.numel()) % 64
    return torch.cat([x, torch.zeros(pad)])


def reference(fn: str, x: torch.Tensor) -> torch.Tensor:
    """fn in float64 on the float32 values x; softplus with torch's threshold 20."""
    xd = x.double()
    if fn == "exp2":
        return torch.exp2(xd)
    if fn == "exp":
        return torch.exp(xd)
    if fn == "softplus":
        return torch.where(xd > 20, xd, torch.log1p(torch.exp(xd)))
    if fn == "silu":
        return xd * torch.sigmoid(xd)
    if fn == "sigmoid":
        return torch.sigmoid(xd)
    s = torch.sigmoid(xd)
    return s * (1 + xd * (1 - s))


def ulp_errors(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> dict[str, float | int]:
    """Max error in ulps of the float32 result (of max(|result|, floor)) over finite results, and the count of
    lanes whose NaN-ness, infinity or infinity's sign disagrees with the reference rounded to float32."""
    ref32 = ref.float()
    bad_special = int(((out.isnan() != ref32.isnan()) | (out.isinf() != ref32.isinf())
                       | (out.isinf() & ref32.isinf() & (out.sign() != ref32.sign()))).sum())
    finite = ref32.isfinite() & out.isfinite()
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(max(floor, torch.finfo(torch.float32).tiny))))
    ulp = torch.exp2(exponent - 23)                                    # float32 spacing at |ref|
    err = (out.double() - ref).abs() / ulp
    return {"ulp": float(err[finite].max()) if finite.any() else 0.0, "bad_special": bad_special}


def measure_all() -> dict[str, dict]:
    """ulp_errors of every function on its inputs, with the kernel of the running capability."""
    result = {}
    for fn in MAX_ULPS:
        x = inputs(fn)
        out = torch.ops.vimbench_cpu.vec_math(x, fn)
        result[fn] = ulp_errors(out, reference(fn, x), ULP_FLOOR.get(fn, 0.0))
    return result


def check(errors: dict[str, dict], capability: str) -> None:
    for fn, e in errors.items():
        assert e["bad_special"] == 0, f"{capability} {fn}: {e['bad_special']} NaN / inf lanes wrong"
        bound = MAX_ULPS[fn] + NO_FMA_SLACK.get(capability, 0.0)
        assert e["ulp"] <= bound, f"{capability} {fn}: {e['ulp']:.2f} ulp > {bound}"


def test_ulp_errors_helper():
    """The ulp measure itself: one ulp off at 1.0 is 1, a denormal off by 2^-149 is 1, inf against a finite
    reference counts as wrong."""
    ref = torch.tensor([1.0, 2.0 ** -140], dtype=torch.float64)
    assert ulp_errors(torch.tensor([1.0 + 2.0 ** -23, 2.0 ** -140]), ref)["ulp"] == pytest.approx(1.0)
    assert ulp_errors(torch.tensor([1.0, 2.0 ** -140 + 2.0 ** -149]), ref)["ulp"] == pytest.approx(1.0)
    e = ulp_errors(torch.tensor([float("inf")]), torch.tensor([3.0e38], dtype=torch.float64))
    assert e["bad_special"] == 1


def test_vec_math_current_capability():
    check(measure_all(), compiled_cpu.cpu_capability())


def test_unknown_function_refused():
    with pytest.raises(RuntimeError, match="unknown function"):
        torch.ops.vimbench_cpu.vec_math(torch.zeros(64), "tanh")


@pytest.mark.parametrize("reported", ["AVX512", "AVX2", "DEFAULT", "NO AVX", "SVE256", "SVE128", "VSX", "Z VECTOR",
                                      "QUANTUM"])
def test_every_capability_builds_or_says_why(monkeypatch, reported):
    """Each capability torch can report has compile flags or a one-line reason (never a KeyError)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: reported)
    cap = compiled_cpu.cpu_capability()
    reason = compiled_cpu.capability_reason(cap)
    if reported in ("AVX512", "AVX2", "DEFAULT", "NO AVX", "SVE256"):
        assert reason is None and cap in compiled_cpu._CAPABILITY_FLAGS
        assert cap in compiled_cpu.build_dir().name
    else:
        assert reason and "\n" not in reason
        assert compiled_cpu._precheck() == reason


# ------------------------------------------------------------------------------------------------------
# other capabilities, in subprocesses
# ------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _env(capability: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability.lower()
    return env


def machine_capabilities() -> list[str]:
    """The capabilities ATen can run on this machine: its own (read without ATEN_CPU_CAPABILITY) and the lower
    ones of its architecture."""
    top = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=_env(None), capture_output=True, text=True, check=True).stdout.strip().upper()
    for order in CAPABILITY_ORDER.values():
        if top in order:
            return order[:order.index(top) + 1]
    return ["DEFAULT"]


_SCRIPT = """
import importlib.util, json
from vimbench.kernels.selective_scan import compiled_cpu
compiled_cpu.build()
spec = importlib.util.spec_from_file_location("vec_math_test", {path!r})
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
print(json.dumps({{"capability": compiled_cpu.cpu_capability(), "errors": t.measure_all()}}))
"""


@pytest.mark.slow
def test_vec_math_every_capability():
    """The accuracy bounds hold under every capability this machine runs (each builds its own kernels)."""
    for cap in machine_capabilities():
        proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(path=__file__)], env=_env(cap),
                              capture_output=True, text=True, cwd=ROOT, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["capability"] == cap
        check(got["errors"], cap)


@pytest.mark.slow
def test_kernels_every_capability():
    """The compiled kernels' tests pass under every capability this machine runs but the current one."""
    current = compiled_cpu.cpu_capability()
    for cap in machine_capabilities():
        if cap == current:
            continue
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "tests/kernels/test_compiled_cpu.py", "tests/kernels/test_compiled_cpu_backward.py",
                               "tests/kernels/test_causal_conv.py", "tests/kernels/test_rms_norm.py"],
                              env=_env(cap), capture_output=True, text=True, cwd=ROOT, timeout=3600)
        assert proc.returncode == 0, f"under {cap}:\n{proc.stdout[-3000:]}"
