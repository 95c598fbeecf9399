"""CI regression gates: a timing gate that survives a noisy shared machine, and a deterministic one.

Timing gate
    The pytest-benchmark suite in ``benchmarks/`` runs in a subprocess. Every round of every benchmark is
    preceded by the two calibration workloads (``Calibration``: a fixed matmul and a fixed memory-bound
    add), timed with the same clock, so each round i gives a ratio per reference (``REFERENCES``)

        ratio_i = (workload seconds per call in round i) / (reference seconds in round i)

    and a benchmark's ratio in a run is the median over rounds. Load that slows everything for a while
    slows the calibration measured just before by about as much, and cancels; short bursts land in a few
    rounds and the median drops them. Which reference cancels the noise best depends on the workload and
    the clock, so ``--update`` measures all three over several runs and keeps, per benchmark, the one with
    the smallest run-to-run spread.

    Fixed conditions: on CPU the clock is the thread's CPU time (``time.thread_time``) with torch on
    ``CPU_THREADS`` thread, so time spent descheduled while another process runs does not count (two
    threads on the loaded 2-core CI machine ran 5-40x slower, waiting for a preempted sibling); on CUDA
    it is the wall clock around the launches and a synchronize. glibc malloc runs with fixed thresholds
    (``SUITE_ENV``): with its default dynamic mmap threshold, whether a multi-MiB temporary is mmapped
    (page-faulted on every call) depends on the process's allocation history, and the same scan took
    5.1 to 10.5 ms in fresh processes.

    Correctness gates speed: before timing, every scan backend the suite would time is checked against
    ``ref`` (``vimbench.measure.ops.check_scans``); one that fails is not timed (``run_suite``'s ``exclude``)
    and fails the gate.

    ``scan``: the gate of one scan backend, typically a plug-in in its own package's CI: the two scan
    benchmarks (``SMALL`` and Vim-Ti 1248 shapes) and the whole Vim-Ti forward with that backend
    (``SCAN_SUITE``, the suite run with ``--scan NAME``), against a baseline file the package keeps.

    Same-run comparison (``--base REV``, and the default on a machine without a stored baseline): revision
    REV is installed beside this tree (``install_base``) and both suites run in one session, interleaved
    (``BASE_ORDER``), each at half the rounds (``BASE_ENV``); each benchmark's threshold comes from the
    spread of those runs (``compare_with_base``). No stored baseline is read or written.

    A baseline (``benchmarks/baselines/<device class>.json``, ``device_class``) holds, per benchmark, the reference, the
    median ratio over ``--runs`` runs (at least ``MIN_BASELINE_RUNS``), the spread of those runs and the
    threshold derived from it (``threshold_from_runs``). Every other run of ``record_runs`` has a synthetic
    co-tenant process beside it (``cotenant``), so that the spread includes the contention a shared CI
    machine sees: runs recorded on an idle machine alone came out up to 20% faster than later idle runs
    and up to 40% faster than runs beside a busy neighbour. A later run fails the gate when a benchmark's
    ratio exceeds the baseline's by more than its threshold. Only slowdowns fail; speed-ups are reported.

Deterministic gate
    FLOP counts of every registered model at ``FLOP_SHAPES`` (exact, on the meta device) and the registers,
    spill bytes and shared memory of every Triton kernel configuration compiled for sm_80 and sm_90
    (``vimbench.count.kernel_compile``), compared exactly with ``benchmarks/baselines/deterministic.json``.
    Kernel resources are the compiler's, so the baseline keeps them per Triton release (``triton_key``:
    major.minor, e.g. "3.6"; each item's key names its arch): Triton 3.6 and 3.8 each gate against their own
    numbers. A Triton release without numbers in the baseline is not compared (the gate says so, names the
    releases it has, and how to record this one) instead of failing on another compiler's numbers; the FLOPs
    are still gated. ``--update`` records the installed release's numbers beside the others.

Units: seconds for times; ratios are dimensionless; thresholds and changes are fractions (0.25 = +25%).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vimbench.measure.env import cpu_model, environment, slug
from vimbench.errors import BackendUnavailable, InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITE_DIR = REPO_ROOT / "benchmarks"
BASELINE_DIR = SUITE_DIR / "baselines"
DETERMINISTIC_BASELINE = BASELINE_DIR / "deterministic.json"

CPU_THREADS = 1
"""torch intra-op threads for CPU benchmarks (see the module docstring for why one)."""
CLOCKS = {"cpu": "time.thread_time", "cuda": "time.perf_counter"}
"""The clock pytest-benchmark and the calibration use, per device type (seconds)."""
SUITE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
"""Environment of the suite's process: glibc malloc serves allocations below 1 GiB from its heap and keeps
freed memory, instead of mmapping large blocks per call depending on history (see the module docstring)."""
REFERENCES = ("matmul", "memory", "geomean")
"""Calibration references a ratio can be taken against: the matmul, the memory-bound op, or their
geometric mean sqrt(matmul * memory)."""

MIN_ROUND_S = {"cpu": 5e-3, "cuda": 1e-3}
"""A round repeats the workload until it lasts at least this long (seconds), so clock resolution and,
on CUDA, the launch-and-synchronize overhead stay small against it."""
ROUND_BUDGET_S = 1.0
"""Target workload time per benchmark (seconds): rounds = budget / round time, within [MIN_ROUNDS, MAX_ROUNDS].
The suite's process reads it from ``ROUND_BUDGET_ENV`` when set (``gate --base`` halves it: it runs the suite
four times)."""
ROUND_BUDGET_ENV = "VIMBENCH_ROUND_BUDGET_S"
MIN_ROUNDS, MAX_ROUNDS = 5, 25

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
THRESHOLD_FLOOR = 0.20
"""No benchmark's threshold is below +20%: the spread measured while recording underestimates the drift
between then and later CI runs beside other tenants' work (a benchmark whose 10 baseline runs spread by
4.6% once came out 27% slower in CI, and as fast as its baseline when re-run)."""
CONFIRM_ATTEMPTS = 2
"""Benchmarks over their threshold are run again, alone, up to this many times; each keeps its fastest
attempt, so it fails only when every attempt is over. A real slowdown persists; a neighbour's burst rarely
lasts through all attempts."""
THRESHOLD_SPREADS = 2.0
"""Threshold = max(floor, exp(THRESHOLD_SPREADS * s) - 1), s = largest |ln(ratio_run / median)| seen while
recording the baseline: twice the worst deviation seen, in log space."""
THRESHOLD_CEILING = 0.6
"""A threshold above +60% would let a 2x slowdown through on a bad day: such a benchmark is capped here
and marked noisy in the baseline, to be fixed (longer rounds) rather than trusted."""

FLOP_SHAPES = ((224, 1), (1248, 1))
"""(resolution, batch) at which the deterministic gate counts each model's forward_features FLOPs."""
FLOP_FIELDS = ("flops_total", "flops_scan", "flops_attention", "flops_linear", "flops_other")
KERNEL_FIELDS = ("registers", "spill_bytes", "shared_bytes", "status")


