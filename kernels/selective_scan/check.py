"""Correctness before speed: a backend against the sequential reference on awkward shapes.

``check_backend`` runs a backend on ``CASES`` (L = 1, odd L, several chunks, E not a multiple of 16 or 32,
groups G = 2 and 4, N not a power of two, with and without D, z, delta_bias and softplus, the last
state) in fp32 and bf16, and compares each output with ``selective_scan_ref`` computed in float64 from the
same inputs, using ``TOLERANCES``. Timing commands (``vimbench kernels``, ``vimbench gate``,
``vimbench gpu-check``) run it first and print no time for a backend that fails. The tests use the same
cases, builder and tolerance table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vimbench.kernels.selective_scan.ref import selective_scan_ref

CASES = {  # id -> (batch, E, L, N, G); G = 0 is the 3-dim (batch, N, L) form of B and C
    "L1": (1, 4, 1, 4, 0), "odd-L": (2, 6, 7, 4, 1), "G2-multi-chunk": (2, 8, 131, 16, 2),
    "long-L-3dim": (1, 5, 300, 8, 0), "G4-L129": (3, 4, 129, 3, 4), "E37-N17": (1, 37, 45, 17, 0),
}
TOLERANCES = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.float16: dict(rtol=3e-3, atol=5e-3),
              torch.bfloat16: dict(rtol=3e-2, atol=5e-2), torch.float64: dict(rtol=1e-9, atol=1e-10)}
"""Per output dtype, for ``torch.allclose`` against the float64 reference (mamba_ssm's scan tolerances)."""


def scan_case(b: int, E: int, L: int, N: int, G: int, dtype=torch.float32, extras: bool = True,
              device=None) -> tuple[tuple, dict]:
    """Inputs of one direction: (u, delta, A, B, C) and the keyword extras (D, z, delta_bias,
    delta_softplus=True; none when ``extras`` is False). u, delta, z (b, E, L), B and C (b, N, L) or
    (b, G, N, L) in ``dtype``; A (E, N) negative, D and delta_bias (E,) float32; on ``device`` (None: the
    current default device)."""
    kw = dict(device=device)
    u = torch.randn(b, E, L, **kw).to(dtype)
    # without softplus delta must be positive, as softplus makes it (else exp(delta * A) grows without bound)
    delta = (0.5 * (torch.randn(b, E, L, **kw) if extras else torch.rand(b, E, L, **kw))).to(dtype)
    A = -torch.rand(E, N, **kw) * 4 - 0.1
    bc = (b, N, L) if G == 0 else (b, G, N, L)
    B, C = torch.randn(*bc, **kw).to(dtype), torch.randn(*bc, **kw).to(dtype)
    more = dict(D=torch.randn(E, **kw), z=torch.randn(b, E, L, **kw).to(dtype), delta_bias=torch.randn(E, **kw) * 0.5,
                delta_softplus=True) if extras else {}
    return (u, delta, A, B, C), more


def _f64(x):
    return x.double() if torch.is_tensor(x) else x


@dataclass(frozen=True)
class CheckResult:
    """``ok`` when every case passed; otherwise ``failure`` names the first failing case and
    ``worst`` is its largest absolute error (NaN for a non-finite output or a crash)."""
    ok: bool
    cases: int
    failure: str = ""
    worst: float = 0.0


def check_backend(scan, device="cpu", dtypes=(torch.float32, torch.bfloat16)) -> CheckResult:
    """Runs ``scan`` (a function with ``selective_scan_ref``'s signature) on every case of ``CASES`` x
    ``dtypes`` x with/without extras on ``device``, and compares out and the last state with the float64
    reference. Stops at the first failure."""
    torch.manual_seed(0)
    n = 0
    for name, shape in CASES.items():
        for dtype in dtypes:
            for extras in (True, False):
                args, kw = scan_case(*shape, dtype=dtype, extras=extras, device=device)
                label = f"{name} {tuple(shape)} {str(dtype).removeprefix('torch.')} {'extras' if extras else 'plain'}"
                ref, ref_h = selective_scan_ref(*map(_f64, args), **{k: _f64(v) for k, v in kw.items()},
                                                return_last_state=True)
                try:
                    out, h = scan(*args, **kw, return_last_state=True)
                except Exception as e:  # a crash is a failure to report, not to propagate
                    return CheckResult(False, n, f"{label}: raised {type(e).__name__}: {e}", float("nan"))
                for what, want, got, tol_dtype in (("out", ref, out, dtype), ("last state", ref_h, h, torch.float32)):
                    if got.shape != want.shape or got.dtype != (dtype if what == "out" else got.dtype):
                        return CheckResult(False, n, f"{label}: {what} has shape {tuple(got.shape)} {got.dtype}, "
                                                     f"expected {tuple(want.shape)}", float("nan"))
                    err = (got.double() - want).abs()
                    if not torch.isfinite(got).all() or not torch.allclose(got.double(), want, **TOLERANCES[tol_dtype]):
                        worst = err.max().item() if torch.isfinite(got).all() else float("nan")
                        return CheckResult(False, n, f"{label}: {what} differs from the reference by up to "
                                                     f"{worst:.3g} (tolerance {TOLERANCES[tol_dtype]})", worst)
                n += 1
    return CheckResult(True, n)


def check_named_backend(backend: str, device: str = "cpu") -> dict:
    """``check_backend`` of the registered backend ``backend`` on ``device``, as a dict for a worker
    process (``vimbench.measure.isolation.run_isolated``): checked, check_failure, check_worst."""
    from vimbench.kernels.selective_scan.backends import IMPLS, check_scan_backend
    check_scan_backend(backend, device)
    result = check_backend(IMPLS[backend], device)
    return {"checked": result.cases, "check_ok": result.ok, "check_failure": result.failure,
            "check_worst": result.worst}
