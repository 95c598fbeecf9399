"""Running the benchmark suite (``bench/``) in a subprocess and reading its ratios; recording several runs;
checking one run against a baseline with confirming re-runs."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vimbench.errors import BackendUnavailable, InputError
from vimbench.gate.calibration import CLOCKS, SUITE_ENV, TURN_ENV, segment_starts
from vimbench.gate.store import REPO_ROOT
from vimbench.gate.thresholds import TimingComparison, compare_timing

SUITE_DIR = Path(__file__).resolve().parent / "bench"
"""The pytest-benchmark suite, shipped inside the package: an installed vimbench and a plug-in are all that
``vimbench gate --scan NAME`` needs."""
MIN_BASELINE_RUNS = 4
DEFAULT_BASELINE_RUNS = 10
COTENANT_SOURCE = """
import torch
torch.set_num_threads(1)
a, x = torch.randn(1024, 1024), torch.randn(32 * 2**20)
y = torch.empty_like(x)
while True:
    for _ in range(5):
        a @ a
    torch.add(x, 1.0, out=y)
"""
"""The synthetic co-tenant: one thread alternating five 1024^2 float32 matmuls and an add over 128 MiB, like
another engineer's tests on the same machine."""
CONFIRM_ATTEMPTS = 2
"""Benchmarks over their threshold are run again, alone, up to this many times; each keeps its fastest
attempt, so it fails only when every attempt is over. A real slowdown persists; a neighbour's burst rarely
lasts through all attempts."""

PLUGIN_AUTOLOAD = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
"""The suite's pytest loads pytest-benchmark alone (named with -p), not every pytest plug-in installed: importing
hypothesis's took about a tenth of a suite run's CPU time, paid by every suite process."""

SCAN_SUITE = ("test_bench_scan.py", "test_bench_models.py::test_vim_tiny_scan")
"""The benchmarks of one scan backend's gate (the suite run with ``--scan NAME``)."""

PLANTED_SLOWDOWN_ENV = "VIMBENCH_BENCH_SLOWDOWN"
"""A slowdown the tests plant in this tree's suite (read by bench/conftest.py); a base revision runs without it."""


@dataclass(frozen=True)
class BaseTree:
    """A base revision installed for ``gate --base`` (``base.install_base``, ``base.install_plugin_base``): the
    benchmark suite its process runs, and that process's PYTHONPATH, the installed revision first."""
    suite: Path
    path: tuple[Path, ...]
    turns: bool = True
    """Whether its suite takes turns (``calibration.TURN_ENV``; revisions before it did not: ``base.check_against_base``
    runs those in separate processes)."""


def timed_scans(device: str, scan: str | None) -> list[str]:
    """The scan backends the suite times on ``device``: ``scan`` alone for one backend's gate; else every
    built-in that can run there (triton on CUDA only: the interpreter is not a benchmark)."""
    from vimbench.kernels.selective_scan import SCAN_BACKENDS, check_scan_backend
    if scan:
        return [scan]
    out = []
    for name in SCAN_BACKENDS:
        try:
            check_scan_backend(name, device)
        except BackendUnavailable:
            continue
        if name != "triton" or device == "cuda":
            out.append(name)
    return out


def excluded_terms(failed: list[str], device: str) -> list[str]:
    """pytest -k terms naming the benchmarks of the scan backends in ``failed``: their scan benchmarks
    ('[name]'), and the default Vim-Ti forward when ``auto`` runs one of them on ``device``."""
    from vimbench.kernels.selective_scan import resolve_scan_backend
    terms = [f"[{name}]" for name in failed]
    if resolve_scan_backend("auto", device) in failed:
        terms.append("test_model[vim_tiny]")
    return terms


def run_ratios(bench_json: dict, segment: tuple[int, int] = (0, 1)) -> dict[str, dict]:
    """{'<file>::<test>': {'ratios': {reference: ratio}, 'seconds', 'rounds'}} from one pytest-benchmark
    JSON of the suite: each ratio is the median over rounds of (seconds per call) / (that round's
    reference seconds); 'seconds' is the median seconds per call. ``segment`` (k, S): of the k-th of S
    contiguous segments of each benchmark's rounds alone (``calibration.segment_starts``)."""
    k, segments = segment
    out = {}
    for bench in bench_json["benchmarks"]:
        info = bench["extra_info"]
        per_call = [t / info["inner"] for t in bench["stats"]["data"]]
        refs = {"matmul": info["calibration_matmul_s"], "memory": info["calibration_memory_s"]}
        refs["geomean"] = [math.sqrt(m * s) for m, s in zip(refs["matmul"], refs["memory"])]
        part = slice(*(segment_starts(len(per_call), segments) + [len(per_call)])[k:k + 2])
        per_call, refs = per_call[part], {name: ref[part] for name, ref in refs.items()}
        ratios = {name: statistics.median(t / c for t, c in zip(per_call, ref)) for name, ref in refs.items()}
        out[bench["fullname"]] = {"ratios": ratios, "seconds": statistics.median(per_call), "rounds": len(per_call)}
    return out


