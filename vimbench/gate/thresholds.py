"""Timing baselines from several runs, their thresholds, and the comparisons that decide the timing gate."""
from __future__ import annotations

import dataclasses
import datetime
import math
import statistics

from vimbench.gate.calibration import CALIBRATION_SIZES, CLOCKS, CPU_THREADS, SUITE_ENV
from vimbench.gate.store import device_class

REFERENCES = ("matmul", "memory", "geomean")
"""Calibration references a ratio can be taken against: the matmul, the memory-bound op, or their
geometric mean sqrt(matmul * memory)."""

THRESHOLD_FLOOR = 0.20
"""No benchmark's threshold is below +20%: the spread measured while recording underestimates the drift
between then and later CI runs beside other tenants' work (a benchmark whose 10 baseline runs spread by
4.6% once came out 27% slower in CI, and as fast as its baseline when re-run)."""
THRESHOLD_SPREADS = 2.0
"""Threshold = max(floor, exp(THRESHOLD_SPREADS * s) - 1), s = largest |ln(ratio_run / median)| seen while
recording the baseline: twice the worst deviation seen, in log space."""
THRESHOLD_CEILING = 0.6
"""A threshold above +60% would let a 2x slowdown through on a bad day: such a benchmark is capped here
and marked noisy in the baseline, to be fixed (longer rounds) rather than trusted."""


def _spread(values: list[float]) -> float:
    """Largest |ln(v / median)|: the worst relative deviation from the median, in log space."""
    med = statistics.median(values)
    return max(abs(math.log(v / med)) for v in values)


def threshold_from_runs(ratios: dict[str, list[float]]) -> dict:
    """Baseline entry from one benchmark's ratios over several runs, {reference: [ratio per run]}: the
    'reference' with the smallest spread, its 'ratio' (median over runs), 'spread', 'threshold'
    (fraction; see THRESHOLD_*), 'noisy' (threshold capped), 'runs' (its ratio per run), and 'spreads'
    of every reference."""
    spreads = {ref: _spread(values) for ref, values in ratios.items()}
    ref = min(spreads, key=spreads.get)
    return {"reference": ref, "ratio": statistics.median(ratios[ref]), "spread": spreads[ref],
            "threshold": _threshold(spreads[ref]), "noisy": _threshold(spreads[ref], cap=False) > THRESHOLD_CEILING,
            "runs": ratios[ref], "spreads": spreads}


def _threshold(spread: float, cap: bool = True) -> float:
    """max(floor, exp(THRESHOLD_SPREADS * spread) - 1), at most THRESHOLD_CEILING when ``cap``."""
    raw = max(THRESHOLD_FLOOR, math.exp(THRESHOLD_SPREADS * spread) - 1)
    return min(raw, THRESHOLD_CEILING) if cap else raw


def make_timing_baseline(device: str, runs: list[dict[str, dict]], env: dict, old: dict | None,
                         scan: str | None = None) -> dict:
    """A baseline from several ``run_ratios`` results (of one scan backend's gate with ``scan``). With ``old``
    (an update of a -k selection), the entries of ``old`` not measured now are kept."""
    names = sorted(set().union(*runs))
    missing = [n for n in names if any(n not in r for r in runs)]
    if missing:
        raise RuntimeError(f"benchmarks not measured in every run: {', '.join(missing)}")
    recorded = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    benchmarks = dict(old["benchmarks"]) if old else {}
    for name in names:
        per_ref = {ref: [r[name]["ratios"][ref] for r in runs] for ref in REFERENCES}
        benchmarks[name] = {**threshold_from_runs(per_ref),
                            "seconds": statistics.median(r[name]["seconds"] for r in runs),
                            "recorded": recorded, "git_commit": env.get("git_commit", "")}
    return {"kind": "timing", "scan": scan, "device_class": device_class(device), "clock": CLOCKS[device],
            "cpu_threads": CPU_THREADS if device == "cpu" else None, "calibration": CALIBRATION_SIZES[device],
            "suite_env": SUITE_ENV, "recorded": recorded, "environment": env,
            "benchmarks": dict(sorted(benchmarks.items()))}


def _not_run(name: str, complete: bool, exclude: list[str]) -> str:
    """The status of a compared benchmark that did not run now: 'INCORRECT (not timed)' when a term of
    ``exclude`` names it, else 'MISSING' when the whole suite ran (``complete``), else '' (not compared)."""
    if any(term in name for term in exclude):
        return "INCORRECT (not timed)"
    return "MISSING" if complete else ""