# ----------------------------------------------------------------------------------------------------
# Measuring (called by the benchmark suite)
# ----------------------------------------------------------------------------------------------------

CALIBRATION_SIZES = {"cpu": {"matmul_n": 384, "memory_numel": 16 * 2**20},
                     "cuda": {"matmul_n": 4096, "memory_numel": 128 * 2**20}}
"""Calibration workloads per device type: an (n x n) @ (n x n) float32 matmul (2 n^3 FLOPs), and
out = x + 1 over ``memory_numel`` float32 elements (8 bytes moved each; 128 MiB on CPU, twice the L3)."""


class Calibration:
    """The two fixed reference workloads of ``CALIBRATION_SIZES``, on one device."""

    def __init__(self, device: torch.device):
        sizes = CALIBRATION_SIZES[device.type]
        gen = torch.Generator(device=device).manual_seed(0)
        n = sizes["matmul_n"]
        self.a = torch.randn(n, n, device=device, generator=gen)
        self.mm_out = torch.empty_like(self.a)
        self.x = torch.randn(sizes["memory_numel"], device=device, generator=gen)
        self.add_out = torch.empty_like(self.x)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def measure(self, clock) -> tuple[float, float]:
        """(matmul seconds, memory seconds), each one call timed with ``clock``."""
        self.sync()
        t0 = clock()
        torch.mm(self.a, self.a, out=self.mm_out)
        self.sync()
        t1 = clock()
        torch.add(self.x, 1.0, out=self.add_out)
        self.sync()
        return t1 - t0, clock() - t1


