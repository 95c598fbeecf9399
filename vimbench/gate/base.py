"""Same-run comparison with a base revision (``gate --base REV``) of this vimbench checkout, or of the plug-in package
whose git repository holds the current folder (``gate --scan NAME --base REV``)."""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vimbench.errors import InputError
from vimbench.gate import store, suite
from vimbench.gate.calibration import ROUND_BUDGET_ENV, ROUND_BUDGET_S, TURN_ENV

from vimbench.gate.thresholds import TimingComparison, compare_with_base

BASE_ORDER = ("base", "current", "current", "base")
"""The turns of ``gate --base`` (``suite.run_pair``: per benchmark, its two segments of each side; ABBA), or with
a base from before turns, its suite runs in order: a load that rises or falls steadily through a benchmark's
turns weighs on both sides alike."""
BASE_CONFIRM_ATTEMPTS = 1
"""Benchmarks over their threshold are timed this many more times, base and current, in a fresh pair of
processes: one fresh pair already tells a lasting slowdown from a shift between two processes."""
BASE_ENV = {ROUND_BUDGET_ENV: str(ROUND_BUDGET_S / 2)}
"""With a base from before turns, four runs at half the rounds each (about as many rounds per side as the pair
of processes that take turns times)."""
BASE_COLUMNS = ["benchmark", "reference", "base", "current", "ratio", "threshold", "ms_base", "ms_now", "attempts",
                "status"]


def _git(*args: str, repo: Path | None = None) -> str:
    """stdout of ``git -C <repo> *args`` (default: the vimbench checkout, ``store.REPO_ROOT``); RuntimeError with
    git's message when it fails or there is no checkout."""
    repo = repo or store.REPO_ROOT
    if repo is None:
        raise RuntimeError("vimbench runs from an installed wheel, not from a checkout")
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"git {' '.join(args)} failed")
    return proc.stdout.strip()


def default_base() -> tuple[str, str]:
    """(revision, how it was chosen): the merge-base of HEAD with the default branch (origin/main, else
    main), else HEAD~1. On a clone of main itself the merge-base is HEAD: the run then compares HEAD's
    committed tree with the working tree (on a clean checkout, a tree with itself: the gate's noise).
    InputError outside a git checkout with a commit."""
    try:
        head = _git("rev-parse", "HEAD")
    except RuntimeError as e:
        raise InputError(f"no revision to compare with: {store.REPO_ROOT} is not a git checkout with a commit ({e}); "
                         f"record a baseline for this machine with `vimbench gate --update`") from None
    for branch in ("origin/main", "main"):
        try:
            rev = _git("merge-base", "HEAD", branch)
        except RuntimeError:
            continue
        same = " (HEAD itself: this compares the committed HEAD with the working tree)" if rev == head else ""
        return rev, f"the merge-base of HEAD with {branch}{same}"
    return _git("rev-parse", "HEAD~1"), "HEAD~1 (no main or origin/main branch here)"


def install_root() -> Path:
    """Where base revisions are installed: ``<cache>/gate-base`` under the compiled kernels' cache root."""
    from vimbench.kernels.selective_scan.compiled_cpu import cache_root
    return cache_root() / "gate-base"


