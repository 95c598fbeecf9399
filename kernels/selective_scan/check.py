"""Correctness before speed: a backend against the sequential reference on awkward shapes.

``check_backend`` runs a backend on ``CASES`` (L = 1, odd L, several chunks, E not a multiple of 16 or 32,
groups G = 2 and 4, N not a power of two, with and without D, z, delta_bias and softplus, the last
state) in fp32 and bf16, and compares each output with ``selective_scan_ref`` computed in float64 from the
same inputs, using ``TOLERANCES``. Timing commands (``vimbench kernels``, ``vimbench gate``,
``vimbench gpu-check``) run it first and print no time for a backend that fails. The tests use the same
cases, builder and tolerance table.

``check_backward`` does the same for the gradients, before any train timing: every gradient of the backend's
one-direction scan and of the bidirectional pair (``selective_scan`` / ``bidirectional_scan`` with
``backend=name`` on inputs that require grad, a random upstream gradient) against float64 autograd of
``selective_scan_ref`` / ``bidirectional_scan_ref``, within ``GRAD_TOLERANCES``. A backend without a
backward (``backends.has_backward``) is forward-only: ``check_named_backend`` says so instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vimbench.kernels.selective_scan.ref import bidirectional_scan_ref, selective_scan_ref

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


def _crashed(n: int, label: str, what: str, e: Exception) -> CheckResult:
    """The failure of case ``label`` whose call raised ``e``, its message on one line."""
    return CheckResult(False, n, f"{label}: {what} {type(e).__name__}: {' '.join(str(e).split())}", float("nan"))


def check_backend(scan, device="cpu", dtypes=(torch.float32, torch.bfloat16)) -> CheckResult:
    """Runs ``scan`` (a function with ``selective_scan_ref``'s signature) on every case of ``CASES`` x
    ``dtypes`` x with/without extras on ``device``, and compares out (in the case's dtype) and the last state
    (float32) with the float64 reference. Stops at the first failure."""
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
                    return _crashed(n, label, "raised", e)
                for what, want, got, tol_dtype in (("out", ref, out, dtype), ("last state", ref_h, h, torch.float32)):
                    if got.shape != want.shape or got.dtype != tol_dtype:
                        return CheckResult(False, n, f"{label}: {what} has shape {tuple(got.shape)} {got.dtype}, "
                                                     f"expected {tuple(want.shape)} {tol_dtype}", float("nan"))
                    err = (got.double() - want).abs()
                    if not torch.isfinite(got).all() or not torch.allclose(got.double(), want, **TOLERANCES[tol_dtype]):
                        worst = err.max().item() if torch.isfinite(got).all() else float("nan")
                        return CheckResult(False, n, f"{label}: {what} differs from the reference by up to "
                                                     f"{worst:.3g} (tolerance {TOLERANCES[tol_dtype]})", worst)
                n += 1
    return CheckResult(True, n)


def time_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (..., L) with the same values in time-major memory (L outermost after the batch), as the Vim
    mixer hands its projections to a backend that reads any strides (``ScanBackend.strided``)."""
    return t.movedim(-1, 1).contiguous().movedim(1, -1)


def check_entry_points(backend: str, device="cpu", dtypes=(torch.float32, torch.bfloat16)) -> CheckResult:
    """The outputs of scan backend ``backend`` (by name) as it is timed: through the public entry points, the
    one-direction scan and the bidirectional pair (a backend may compile its own pair op), on contiguous
    inputs and, for a backend whose record is ``strided`` (it reads the strides it is given), on ``time_major`` ones;
    ``CASES`` x ``dtypes`` x with/without extras against float64 ``selective_scan_ref`` /
    ``bidirectional_scan_ref``, within ``TOLERANCES``. Stops at the first failure."""
    from vimbench.kernels.selective_scan.backends import record
    torch.manual_seed(0)
    n = 0
    layouts = ("contiguous", "time-major") if record(backend).strided else ("contiguous",)
    for name, shape in CASES.items():
        for dtype in dtypes:
            for extras in (True, False):
                for pair in (False, True):
                    named = _grad_inputs(shape, dtype, extras, pair, device)
                    want = _scan_out(None, {k: v.double() for k, v in named.items()}, pair, extras)
                    for layout in layouts:
                        label = (f"{name} {tuple(shape)} {str(dtype).removeprefix('torch.')} "
                                 f"{'extras' if extras else 'plain'} {'pair' if pair else 'one direction'} {layout}")
                        given = {k: time_major(v) if layout == "time-major" and v.dim() > 2 else v
                                 for k, v in named.items()}
                        try:
                            got = _scan_out(backend, given, pair, extras)
                        except Exception as e:  # a crash is a failure to report, not to propagate
                            return _crashed(n, label, "raised", e)
                        if got.shape != want.shape or got.dtype != dtype:
                            return CheckResult(False, n, f"{label}: out has shape {tuple(got.shape)} {got.dtype}, "
                                                         f"expected {tuple(want.shape)} {dtype}", float("nan"))
                        finite = bool(torch.isfinite(got).all())
                        if not finite or not torch.allclose(got.double(), want, **TOLERANCES[dtype]):
                            worst = (got.double() - want).abs().max().item() if finite else float("nan")
                            return CheckResult(False, n, f"{label}: out differs from the reference by up to "
                                                         f"{worst:.3g} (tolerance {TOLERANCES[dtype]})", worst)
                        n += 1
    return CheckResult(True, n)


MIXER_CASES = {"mixer-L7": (2, 7), "mixer-L33": (1, 33)}
"""id -> (batch, tokens M) of ``check_mixer``'s layer (d_model 16, d_state 4, E = 32)."""
MIXER_TOLERANCE = 1e-4
"""``check_mixer``'s largest error, relative to the largest magnitude of the float64 reference's output: a
float32 layer stays below 1e-6 of it with ``cpu`` and ``cpp`` (measured), a layer 1% off fails."""


def check_mixer(backend: str, device="cpu") -> CheckResult:
    """A Vim mixer layer (``BiMambaMixer``: the projections, the causal conv pair and the scan pair as the model
    runs them with ``backend``, which picks the conv implementation too) in float32 against the same layer in
    float64 with ``ref``, on ``MIXER_CASES``, within ``MIXER_TOLERANCE``. Stops at the first failure."""
    import copy
    from vimbench.models.vim import BiMambaMixer
    torch.manual_seed(0)
    n = 0
    for name, (b, M) in MIXER_CASES.items():
        mixer = BiMambaMixer(16, depth=2, d_state=4).to(device)
        h = torch.randn(b, M, 16, device=device)
        label = f"{name} mixer (b={b}, M={M}, D=16, N=4) float32"
        with torch.no_grad():
            want = copy.deepcopy(mixer).double()(h.double(), scan="ref")
            try:
                got = mixer(h, scan=backend)
            except Exception as e:  # a crash is a failure to report, not to propagate
                return _crashed(n, label, "raised", e)
        scale = want.abs().max().item()
        err = (got.double() - want).abs().max().item() if got.shape == want.shape else float("nan")
        if not err <= MIXER_TOLERANCE * scale:
            return CheckResult(False, n, f"{label}: out differs from the ref mixer in float64 by up to {err:.3g}, "
                                         f"{err / scale:.3g} of its largest value (tolerance {MIXER_TOLERANCE:g} "
                                         f"of it)", err)
        n += 1
    return CheckResult(True, n)


GRAD_TOLERANCES = {torch.float32: 5e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-9}
"""Per input dtype of the case: the largest error a gradient may have, relative to the largest magnitude of the
float64 reference's same gradient (plus ``GRAD_ATOL``). Relative to the tensor's max norm, not elementwise:
a gradient sums over L (dA, dD, ddelta_bias), over batch and a group's channels (dB, dC) or over N (du,
ddelta), so single elements can cancel to near zero where an elementwise tolerance would fail a correct
kernel for its summation order. Measured on ``CASES`` (CPU, float32 math): ref and cpu stay below 1e-6 with
float32 inputs and 6e-3 with bfloat16 ones (the gradients rounded to bfloat16); a gradient 1% off fails."""
GRAD_ATOL = 1e-6
"""For a gradient whose reference is exactly zero (dA at L = 1, where the state before the first step is 0)."""
_ONE = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
_PAIR = ("u", "delta", "A", "B", "C", "D", "u_b", "delta_b", "A_b", "B_b", "C_b", "D_b", "z", "delta_bias",
         "delta_bias_b")


def _grad_inputs(shape, dtype, extras, pair, device) -> dict:
    """The named inputs of one gradient case, in argument order (``_ONE`` or ``_PAIR``; absent ones left out):
    a one-direction case from ``scan_case``, a pair from two, sharing the first's z."""
    args, kw = scan_case(*shape, dtype=dtype, extras=extras, device=device)
    named = dict(zip(_ONE, args), **{k: v for k, v in kw.items() if k != "delta_softplus"})
    if not pair:
        return named
    args_b, kw_b = scan_case(*shape, dtype=dtype, extras=extras, device=device)
    back = dict(zip(("u_b", "delta_b", "A_b", "B_b", "C_b"), args_b), D_b=kw_b.get("D"),
                delta_bias_b=kw_b.get("delta_bias"))
    return {k: v for k, v in {**named, **back}.items() if v is not None}


def _scan_out(backend, named: dict, pair: bool, softplus: bool):
    """out of the one-direction scan or of the pair from the named inputs: through the entry point on
    ``backend``, or the reference called directly (the float64 oracle's autograd) for None."""
    from vimbench.kernels.selective_scan import bidirectional_scan, selective_scan
    if pair:
        positional = [named.get(k) for k in _PAIR[:12]]
        rest = {k: named.get(k) for k in _PAIR[12:]}
        if backend is None:
            return bidirectional_scan_ref(*positional, **rest, delta_softplus=softplus)
        return bidirectional_scan(*positional, **rest, delta_softplus=softplus, backend=backend)
    if backend is None:
        return selective_scan_ref(**named, delta_softplus=softplus)
    return selective_scan(**named, delta_softplus=softplus, backend=backend)


def check_backward(backend: str, device="cpu", dtypes=(torch.float32, torch.bfloat16)) -> CheckResult:
    """Every gradient of scan backend ``backend`` (by name: through the public entry points, so that a backend
    whose compiled ops carry their own autograd is checked the same way) against float64 autograd of the
    sequential reference, on ``CASES`` x ``dtypes`` x with/without extras x {one direction, the bidirectional
    pair} on ``device``, within ``GRAD_TOLERANCES``. ``cases`` counts the passed (case, dtype, extras,
    direction) combinations; ``worst`` is the failing gradient's error relative to its reference's max norm.
    Stops at the first failure."""
    torch.manual_seed(0)
    n = 0
    for name, shape in CASES.items():
        for dtype in dtypes:
            for extras in (True, False):
                for pair in (False, True):
                    named = _grad_inputs(shape, dtype, extras, pair, device)
                    label = (f"{name} {tuple(shape)} {str(dtype).removeprefix('torch.')} "
                             f"{'extras' if extras else 'plain'} {'pair' if pair else 'one direction'}")
                    ref_in = {k: v.detach().double().requires_grad_() for k, v in named.items()}
                    ref_out = _scan_out(None, ref_in, pair, extras)
                    dout = torch.randn(ref_out.shape, device=device).to(dtype)
                    want = torch.autograd.grad(ref_out, list(ref_in.values()), dout.double())
                    got_in = {k: v.detach().clone().requires_grad_() for k, v in named.items()}
                    try:
                        got = torch.autograd.grad(_scan_out(backend, got_in, pair, extras), list(got_in.values()),
                                                  dout)
                    except Exception as e:  # a crash is a failure to report, not to propagate
                        return _crashed(n, label, "backward raised", e)
                    for what, w, g, x in zip(got_in, want, got, got_in.values()):
                        if g.shape != x.shape or g.dtype != x.dtype:
                            return CheckResult(False, n, f"{label}: d{what} has shape {tuple(g.shape)} {g.dtype}, "
                                                         f"expected {tuple(x.shape)} {x.dtype}", float("nan"))
                        scale = w.abs().max().item()
                        err = (g.double() - w).abs().max().item()
                        if not torch.isfinite(g).all() or not err <= GRAD_TOLERANCES[dtype] * scale + GRAD_ATOL:
                            worst = err / scale if scale > 0 else err
                            return CheckResult(False, n, f"{label}: d{what} differs from the reference by up to "
                                                         f"{err:.3g}, {worst:.3g} of its largest value (tolerance "
                                                         f"{GRAD_TOLERANCES[dtype]:g} of it)", worst)
                    n += 1
    return CheckResult(True, n)


def check_named_backend(backend: str, device: str = "cpu", grads: bool = False) -> dict:
    """``check_backend`` of the registered backend ``backend`` on ``device``, then ``check_entry_points``
    (the pair, the timed layouts) and ``check_mixer`` (the Vim mixer layer), as a dict for a worker
    process (``vimbench.measure.isolation.run_isolated``): checked, check_ok, check_failure, check_worst.
    With ``grads`` also ``forward_only`` ("" for a backend with a backward, else why it has none: no gradient
    check, and it cannot train) and, for a backend with a backward whose forward passed, ``check_backward``'s
    result: grad_checked, grad_ok, grad_failure, grad_worst."""
    from vimbench.kernels.selective_scan.backends import REGISTRY, check_scan_backend, forward_only
    check_scan_backend(backend, device)
    result = check_backend(REGISTRY[backend].forward, device)
    for then in (check_entry_points, check_mixer):  # then as it is timed: the pair, its layouts, the layer
        if result.ok:
            more = then(backend, device)
            result = CheckResult(more.ok, result.cases + more.cases, more.failure, more.worst)
    out = {"checked": result.cases, "check_ok": result.ok, "check_failure": result.failure,
           "check_worst": result.worst}
    if grads:
        out["forward_only"] = forward_only(backend)
        if result.ok and not out["forward_only"]:
            g = check_backward(backend, device)
            out.update(grad_checked=g.cases, grad_ok=g.ok, grad_failure=g.failure, grad_worst=g.worst)
    return out