def segment_ratios(bench_json: dict) -> list[dict[str, dict]]:
    """``run_ratios`` of each segment of a suite run that took turns (``extra_info['segments']``, 1 if absent):
    a segment stands for one run in a comparison's spread."""
    segments = max((b["extra_info"].get("segments", 1) for b in bench_json["benchmarks"]), default=1)
    return [run_ratios(bench_json, (k, segments)) for k in range(segments)]


def _suite_command(device: str, select: str | None, tests: list[str] | None, scan: str | None, exclude: list[str],
                   base: BaseTree | None, env: dict | None, folder: Path) -> tuple[list[str], dict, Path]:
    """(command, environment, JSON path) of one suite run in ``folder`` (arguments as in ``run_suite``)."""
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise InputError("the timing gate runs its suite with pytest-benchmark: pip install 'vimbench[gate]'")
    suite_dir, env = SUITE_DIR, {**SUITE_ENV, **PLUGIN_AUTOLOAD, **(env or {})}
    if base is not None:  # the base's package first on the path; the suite's process runs in a temporary folder
        suite_dir, env["PYTHONPATH"] = base.suite, os.pathsep.join(map(str, base.path))
    elif REPO_ROOT is not None:  # this checkout's package, installed or not
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    out_json = folder / "bench.json"
    paths = [str(suite_dir / t) for t in tests or (SCAN_SUITE if scan else [""])]
    cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "pytest_benchmark.plugin", "-p", "no:cacheprovider",
           f"--rootdir={suite_dir}",
           f"--device={device}", f"--benchmark-timer={CLOCKS[device]}", "--benchmark-disable-gc",
           f"--benchmark-json={out_json}", "--benchmark-columns=median,iqr,rounds"]
    if scan:
        cmd += [f"--scan={scan}"]
    terms = ([f"({select})"] if select else []) + [f"not {t}" for t in exclude]
    if terms:
        cmd += ["-k", " and ".join(terms)]
    # an xdist worker's variables would make pytest-benchmark in the suite's process disable itself (no JSON)
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith("PYTEST_XDIST_") and (base is None or k != PLANTED_SLOWDOWN_ENV)}
    return cmd, {**inherited, **env}, out_json


def _suite_result(returncode: int, output: str, out_json: Path, select: str | None) -> dict:
    """The pytest-benchmark JSON of a finished suite run; InputError when nothing matched ``select``, RuntimeError
    with pytest's ``output`` when it failed."""
    if returncode == 5:
        raise InputError(f"no benchmark matches -k {select!r}" if select else "the benchmark suite is empty")
    if returncode == 4 and select:  # a usage error: of the arguments built here, only -k comes from the user
        why = next((line.removeprefix("ERROR: ") for line in output.splitlines() if line.startswith("ERROR:")), "")
        raise InputError(f"-k {select!r} is not a pytest -k expression: {why}".rstrip(": "))
    if returncode != 0:
        raise RuntimeError(f"the benchmark suite failed (pytest exit {returncode}):\n{output[-6000:]}")
    if not out_json.exists():
        raise RuntimeError(f"the benchmark suite passed but pytest-benchmark wrote no results:\n{output[-6000:]}")
    return json.loads(out_json.read_text())