def measure_calibrated(benchmark, fn, device: torch.device, calibration: Calibration, clock) -> None:
    """Times ``fn()`` with pytest-benchmark's ``benchmark.pedantic``, a calibration before every round.

    After a warm-up call and a probe, a round calls ``fn`` ``inner`` times (then synchronizes on CUDA);
    pytest-benchmark records seconds per round in ``stats.data``; ``extra_info`` gets ``inner`` and the
    per-round calibration seconds ``calibration_matmul_s`` / ``calibration_memory_s`` (warm-up round dropped).
    ``clock`` must be the timer pytest-benchmark was given (``--benchmark-timer``).
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = clock()
    fn()
    sync()
    probe = max(clock() - t0, 1e-7)
    inner = max(1, math.ceil(MIN_ROUND_S[device.type] / probe))
    budget = float(os.environ.get(ROUND_BUDGET_ENV, ROUND_BUDGET_S))
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, round(budget / (probe * inner))))
    calibration_s = []

    def workload():
        for _ in range(inner):
            fn()
        sync()

    benchmark.pedantic(workload, setup=lambda: calibration_s.append(calibration.measure(clock)),
                       rounds=rounds, warmup_rounds=1)
    benchmark.extra_info.update(inner=inner, calibration_matmul_s=[m for m, _ in calibration_s[1:]],
                                calibration_memory_s=[s for _, s in calibration_s[1:]])


# ----------------------------------------------------------------------------------------------------
# Running the suite
# ----------------------------------------------------------------------------------------------------

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_class(device: str) -> str:
    """The machine a timing baseline holds for, as a file-name slug of what decides the speed: on CPU the
    model, the ATen capability the kernels dispatch to, the core count and the torch version
    ('cpu-intel-r-xeon-r-processor-avx512-2c-torch2-14-1'); on CUDA the GPU's name, compute capability and
    the torch version ('nvidia-h100-80gb-hbm3-sm90-torch2-14-1'). The model alone is not enough: "AMD EPYC"
    names both AVX-512 and AVX2-only machines, and on a 2-core AVX2 EPYC the unchanged tree failed 4
    benchmarks of a baseline recorded on another EPYC; the same suite ran 28-90% slower on an Intel Xeon
    than on the AMD EPYC."""
    torch_version = torch.__version__.split("+")[0]
    if device == "cpu":
        return slug(f"cpu {cpu_model()} {torch.backends.cpu.get_cpu_capability()} {os.cpu_count()}c "
                    f"torch{torch_version}")
    if not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device here")
    major, minor = torch.cuda.get_device_capability()
    return slug(f"{torch.cuda.get_device_name()} sm{major}{minor} torch{torch_version}")


def timing_baseline_path(device: str) -> Path:
    return BASELINE_DIR / f"{device_class(device)}.json"


SCAN_SUITE = ("test_bench_scan.py", "test_bench_models.py::test_vim_tiny_scan")
"""The benchmarks of one scan backend's gate (the suite run with ``--scan NAME``)."""


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


def run_ratios(bench_json: dict) -> dict[str, dict]:
    """{'<file>::<test>': {'ratios': {reference: ratio}, 'seconds', 'rounds'}} from one pytest-benchmark
    JSON of the suite: each ratio is the median over rounds of (seconds per call) / (that round's
    reference seconds); 'seconds' is the median seconds per call."""
    out = {}
    for bench in bench_json["benchmarks"]:
        info = bench["extra_info"]
        per_call = [t / info["inner"] for t in bench["stats"]["data"]]
        refs = {"matmul": info["calibration_matmul_s"], "memory": info["calibration_memory_s"]}
        refs["geomean"] = [math.sqrt(m * s) for m, s in zip(refs["matmul"], refs["memory"])]
        ratios = {name: statistics.median(t / c for t, c in zip(per_call, ref)) for name, ref in refs.items()}
        out[bench["fullname"].removeprefix("benchmarks/")] = {"ratios": ratios, "seconds": statistics.median(per_call),
                                                              "rounds": len(per_call)}
    return out


