"""Same-run comparison with a base revision of this repository (``gate --base REV``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vimbench.errors import InputError
from vimbench.gate import store, suite
from vimbench.gate.calibration import ROUND_BUDGET_ENV, ROUND_BUDGET_S

from vimbench.gate.thresholds import TimingComparison, compare_with_base

BASE_ORDER = ("base", "current", "current", "base")
"""The suite runs of ``gate --base``, in order (ABBA): a load that rises or falls steadily through the run
weighs on both sides alike."""
BASE_ENV = {ROUND_BUDGET_ENV: str(ROUND_BUDGET_S / 2)}
"""Four runs at half the rounds each: the comparison takes about twice one stored-baseline run."""
BASE_COLUMNS = ["benchmark", "reference", "base", "current", "ratio", "threshold", "ms_base", "ms_now", "status"]


def _git(*args: str) -> str:
    """stdout of ``git -C <checkout> *args``; RuntimeError with git's message when it fails or there is no
    checkout (``store.REPO_ROOT``)."""
    if store.REPO_ROOT is None:
        raise RuntimeError("vimbench runs from an installed wheel, not from a checkout")
    proc = subprocess.run(["git", "-C", str(store.REPO_ROOT), *args], capture_output=True, text=True)
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


def install_base(rev: str, log=print) -> Path:
    """A folder with revision ``rev`` of this repository installed: ``site/`` (the vimbench package, for
    PYTHONPATH) and ``benchmarks/`` (its suite: the checkout's ``benchmarks/`` before the suite moved into the
    package, ``vimbench/gate/bench/`` since). Extracted from git into a temporary folder and installed
    with pip (no dependencies: those of this environment), under ``<cache>/gate-base/<commit>`` (the
    compiled kernels' cache root), so that its compiled CPU kernels, keyed by their source folder, build
    once per commit. InputError when ``rev`` is not a commit of this repository."""
    from vimbench.kernels.selective_scan.compiled_cpu import cache_root
    try:
        sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except RuntimeError:
        raise InputError(f"--base {rev}: not a commit of {store.REPO_ROOT}") from None
    out = cache_root() / "gate-base" / sha
    if (out / "site").is_dir() and (out / "benchmarks").is_dir():
        return out
    log(f"  installing {rev} ({sha[:10]}) into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, staged = Path(tmp) / "src", Path(tmp) / "staged"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(store.REPO_ROOT), "archive", sha], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(staged / "site"), str(src)], capture_output=True, text=True)
        if pip.returncode != 0:
            raise RuntimeError(f"installing {rev} failed:\n{(pip.stdout + pip.stderr)[-3000:]}")
        suite = src / "benchmarks"
        if not (suite / "conftest.py").is_file():
            suite = staged / "site" / "vimbench" / "gate" / "bench"
        shutil.copytree(suite, staged / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
        try:
            os.replace(staged, out)
        except OSError:  # another gate installed the same commit meanwhile: use that one
            if not (out / "site").is_dir():
                raise
    return out


def check_against_base(base: Path, device: str, select: str | None, log=print,
                       exclude: list[str] = ()) -> TimingComparison:
    """Runs the suite of the installed ``base`` (``install_base``) and of this tree in ``BASE_ORDER``, each
    with ``BASE_ENV``, on ``device``, restricted to ``select``; this tree's without ``exclude``. Returns
    ``compare_with_base`` of the runs."""
    runs = {"base": [], "current": []}
    for side in BASE_ORDER:
        log(f"  {side} suite")
        ratios, _ = suite.run_suite(device, select, log, env=BASE_ENV, base=base if side == "base" else None,
                              exclude=() if side == "base" else exclude)
        runs[side].append(ratios)
    return compare_with_base(runs["base"], runs["current"], complete=select is None, exclude=exclude)