@dataclasses.dataclass
class TimingComparison:
    rows: list[dict]
    regressions: list[str]
    notes: list[str]


def compare_timing(baseline: dict, now: dict[str, dict], complete: bool, exclude: list[str] = ()) -> TimingComparison:
    """Compares one run's ``run_ratios`` with a baseline. A benchmark regresses when
    ratio_now / ratio_baseline - 1 > its threshold, both ratios against the baseline entry's reference.
    ``complete``: the whole suite ran, so a baseline benchmark that did not run (deleted, or its backend
    missing here) is a failure too. A benchmark matching a term of ``exclude`` (its backend failed its
    correctness check) is a failure with no timing."""
    rows, regressions, notes = [], [], []
    for name in sorted(set(baseline["benchmarks"]) | set(now)):
        base, cur = baseline["benchmarks"].get(name), now.get(name)
        row = {"benchmark": name, "reference": "", "baseline": None, "now": None, "change": "", "threshold": "",
               "ms_now": cur["seconds"] * 1e3 if cur else None, "status": ""}
        if base is None:
            row["status"] = "new (no baseline)"
            notes.append(f"{name} has no baseline entry: record one with `vimbench gate --update -k '{name}'`")
        elif cur is None:
            row["status"] = _not_run(name, complete, exclude)
            if not row["status"]:
                continue
            regressions.append(name)
        else:
            ratio = cur["ratios"][base["reference"]]
            change = ratio / base["ratio"] - 1
            row.update(reference=base["reference"], baseline=base["ratio"], now=ratio, change=f"{change:+.1%}",
                       threshold=f"+{base['threshold']:.0%}")
            if change > base["threshold"]:
                row["status"] = "SLOWER"
                regressions.append(name)
            else:
                row["status"] = "faster" if -change > base["threshold"] else "ok"
        rows.append(row)
    return TimingComparison(rows, regressions, notes)


def compare_with_base(base_runs: list[dict], current_runs: list[dict], complete: bool,
                      exclude: list[str] = ()) -> TimingComparison:
    """Compares ``run_ratios`` of the base's runs with those of the current tree's, all from one session. Per
    benchmark, the reference is the one with the smallest spread s = largest |ln(ratio / median of its
    side)| over both sides' runs; base and current are the medians of each side's ratios; the threshold
    is ``threshold_from_runs``'s (floor, twice the spread in log space, cap). A benchmark regresses when
    current / base - 1 exceeds it. Missing, excluded and new benchmarks as in ``compare_timing``, a new
    one being one the base's suite lacks."""
    rows, regressions, notes = [], [], []
    for name in sorted(set().union(*base_runs, *current_runs)):
        base = [r[name]["ratios"] for r in base_runs if name in r]
        cur = [r[name]["ratios"] for r in current_runs if name in r]
        row = {"benchmark": name, "reference": "", "base": None, "current": None, "ratio": None, "threshold": "",
               "ms_base": statistics.median(r[name]["seconds"] for r in base_runs) * 1e3 if base else None,
               "ms_now": statistics.median(r[name]["seconds"] for r in current_runs) * 1e3 if cur else None,
               "status": ""}
        if not base:
            row["status"] = "new (not in base)"
        elif not cur:
            row["status"] = _not_run(name, complete, exclude)
            if not row["status"]:
                continue
            regressions.append(name)
        else:
            spreads = {ref: max(_spread([r[ref] for r in base]), _spread([r[ref] for r in cur])) for ref in REFERENCES}
            ref = min(spreads, key=spreads.get)
            threshold = _threshold(spreads[ref])
            b, c = statistics.median(r[ref] for r in base), statistics.median(r[ref] for r in cur)
            row.update(reference=ref, base=b, current=c, ratio=c / b, threshold=f"+{threshold:.0%}")
            if c / b - 1 > threshold:
                row["status"] = "SLOWER"
                regressions.append(name)
            else:
                row["status"] = "faster" if 1 - c / b > threshold else "ok"
        rows.append(row)
    return TimingComparison(rows, regressions, notes)


def environment_notes(baseline_env: dict, env: dict) -> list[str]:
    """One line per recorded version or machine property that differs from the baseline's."""
    keys = ("device_name", "torch_version", "triton_version", "timm_version", "cuda_version", "driver_version",
            "threads", "python_version")
    return [f"{k}: baseline {baseline_env.get(k)!r}, now {env.get(k)!r}" for k in keys
            if baseline_env.get(k) != env.get(k)]
