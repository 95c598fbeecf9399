"""Scaling exponents and crossovers from measured sweeps.

Power law: ``metric ~ c * x**k``, fitted by ordinary least squares of ``log y`` on ``log x``
(``scipy.stats.linregress``). The 95% confidence interval of ``k`` is ``k +- t(0.975, n - 2) * se(k)``, with
the Student-t quantile from ``scipy.stats.t``.

Crossover: the x where curve A becomes better than curve B *and stays better* through the end of the
measured range. Between the two measured points that bracket it, ``log(a / b)`` is interpolated linearly
in ``log x`` (each curve is treated as a local power law). If A is already better at the first common
point, the result is "below range" with x = that first point; if A is not better at the last common
point, "none in range" with x = None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile t(0.975, df) for integer ``df >= 1`` (12.706 for df=1,
    2.228 for df=10, -> 1.960 as df grows)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    from scipy import stats  # here, not at the top: scipy.stats takes seconds to import and most commands never fit
    return float(stats.t.ppf(0.975, df))


@dataclass(frozen=True)
class PowerLawFit:
    """``y ~ c * x**k`` fitted on ``n`` points; ``k_lo``/``k_hi`` bound the 95% CI (NaN when n == 2)."""
    k: float
    k_lo: float
    k_hi: float
    c: float
    n: int

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies inside the 95% CI (False when there is no CI)."""
        return bool(self.k_lo <= value <= self.k_hi)


def fit_power_law(x, y) -> PowerLawFit:
    """Least-squares fit of ``log y = log c + k log x``. Needs at least two distinct, positive x and
    positive y (ValueError otherwise); the CI needs at least three points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-d and of equal length")
    if (x <= 0).any() or (y <= 0).any() or not np.isfinite(x).all() or not np.isfinite(y).all():
        raise ValueError("a power-law fit needs finite, positive x and y")
    if np.unique(x).size < 2:
        raise ValueError("a power-law fit needs at least two distinct x values")
    from scipy import stats
    fit = stats.linregress(np.log(x), np.log(y))
    k, logc, n = fit.slope, fit.intercept, x.size
    if n < 3:
        return PowerLawFit(float(k), math.nan, math.nan, _exp(logc), n)
    half = t_quantile_975(n - 2) * fit.stderr
    return PowerLawFit(float(k), float(k - half), float(k + half), _exp(logc), n)


def _exp(logc: float) -> float:
    """e**logc, inf where that overflows a float (a prefactor of values near the float range)."""
    return math.exp(logc) if logc < 709.0 else math.inf


def upper_half(x, y):
    """The points whose x is at or above the median x of the sweep (3 of 5, 3 of 6, 2 of 4), as
    (x, y) arrays sorted by x: the part of a sweep where the asymptotic exponent shows."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.argsort(x)
    keep = order[x[order] >= np.median(x)]
    return x[keep], y[keep]


@dataclass(frozen=True)
class Crossover:
    """Where curve A becomes better than curve B for good.

    ``kind`` is "crossing" (x interpolated between two measured points), "below range" (A is better at
    every common point from the first one on, x = the first common x) or "none in range" (A is not
    better at the last common point, x = None). ``sign_changes`` counts how often "A better" flips over
    the common points (more than one means the curves touch or cross back: read with care).
    """
    kind: str
    x: float | None
    sign_changes: int

    def describe(self, unit: str = "") -> str:
        """One phrase for a report, e.g. "~ 702 px", "at or below 224 px (first common point)", "none in range"."""
        if self.kind == "none in range":
            return "none in range"
        if self.kind == "below range":
            return f"at or below {self.x:g}{unit} (first common point)"
        return f"~ {self.x:.0f}{unit}"


def crossover(x, a, b, lower_is_better: bool) -> Crossover:
    """The x from which curve ``a`` stays better than curve ``b`` (see the module docstring).

    ``x``, ``a``, ``b``: equal-length sequences of the points where both curves were measured, positive;
    ``lower_is_better`` is True for latency or memory, False for throughput. Ties count as "not better".
    """
    x, a, b = (np.asarray(v, dtype=float) for v in (x, a, b))
    if not (x.shape == a.shape == b.shape) or x.size == 0:
        raise ValueError("x, a and b must be non-empty and of equal length")
    if (x <= 0).any() or (a <= 0).any() or (b <= 0).any():
        raise ValueError("crossover needs positive x and positive curve values")
    order = np.argsort(x)
    x, a, b = x[order], a[order], b[order]
    g = np.log(a / b) * (1 if lower_is_better else -1)  # g < 0 <=> A better
    better = g < 0
    flips = int((better[1:] != better[:-1]).sum())
    if not better[-1]:
        return Crossover("none in range", None, flips)
    if better.all():
        return Crossover("below range", float(x[0]), flips)
    j = int(np.flatnonzero(~better)[-1])  # last point where A is not better; A better from j+1 on
    lx0, lx1 = math.log(x[j]), math.log(x[j + 1])
    frac = g[j] / (g[j] - g[j + 1])  # g[j] >= 0 > g[j+1], so 0 <= frac < 1
    return Crossover("crossing", float(math.exp(lx0 + frac * (lx1 - lx0))), flips)


def fit_sweep(x, y) -> tuple[PowerLawFit | None, PowerLawFit | None]:
    """(whole-sweep fit, upper-half fit) of ``y ~ x^k`` over the points with finite, positive x and y;
    None where fewer than two distinct x remain. The one place a sweep's exponents are fitted: the
    report, the figures and ``vimbench kernels`` all read them from here."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if np.unique(x).size < 2:
        return None, None
    ux, uy = upper_half(x, y)
    return fit_power_law(x, y), (fit_power_law(ux, uy) if np.unique(ux).size >= 2 else None)


def describe_fit(f: PowerLawFit | None, ci: bool = True) -> str:
    """"k [lo, hi] (n=N)" with ``ci``, else "k"; "n/a" for no fit."""
    if f is None:
        return "n/a"
    if not ci:
        return f"{f.k:.2f}"
    return f"{f.k:.2f} " + ("no CI" if math.isnan(f.k_lo) else f"[{f.k_lo:.2f}, {f.k_hi:.2f}]") + f" (n={f.n})"