def run_suite(device: str, select: str | None, log=print, tests: list[str] | None = None, scan: str | None = None,
              exclude: list[str] = (), base: Path | None = None,
              env: dict | None = None) -> tuple[dict[str, dict], dict]:
    """Runs the benchmark suite once in a subprocess on ``device`` ('cpu' | 'cuda'), restricted to the
    pytest ``-k`` expression ``select``, to the benchmarks named in ``tests`` ('<file>::<test>') if
    given, and without those matching a -k term in ``exclude``; with ``scan``, the ``SCAN_SUITE`` of that
    backend. With ``base`` (an ``install_base`` folder) the suite and the package of that revision run
    instead of this checkout's. ``env``: extra environment variables of the suite's process. Returns
    (``run_ratios`` of it, the run's environment). InputError when nothing matches ``select``; RuntimeError
    (with pytest's output) when a benchmark fails."""
    if not SUITE_DIR.is_dir():
        raise InputError(f"benchmark suite not found at {SUITE_DIR}: run vimbench gate from a vimbench checkout")
    suite_dir, cwd, env = (SUITE_DIR, REPO_ROOT, {**SUITE_ENV, **(env or {})})
    if base is not None:  # its folder holds no vimbench/, so `python -m` finds the installed base first
        suite_dir, cwd, env["PYTHONPATH"] = base / "benchmarks", base, str(base / "site")
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "bench.json"
        paths = [str(suite_dir / t) for t in tests or (SCAN_SUITE if scan else [""])]
        cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider",
               f"--device={device}", f"--benchmark-timer={CLOCKS[device]}", "--benchmark-disable-gc",
               f"--benchmark-json={out_json}", "--benchmark-columns=median,iqr,rounds"]
        if scan:
            cmd += [f"--scan={scan}"]
        terms = ([f"({select})"] if select else []) + [f"not {t}" for t in exclude]
        if terms:
            cmd += ["-k", " and ".join(terms)]
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, **env})
        if proc.returncode == 5:
            raise InputError(f"no benchmark matches -k {select!r}" if select else "the benchmark suite is empty")
        if proc.returncode != 0:
            raise RuntimeError(f"the benchmark suite failed (pytest exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-6000:]}")
        bench_json = json.loads(out_json.read_text())
    ratios = run_ratios(bench_json)
    log(f"  ran {len(ratios)} benchmarks in {time.monotonic() - start:.0f} s")
    return ratios, bench_json["vimbench_environment"]


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
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Same-run comparison against a base revision (``gate --base REV``)
# ----------------------------------------------------------------------------------------------------

BASE_ORDER = ("base", "current", "current", "base")
"""The suite runs of ``gate --base``, in order (ABBA): a load that rises or falls steadily through the run
weighs on both sides alike."""
BASE_ENV = {ROUND_BUDGET_ENV: str(ROUND_BUDGET_S / 2)}
"""Four runs at half the rounds each: the comparison takes about twice one stored-baseline run."""
BASE_COLUMNS = ["benchmark", "reference", "base", "current", "ratio", "threshold", "ms_base", "ms_now", "status"]