def _install(repo: Path, rev: str, log, then=None) -> Path:
    """A folder holding revision ``rev`` of the git repository ``repo`` installed: ``site/``, for PYTHONPATH.
    Extracted from git into a temporary folder and installed with pip (no dependencies: those of this
    environment; no build isolation), under ``install_root()/<commit>``, so that a commit is installed, and its
    compiled CPU kernels are built (once per source: see ``compiled_cpu``; a revision whose kernels match this
    tree's, or another installed one's, shares their build).
    ``then(src, staged)`` adds to the folder before it is moved into place. InputError when ``rev`` is not a
    commit of ``repo``; RuntimeError with pip's output when pip fails."""
    try:
        sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", repo=repo)
    except RuntimeError:
        raise InputError(f"--base {rev}: not a commit of {repo}") from None
    out = install_root() / sha
    if (out / "site").is_dir():
        return out
    log(f"  installing {rev} ({sha[:10]}) of {repo} into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, staged = Path(tmp) / "src", Path(tmp) / "staged"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(repo), "archive", sha], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(staged / "site"), str(src)], capture_output=True, text=True)
        if pip.returncode != 0:
            raise RuntimeError(f"installing {rev} of {repo} failed:\n{(pip.stdout + pip.stderr)[-3000:]}")
        if then is not None:
            then(src, staged)
        try:
            os.replace(staged, out)
        except OSError:  # another gate installed the same commit meanwhile: use that one
            if not (out / "site").is_dir():
                raise
    return out


def install_base(rev: str, log=print) -> suite.BaseTree:
    """Revision ``rev`` of this vimbench checkout installed (``_install``), with its suite: the checkout's
    ``benchmarks/`` before the suite moved into the package, ``vimbench/gate/bench/`` since. Its suite runs
    with that folder alone on PYTHONPATH."""
    def copy_suite(src: Path, staged: Path) -> None:
        bench = src / "benchmarks"
        if not (bench / "conftest.py").is_file():
            bench = staged / "site" / "vimbench" / "gate" / "bench"
        shutil.copytree(bench, staged / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    if store.REPO_ROOT is None:
        raise InputError(f"--base {rev}: vimbench runs from an installed wheel, not from a checkout; run it in "
                         f"the repository of the plug-in that --scan names")
    out = _install(store.REPO_ROOT, rev, log, copy_suite)
    turns = TURN_ENV in (out / "site" / "vimbench" / "gate" / "calibration.py").read_text()
    return suite.BaseTree(out / "benchmarks", (out / "site",), turns)


def install_plugin_base(scan: str, rev: str, log=print) -> suite.BaseTree:
    """Revision ``rev`` of the plug-in package that registered scan backend ``scan``, installed (``_install``)
    from the git repository holding the current folder. Its suite is this vimbench's (``suite.SUITE_DIR``), run
    with the installed folder first on PYTHONPATH: that revision's distribution shadows the installed one, so
    its entry point, loaded through the usual plug-in checks, registers the base's ``scan``. InputError
    outside a git repository, or when ``rev`` installs another package than the one ``scan`` comes from."""
    from vimbench.kernels.selective_scan.backends import REGISTRY
    package = REGISTRY[scan].package
    try:
        repo = Path(_git("rev-parse", "--show-toplevel", repo=Path.cwd()))
    except RuntimeError as e:
        raise InputError(f"--scan {scan} --base {rev}: run it inside the git repository of package "
                         f"{package!r} ({e})") from None
    out = _install(repo, rev, log)
    names = {dist.metadata["Name"] for dist in importlib.metadata.distributions(path=[str(out / "site")])}
    if _normal(package) not in map(_normal, names):
        raise InputError(f"--scan {scan} --base {rev}: {repo} at {rev} installs {', '.join(sorted(names))}, not "
                         f"package {package!r} that registers scan backend {scan}")
    current = [store.REPO_ROOT] if store.REPO_ROOT is not None else []
    current += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return suite.BaseTree(suite.SUITE_DIR, (out / "site", *current))


def _normal(dist: str) -> str:
    """A distribution's name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def _suite_runs(base: suite.BaseTree, device: str, select: str | None, log, exclude, scan, tests=None) -> dict:
    """Each side's ``run_ratios`` ({'base': [...], 'current': [...]}) of the benchmarks named in ``tests`` if
    given: of one pair of processes taking turns (``suite.run_pair``, a segment for a run), or with a base
    from before turns, of the suite runs in ``BASE_ORDER``, each with ``BASE_ENV``."""
    select = select if tests is None else None
    if base.turns:
        log("  base and current suites, taking turns")
        return suite.run_pair(base, device, select, BASE_ORDER, log, tests=tests, scan=scan, exclude=exclude)
    runs = {"base": [], "current": []}
    for side in BASE_ORDER:
        log(f"  {side} suite")
        ratios, _ = suite.run_suite(device, select, log, tests=tests, scan=scan, env=BASE_ENV,
                                    base=base if side == "base" else None, exclude=() if side == "base" else exclude)
        runs[side].append(ratios)
    return runs


def check_against_base(base: suite.BaseTree, device: str, select: str | None, log=print,
                       exclude: list[str] = (), scan: str | None = None) -> TimingComparison:
    """Times the suite of the installed ``base`` (``install_base``, ``install_plugin_base``) and of this tree
    (``_suite_runs``) on ``device``, restricted to ``select`` (and to the ``SCAN_SUITE`` of ``scan``); this
    tree's without ``exclude``. Returns ``compare_with_base`` of the runs, after the
    benchmarks over their threshold are timed again, base and current alike, up to
    ``BASE_CONFIRM_ATTEMPTS`` times: each keeps its attempt with the lowest ratio, so it fails only when every
    attempt is over (a shift between one base process and one current process rarely persists through fresh
    pairs of them; a real slowdown does). Each row says its 'attempts'."""
    runs = _suite_runs(base, device, select, log, exclude, scan)
    result = compare_with_base(runs["base"], runs["current"], complete=select is None, exclude=exclude)
    attempts = {row["benchmark"]: 1 for row in result.rows}
    for i in range(BASE_CONFIRM_ATTEMPTS):
        slower = [row["benchmark"] for row in result.rows if row["status"] == "SLOWER"]
        if not slower:
            break
        log(f"  confirming {len(slower)} benchmark(s) over their threshold, base and current again "
            f"(attempt {i + 2})")
        again = _suite_runs(base, device, None, log, exclude, scan, tests=slower)
        retried = {row["benchmark"]: row for row in compare_with_base(again["base"], again["current"], False).rows}
        rows = []
        for row in result.rows:
            new = retried.get(row["benchmark"]) if row["benchmark"] in slower else None
            if new is not None:
                attempts[row["benchmark"]] += 1
                if new["ratio"] is not None and new["ratio"] < row["ratio"]:
                    row = new
            rows.append(row)
        passed = {row["benchmark"] for row in rows if row["benchmark"] in slower and row["status"] != "SLOWER"}
        result = TimingComparison(rows, [name for name in result.regressions if name not in passed], result.notes)
    for row in result.rows:
        row["attempts"] = attempts.get(row["benchmark"], 0)
    return result
