"""Power-law fits (exponent and its 95% CI) and crossovers, against known answers."""
import math

import numpy as np
import pytest

from vimbench.analysis.fit import crossover, fit_power_law, t_quantile_975, upper_half


@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042), (1000, 1.962)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile_975(df) == pytest.approx(expected, abs=1e-3)


def test_t_quantile_matches_closed_forms():
    # df=1 is Cauchy: t = tan(pi (p - 1/2)); df=2: t = (2p - 1) / sqrt(2 p (1 - p)); p = 0.975.
    assert t_quantile_975(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert t_quantile_975(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)


def test_fit_matches_the_least_squares_closed_form():
    # slope = Sxy / Sxx, se = sqrt(SSres / (n - 2) / Sxx) in log-log space, CI = slope +- t(0.975, n-2) se.
    x, y = np.array([197.0, 577, 1297, 2305, 6085]), np.array([3.1, 8.2, 21.0, 33.5, 97.0])
    lx, ly = np.log(x), np.log(y)
    sxx = ((lx - lx.mean()) ** 2).sum()
    k = ((lx - lx.mean()) * (ly - ly.mean())).sum() / sxx
    logc = ly.mean() - k * lx.mean()
    se = math.sqrt(((ly - logc - k * lx) ** 2).sum() / 3 / sxx)
    f = fit_power_law(x, y)
    assert (f.k, f.c) == (pytest.approx(k, rel=1e-12), pytest.approx(math.exp(logc), rel=1e-12))
    assert (f.k_lo, f.k_hi) == (pytest.approx(k - 3.182446 * se, rel=1e-6), pytest.approx(k + 3.182446 * se, rel=1e-6))


@pytest.mark.parametrize("k", [1.0, 1.5, 2.0])
def test_recovers_exponent_under_multiplicative_noise(k):
    rng = np.random.default_rng(1)
    x = np.geomspace(197, 6085, 12)
    y = 3e-3 * x ** k * np.exp(rng.normal(0, 0.05, x.size))
    f = fit_power_law(x, y)
    assert f.contains(k) and f.k_hi - f.k_lo < 0.1
    assert f.n == 12 and f.c == pytest.approx(3e-3, rel=0.3)


def test_ci_coverage_is_95_percent_with_few_points():
    # With n=5 (3 degrees of freedom) a normal quantile would cover ~0.86; the t quantile must give ~0.95.
    rng = np.random.default_rng(0)
    x = np.array([224.0, 384, 512, 768, 1024])
    hits = sum(fit_power_law(x, x ** 1.3 * np.exp(rng.normal(0, 0.1, x.size))).contains(1.3) for _ in range(2000))
    assert 0.93 <= hits / 2000 <= 0.97


def test_two_points_give_an_exact_slope_and_no_ci():
    f = fit_power_law([100, 400], [1, 16])
    assert f.k == pytest.approx(2) and math.isnan(f.k_lo) and not f.contains(2)


@pytest.mark.parametrize("x,y", [([1, 2, 3], [1, 0, 2]), ([1, 1, 1], [1, 2, 3]), ([1, 2], [1, 2, 3])])
def test_bad_fit_input_raises(x, y):
    with pytest.raises(ValueError):
        fit_power_law(x, y)


@pytest.mark.parametrize("n,kept", [(4, [3, 4]), (5, [3, 4, 5]), (6, [4, 5, 6])])
def test_upper_half_is_points_at_or_above_the_median(n, kept):
    x = np.arange(n, 0, -1) * 1.0  # unsorted on purpose
    ux, uy = upper_half(x, x * 10)
    assert list(ux) == kept and list(uy) == [10 * v for v in kept]


def test_crossover_interpolates_log_ratio_in_log_x():
    # lower is better; a/b = 2, 2, 1/2 -> log ratio goes ln2 -> -ln2 between 512 and 1024: midpoint in log x.
    c = crossover([256, 512, 1024], [2, 2, 0.5], [1, 1, 1], lower_is_better=True)
    assert c.kind == "crossing" and c.x == pytest.approx(512 * 2 ** 0.5) and c.sign_changes == 1
    # a/b = 2 then 1/4: ln2 -> -2 ln2, a third of the way: 512 * 2^(1/3).
    c = crossover([512, 1024], [2, 0.25], [1, 1], lower_is_better=True)
    assert c.x == pytest.approx(512 * 2 ** (1 / 3))


def test_crossover_for_higher_is_better():
    # throughput: A/B = 0.5 at 400, 2 at 800 -> parity at sqrt(400 * 800)
    c = crossover([400, 800], [50, 200], [100, 100], lower_is_better=False)
    assert c.kind == "crossing" and c.x == pytest.approx(math.sqrt(400 * 800))
    assert c.describe(" px") == f"~ {math.sqrt(400 * 800):.0f} px"


def test_crossover_none_in_range_and_below_range():
    none = crossover([224, 512, 1024], [3, 2, 1.5], [1, 1, 1], lower_is_better=True)
    assert none.kind == "none in range" and none.x is None and none.describe() == "none in range"
    below = crossover([512, 224, 1024], [0.5, 0.9, 0.2], [1, 1, 1], lower_is_better=True)
    assert below.kind == "below range" and below.x == 224 and below.sign_changes == 0


def test_crossover_reports_the_last_crossing_when_curves_cross_back():
    # better, worse, worse, better, better: A stays better from between 768 and 1024 on.
    c = crossover([256, 512, 768, 1024, 1280], [0.9, 1.2, 1.1, 0.8, 0.7], [1] * 5, lower_is_better=True)
    frac = math.log(1.1) / (math.log(1.1) - math.log(0.8))
    assert c.kind == "crossing" and c.sign_changes == 2
    assert c.x == pytest.approx(math.exp(math.log(768) + frac * math.log(1024 / 768)))


def test_tie_is_not_better():
    c = crossover([256, 512, 1024], [1, 1, 0.5], [1, 1, 1], lower_is_better=True)
    assert c.kind == "crossing" and c.x == pytest.approx(512)