def run_suite(device: str, select: str | None, log=print, tests: list[str] | None = None, scan: str | None = None,
              exclude: list[str] = (), base: BaseTree | None = None,
              env: dict | None = None) -> tuple[dict[str, dict], dict]:
    """Runs the benchmark suite once in a subprocess on ``device`` ('cpu' | 'cuda'), restricted to the
    pytest ``-k`` expression ``select``, to the benchmarks named in ``tests`` ('<file>::<test>') if
    given, and without those matching a -k term in ``exclude``; with ``scan``, the ``SCAN_SUITE`` of that
    backend. With ``base`` its suite runs, on its PYTHONPATH (the packages of that revision before this
    environment's), without a slowdown planted for this tree (``PLANTED_SLOWDOWN_ENV``, the
    tests' hook). ``env``: extra environment variables of the suite's process. Returns
    (``run_ratios`` of it, the run's environment). InputError when nothing matches ``select`` or
    pytest-benchmark is not installed; RuntimeError (with pytest's output) when a benchmark fails."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd, env, out_json = _suite_command(device, select, tests, scan, exclude, base, env, Path(tmp))
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
        bench_json = _suite_result(proc.returncode, proc.stdout + proc.stderr, out_json, select)
    ratios = run_ratios(bench_json)
    log(f"  ran {len(ratios)} benchmarks in {time.monotonic() - start:.0f} s")
    return ratios, bench_json["vimbench_environment"]


def run_pair(base: BaseTree, device: str, select: str | None, order: tuple[str, ...], log=print,
             tests: list[str] | None = None, scan: str | None = None,
             exclude: list[str] = ()) -> dict[str, list[dict[str, dict]]]:
    """Runs the suite of ``base`` and this tree's (without ``exclude``; the other arguments as in ``run_suite``)
    in two processes at once that take turns (``calibration.TURN_ENV``): both start, load and collect side by
    side; from the first turn of both on, one runs while the other waits, granted in the repeating ``order``
    of 'base' and 'current' (a side that finished is skipped). Each benchmark takes ``TURN_SEGMENTS`` turns, so
    with equal suites ``order`` ('base', 'current', 'current', 'base') times every benchmark's two segments
    of each side back to back. Returns {'base': ``segment_ratios``, 'current': ...}. Errors as ``run_suite``'s;
    when one side fails, the other is stopped."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        start, sides = time.monotonic(), {}
        for side in ("base", "current"):
            folder = Path(tmp) / side
            folder.mkdir()
            cmd, env, out_json = _suite_command(device, select, tests, scan, () if side == "base" else exclude,
                                                base if side == "base" else None, None, folder)
            grant_r, grant_w = os.pipe()
            ready_r, ready_w = os.pipe()
            output = stack.enter_context(open(folder / "output.txt", "w+"))
            proc = subprocess.Popen(cmd, cwd=folder, env={**env, TURN_ENV: f"{grant_r},{ready_w}"}, stdout=output,
                                    stderr=subprocess.STDOUT, pass_fds=(grant_r, ready_w))
            stack.callback(proc.wait)
            stack.callback(proc.kill)
            for fd in (grant_r, ready_w):
                os.close(fd)
            for fd in (grant_w, ready_r):
                stack.callback(os.close, fd)
            sides[side] = (proc, grant_w, ready_r, output, out_json)
        waiting = {side: os.read(ready_r, 1) == b"y" for side, (_, _, ready_r, _, _) in sides.items()}
        turn = 0
        while any(waiting.values()):
            side = order[turn % len(order)]
            turn += 1
            if waiting[side]:
                _, grant_w, ready_r, _, _ = sides[side]
                os.write(grant_w, b"g")
                waiting[side] = os.read(ready_r, 1) == b"y"
                if not waiting[side] and sides[side][0].wait() != 0:
                    break  # its error is raised below, the other side stopped on the way out
        runs = {}
        for side in sorted(sides, key=waiting.get):  # the finished first: a side still waiting never ends by itself
            proc, _, _, output, out_json = sides[side]
            proc.wait()
            output.seek(0)
            runs[side] = segment_ratios(_suite_result(proc.returncode, output.read(), out_json, select))
    log(f"  ran {len(runs['current'][0])} benchmarks of each side, taking turns, in {time.monotonic() - start:.0f} s")
    return runs


@contextlib.contextmanager
def cotenant():
    """Runs ``COTENANT_SOURCE`` in a separate process for the duration of the block."""
    proc = subprocess.Popen([sys.executable, "-c", COTENANT_SOURCE], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def record_runs(device: str, select: str | None, runs: int, log=print,
                scan: str | None = None) -> list[tuple[dict[str, dict], dict]]:
    """``runs`` results of ``run_suite`` (``scan`` as there); the odd-numbered runs (2nd, 4th, ...) beside
    ``cotenant()``."""
    results = []
    for i in range(runs):
        beside = i % 2 == 1
        log(f"run {i + 1}/{runs} on {device}{' beside a co-tenant process' if beside else ''}")
        with cotenant() if beside else contextlib.nullcontext():
            results.append(run_suite(device, select, log, scan=scan))
    return results


# ----------------------------------------------------------------------------------------------------
# Timing baselines and comparison
def check_timing(baseline: dict, device: str, select: str | None, log=print, scan: str | None = None,
                 exclude: list[str] = ()) -> tuple[TimingComparison, dict]:
    """Runs the suite (``select``, ``scan`` and ``exclude`` as in ``run_suite``), compares with ``baseline``
    (``compare_timing``), re-runs what is over its threshold (``CONFIRM_ATTEMPTS``). Returns the comparison,
    each row with 'attempts', and the environment of the first run."""
    now, env = run_suite(device, select, log, scan=scan, exclude=exclude)
    attempts = dict.fromkeys(now, 1)
    result = compare_timing(baseline, now, complete=select is None, exclude=exclude)
    for i in range(CONFIRM_ATTEMPTS):
        slower = [row["benchmark"] for row in result.rows if row["status"] == "SLOWER"]
        if not slower:
            break
        log(f"  confirming {len(slower)} benchmark(s) over their threshold (attempt {i + 2})")
        again, _ = run_suite(device, None, log, tests=slower, scan=scan)
        for name in slower:
            attempts[name] += 1
            ref = baseline["benchmarks"][name]["reference"]
            if again[name]["ratios"][ref] < now[name]["ratios"][ref]:
                now[name] = again[name]
        result = compare_timing(baseline, now, complete=select is None, exclude=exclude)
    for row in result.rows:
        row["attempts"] = attempts.get(row["benchmark"], 0)
    return result, env