def _git(*args: str) -> str:
    """stdout of ``git -C REPO_ROOT *args``; RuntimeError with git's message when it fails."""
    proc = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
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
        raise InputError(f"no revision to compare with: {REPO_ROOT} is not a git checkout with a commit ({e}); "
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
    PYTHONPATH) and ``benchmarks/`` (its suite). Extracted from git into a temporary folder and installed
    with pip (no dependencies: those of this environment), under ``<cache>/gate-base/<commit>`` (the
    compiled kernels' cache root), so that its compiled CPU kernels, keyed by their source folder, build
    once per commit. InputError when ``rev`` is not a commit of this repository."""
    from vimbench.kernels.selective_scan.compiled_cpu import cache_root
    try:
        sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except RuntimeError:
        raise InputError(f"--base {rev}: not a commit of {REPO_ROOT}") from None
    out = cache_root() / "gate-base" / sha
    if (out / "site").is_dir() and (out / "benchmarks").is_dir():
        return out
    log(f"  installing {rev} ({sha[:10]}) into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, staged = Path(tmp) / "src", Path(tmp) / "staged"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", sha], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(staged / "site"), str(src)], capture_output=True, text=True)
        if pip.returncode != 0:
            raise RuntimeError(f"installing {rev} failed:\n{(pip.stdout + pip.stderr)[-3000:]}")
        os.replace(src / "benchmarks", staged / "benchmarks")
        try:
            os.replace(staged, out)
        except OSError:  # another gate installed the same commit meanwhile: use that one
            if not (out / "site").is_dir():
                raise
    return out


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


def check_against_base(base: Path, device: str, select: str | None, log=print,
                       exclude: list[str] = ()) -> TimingComparison:
    """Runs the suite of the installed ``base`` (``install_base``) and of this tree in ``BASE_ORDER``, each
    with ``BASE_ENV``, on ``device``, restricted to ``select``; this tree's without ``exclude``. Returns
    ``compare_with_base`` of the runs."""
    runs = {"base": [], "current": []}
    for side in BASE_ORDER:
        log(f"  {side} suite")
        ratios, _ = run_suite(device, select, log, env=BASE_ENV, base=base if side == "base" else None,
                              exclude=() if side == "base" else exclude)
        runs[side].append(ratios)
    return compare_with_base(runs["base"], runs["current"], complete=select is None, exclude=exclude)


def environment_notes(baseline_env: dict, env: dict) -> list[str]:
    """One line per recorded version or machine property that differs from the baseline's."""
    keys = ("device_name", "torch_version", "triton_version", "timm_version", "cuda_version", "driver_version",
            "threads", "python_version")
    return [f"{k}: baseline {baseline_env.get(k)!r}, now {env.get(k)!r}" for k in keys
            if baseline_env.get(k) != env.get(k)]


def suite_environment(device: torch.device) -> dict:
    """What a baseline records about the run: ``vimbench.env.environment`` plus the Python version."""
    return {**environment(device), "python_version": sys.version.split()[0]}


# ----------------------------------------------------------------------------------------------------
# Deterministic gate
# ----------------------------------------------------------------------------------------------------

def triton_key(version: str) -> str:
    """The Triton release a kernel baseline holds for: major.minor of ``version`` ("3.6.0" -> "3.6")."""
    return ".".join(version.split("+")[0].split(".")[:2])


def deterministic_snapshot() -> dict:
    """{'flops': {'<model> res=<r> batch=<b>': {FLOP_FIELDS}}, 'kernels': {'<kernel> | <config> | <arch>':
    {KERNEL_FIELDS}}, 'triton': ``triton_key`` of the installed Triton}: FLOPs of forward_features with each
    model's default options, counted on meta."""
    from vimbench.count.flops import count_flops
    from vimbench.count.kernel_compile import ARCHS, compile_report
    from vimbench.models.registry import list_models
    flops = {}
    for model in list_models():
        for res, batch in FLOP_SHAPES:
            counts = count_flops(model, res, batch)
            flops[f"{model} res={res} batch={batch}"] = {k: counts[k] for k in FLOP_FIELDS}
    kernels = {f"{r.kernel} | {r.config} | {r.arch}": {k: getattr(r, k) for k in KERNEL_FIELDS}
               for r in compile_report(ARCHS)}
    import triton
    return {"flops": flops, "kernels": kernels, "triton": triton_key(triton.__version__)}


def make_deterministic_baseline(snapshot: dict, previous: dict | None = None) -> dict:
    """The baseline file for ``snapshot``: its FLOPs, and its kernel numbers under its Triton release beside
    those of other releases kept from ``previous`` (the file it replaces, if any)."""
    recorded = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    kernels = {**(previous or {}).get("kernels_by_triton", {}), snapshot["triton"]: snapshot["kernels"]}
    return {"kind": "deterministic", "recorded": recorded, "environment": suite_environment(torch.device("cpu")),
            "flops": snapshot["flops"], "kernels_by_triton": dict(sorted(kernels.items()))}


def compare_deterministic(baseline: dict, snapshot: dict) -> list[dict]:
    """Every difference: rows {'section', 'item', 'field', 'baseline', 'now', 'change'}; [] when equal.
    An item present on one side only is one row with field '(item)'. Kernels are compared with the
    baseline's numbers for the snapshot's Triton release, and not at all when it has none
    (``missing_triton_baseline``)."""
    rows = []
    by_triton = baseline.get("kernels_by_triton", {})
    for section in ("flops", "kernels"):
        if section == "kernels" and snapshot["triton"] not in by_triton:
            continue
        base = baseline.get("flops", {}) if section == "flops" else by_triton[snapshot["triton"]]
        now = snapshot[section]
        for item in sorted(set(base) | set(now)):
            if item not in now or item not in base:
                rows.append({"section": section, "item": item, "field": "(item)",
                             "baseline": "present" if item in base else "absent",
                             "now": "present" if item in now else "absent", "change": ""})
                continue
            for field in sorted(set(base[item]) | set(now[item])):
                b, n = base[item].get(field), now[item].get(field)
                if b != n:
                    change = f"{n / b - 1:+.2%}" if isinstance(b, int) and isinstance(n, int) and b else ""
                    rows.append({"section": section, "item": item, "field": field, "baseline": b, "now": n,
                                 "change": change})
    return rows


def missing_triton_baseline(baseline: dict, snapshot: dict) -> str | None:
    """One line when the baseline has no kernel numbers for the snapshot's Triton release, else None."""
    have = sorted(baseline.get("kernels_by_triton", {}))
    if snapshot["triton"] in have:
        return None
    return (f"no kernel baseline for Triton {snapshot['triton']} (the baseline has: {', '.join(have) or 'none'}): "
            f"kernel resources not compared; record them with `vimbench gate --deterministic --update`")


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------

def load_baseline(path: Path, kind: str) -> dict:
    """The baseline at ``path``; InputError if it is absent, unreadable or of another kind."""
    if not path.exists():
        raise InputError(f"no baseline at {path}: record one with `vimbench gate"
                         f"{' --deterministic' if kind == 'deterministic' else ''} --update`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise InputError(f"--baseline {path}: cannot read it: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"--baseline {path} is not a {kind} baseline (kind {found!r})")
    return data


def save_baseline(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
