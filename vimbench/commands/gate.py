"""`vimbench gate`: fail CI when a kernel or model got slower (timing gate) or when FLOP counts or the compiled
Triton kernels' resources changed (``--deterministic``). See ``vimbench.gate`` for the method."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import click
import torch

from vimbench.commands import options as o
from vimbench.gate import base, store, suite, thresholds
from vimbench.gate import deterministic as exact
from vimbench.gate.calibration import suite_environment
from vimbench.errors import BackendUnavailable, InputError
from vimbench.kernels.selective_scan import check_scan_backend
from vimbench.measure.verify import check_scans
from vimbench.kernels.selective_scan.backends import scan_plugins
from vimbench.present.tables import format_table

TIMING_COLUMNS = ["benchmark", "reference", "baseline", "now", "change", "threshold", "ms_now", "attempts", "status"]
UPDATE_COLUMNS = ["benchmark", "reference", "ratio", "spread", "threshold", "ms", "noisy"]
DIFF_COLUMNS = ["section", "item", "field", "baseline", "now", "change"]


@click.command("gate")
@click.option("--deterministic", is_flag=True,
              help="Check FLOP counts and compiled kernel resources instead of timings (no noise, no GPU needed).")
@click.option("--update", is_flag=True, help="Record a new baseline instead of checking against it.")
@o.device_option
@click.option("-k", "select", default=None, help="Only the benchmarks matching this pytest -k expression.")
@click.option("--runs", type=int, default=None,
              help=f"With --update: suite runs whose spread sets the thresholds, every other one beside a "
                   f"synthetic co-tenant process (default {suite.DEFAULT_BASELINE_RUNS}, at least "
                   f"{suite.MIN_BASELINE_RUNS}).")
@click.option("--scan", default=None,
              help="Gate one scan backend (a plug-in's, in its own CI): the scan at the small and Vim-Ti 1248 "
                   "shapes and the whole Vim-Ti forward with it (default baseline: "
                   "vimbench-gate-<NAME>-<cpu-model or gpu name>.json in the current folder).")
@click.option("--baseline", "baseline_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Baseline file (default, in a checkout: benchmarks/baselines/<machine key>.json, or "
                   "deterministic.json).")
@click.option("--base", "base_rev", default=None,
              help="Compare with revision BASE of this repository (with --scan NAME of a plug-in: of the plug-in's "
                   "repository, the current folder's), both timed in this run, instead of a stored baseline "
                   "(default when none is stored for this machine: the merge-base of HEAD with origin/main or "
                   "main, else HEAD~1).")
@click.pass_context
def command(ctx, deterministic, update, device_spec, select, runs, scan, baseline_path, base_rev):
    """Regression gate for CI. Exits 1 on a regression, with a table of what moved, 0 otherwise.

    Timing gate (default): runs the pytest-benchmark suite (vimbench/gate/bench/) once, every round timed
    against a fixed matmul and a fixed memory-bound op measured just before it, and fails when a benchmark's
    median ratio grew by more than the threshold its baseline derived from measured run-to-run noise,
    in its first run and in two confirming re-runs.

    --deterministic: FLOPs of every registered model at fixed shapes and the registers, spills and shared
    memory of the Triton kernels compiled for sm_80 and sm_90 must equal the baseline exactly.

    --update records a new baseline (the timing one from --runs runs, every other one beside a synthetic
    co-tenant process; with -k, only the selected entries are replaced).

    --base REV: installs REV of this repository into a cache folder (its own compiled kernels) and runs its
    suite and this tree's in two processes taking turns, benchmark by benchmark (base, current, current, base),
    on this machine, each benchmark's threshold from the spread of those turns; no stored baseline is read or
    written. This is also what the timing gate does, saying so, on a machine without a stored baseline. With
    --scan NAME of a plug-in, run in the plug-in's repository: REV of that package is installed instead, its
    suite runs with it first on the path (its entry point registers the base's NAME), and only NAME's
    benchmarks are timed.
    """
    if runs is not None and not update:
        raise InputError("--runs applies to --update only")
    if runs is not None and runs < suite.MIN_BASELINE_RUNS:
        raise InputError(f"--runs must be >= {suite.MIN_BASELINE_RUNS} to measure the noise, got {runs}")
    if baseline_path is not None and baseline_path.is_dir():
        raise InputError(f"--baseline {str(baseline_path)!r} is a directory; name a .json file")
    if base_rev is not None and (update or baseline_path or deterministic):
        raise InputError("--base compares with a revision: it excludes --update, --baseline and --deterministic")
    if deterministic:
        explicit_device = ctx.get_parameter_source("device_spec") != click.core.ParameterSource.DEFAULT
        if explicit_device or select or runs is not None or scan:
            raise InputError("--device, -k, --runs and --scan apply to the timing gate, not --deterministic")
        return _deterministic(update, baseline_path or store.deterministic_baseline_path())
    device = o.resolve_device(device_spec).type
    if scan:
        try:
            check_scan_backend(scan, device)
        except InputError:  # not the name's fault (a time limit's variable)
            raise
        except (ValueError, BackendUnavailable) as e:
            raise InputError(f"--scan {scan}: {e}") from None
    path = baseline_path or (Path(f"vimbench-gate-{scan}-{store.device_class(device)}.json") if scan
                             else store.timing_baseline_path(device))
    if base_rev is None and not (update or baseline_path or scan or path.exists()):
        base_rev, why = base.default_base()
        click.echo(f"timing gate: no stored baseline for this machine ({path}): comparing with {why}, "
                   f"{base_rev[:10]}, timed in this run instead")
    baseline = None if update or base_rev else store.load_baseline(path, "timing")
    if baseline is not None and baseline.get("scan") != scan:
        raise InputError(f"--baseline {path} is the baseline of {baseline.get('scan') or 'the whole suite'}, "
                         f"not of --scan {scan}")
    tree = _install_base(device, base_rev, scan) if base_rev else None  # a bad revision fails before the checks
    if base_rev and tree is None:
        return 1
    failed = check_scans(suite.timed_scans(device, scan), device, click.echo)
    for name, why in failed.items():
        click.echo(f"timing gate: scan backend {name} is not timed: {why}", err=True)
    if failed and (update or scan):
        click.echo("timing gate: FAILED: correctness before speed; nothing timed", err=True)
        return 1
    if base_rev:
        return _check_base(device, select, base_rev, tree, suite.excluded_terms(list(failed), device), scan)
    if update:
        return _update_timing(device, select, suite.DEFAULT_BASELINE_RUNS if runs is None else runs, path, scan)
    return _check_timing(device, select, path, baseline, scan, suite.excluded_terms(list(failed), device))


def _check_timing(device: str, select: str | None, path: Path, baseline: dict, scan: str | None,
                  exclude: list[str]) -> int:
    click.echo(f"timing gate on {device}: baseline {path} (recorded {baseline['recorded']})")
    try:
        result, env = suite.check_timing(baseline, device, select, log=click.echo, scan=scan, exclude=exclude)
    except RuntimeError as e:
        click.echo(f"timing gate: FAILED: {e}", err=True)
        return 1
    click.echo(format_table(result.rows, TIMING_COLUMNS))
    click.echo("baseline, now: seconds per call / seconds of the reference calibration, median over rounds "
               "(now: the fastest of its attempts); change = now / baseline - 1")
    for line in result.notes + thresholds.environment_notes(baseline["environment"], env):
        click.echo(f"note: {line}")
    return _verdict(result, "the baseline")


def _verdict(result: thresholds.TimingComparison, against: str) -> int:
    """Prints the verdict's line; 1 on a regression, else 0."""
    if result.regressions:
        click.echo(f"timing gate: FAILED: {len(result.regressions)} benchmark(s) slower than {against} by more "
                   f"than their threshold, or missing: {', '.join(result.regressions)}", err=True)
        return 1
    click.echo(f"timing gate: ok ({sum(r['status'] in ('ok', 'faster') for r in result.rows)} benchmarks "
               f"within their thresholds of {against})")
    return 0


def _install_base(device: str, rev: str, scan: str | None) -> suite.BaseTree | None:
    """REV installed: of the plug-in package that registers ``scan``, else of vimbench; None (said on stderr)
    when pip fails."""
    plugin = scan_plugins().get(scan)
    what = f"package {plugin.package!r} (scan backend {scan})" if plugin else "vimbench"
    click.echo(f"timing gate on {device}: {what} at base {rev} against this tree, timed in one run")
    try:
        return base.install_plugin_base(scan, rev, click.echo) if plugin else base.install_base(rev, click.echo)
    except RuntimeError as e:
        click.echo(f"timing gate: FAILED: {e}", err=True)
        return None


def _check_base(device: str, select: str | None, rev: str, tree: suite.BaseTree, exclude: list[str],
                scan: str | None) -> int:
    start = time.monotonic()
    try:
        result = base.check_against_base(tree, device, select, click.echo, exclude, scan)
    except RuntimeError as e:
        click.echo(f"timing gate: FAILED: {e}", err=True)
        return 1
    click.echo(format_table(result.rows, base.BASE_COLUMNS))
    click.echo(f"base, current: seconds per call / seconds of the reference calibration, median over each side's "
               f"turns ({', '.join(base.BASE_ORDER)}); ratio = current / base; threshold from the spread of "
               f"these runs; {time.monotonic() - start:.0f} s")
    return _verdict(result, f"base {rev}")


def _update_timing(device: str, select: str | None, runs: int, path: Path, scan: str | None) -> int:
    if path.exists():  # only a baseline is ever replaced, never another file
        store.load_baseline(path, "timing")
    old = store.load_baseline(path, "timing") if select and path.exists() else None
    try:
        results = suite.record_runs(device, select, runs, log=click.echo, scan=scan)
    except RuntimeError as e:
        click.echo(f"timing gate --update: FAILED: {e}", err=True)
        return 1
    baseline = thresholds.make_timing_baseline(device, [r for r, _ in results], results[-1][1], old, scan)
    store.save_baseline(path, baseline)
    measured = results[0][0]
    rows = [{"benchmark": name, "reference": b["reference"], "ratio": b["ratio"], "spread": f"{b['spread']:.1%}",
             "threshold": f"+{b['threshold']:.0%}", "ms": b["seconds"] * 1e3, "noisy": "NOISY" if b["noisy"] else ""}
            for name, b in baseline["benchmarks"].items() if name in measured]
    click.echo(format_table(rows, UPDATE_COLUMNS))
    click.echo(f"spread = largest |ln(ratio / median)| over the {runs} runs; median spread "
               f"{statistics.median(b['spread'] for b in baseline['benchmarks'].values()):.1%}")
    click.echo(f"wrote {path} ({len(rows)} benchmarks measured)")
    return 0


def _deterministic(update: bool, path: Path) -> int:
    if update and path.exists():  # only a baseline is ever replaced, never another file
        store.load_baseline(path, "deterministic")
    snapshot = exact.deterministic_snapshot()
    counts = f"{len(snapshot['flops'])} FLOP counts, {len(snapshot['kernels'])} kernel compilations"
    if update:
        previous = store.load_baseline(path, "deterministic") if path.exists() else None
        store.save_baseline(path, exact.make_deterministic_baseline(snapshot, previous))
        click.echo(f"wrote {path} ({counts}, Triton {snapshot['triton']})")
        return 0
    baseline = store.load_baseline(path, "deterministic")
    diff = exact.compare_deterministic(baseline, snapshot)
    missing = exact.missing_triton_baseline(baseline, snapshot)
    if missing:
        click.echo(f"deterministic gate: {missing}", err=True)
        counts = f"{len(snapshot['flops'])} FLOP counts"
    if not diff:
        click.echo(f"deterministic gate: ok ({counts} equal to {path})")
        return 0
    click.echo(format_table(diff, DIFF_COLUMNS))
    env = suite_environment(torch.device("cpu"))
    for line in thresholds.environment_notes(baseline["environment"], env):
        click.echo(f"note: {line}")
    click.echo(f"deterministic gate: FAILED: {len(diff)} difference(s) from {path}; if intended, record them "
               f"with `vimbench gate --deterministic --update`", err=True)
    return 1
