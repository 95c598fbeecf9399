"""`vimbench gate --scan NAME` and correctness before timing in the timing gate, deterministically: the suite's
measured ratios are injected at its boundary (``gate_suite.run_suite``, ``gate_suite.run_pair``), so a planted 2x
slowdown is exactly 2x."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

import vimbench
from helpers import fake_install, fresh_plugins, planted_wrong_scan  # noqa: F401
from vimbench.gate import (base as gate_base, suite as gate_suite, thresholds as gate_thresholds)
from vimbench.commands import main
from vimbench.kernels.selective_scan import selective_scan_ref
from vimbench.kernels.selective_scan.backends import REGISTRY
from vimbench.measure import verify

SCAN_BENCHMARKS = ("test_bench_scan.py::test_scan[{}]", "test_bench_scan.py::test_scan_vim_tiny_1248[{}]",
                   "test_bench_models.py::test_vim_tiny_scan[{}]")


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def suite(fresh_plugins, monkeypatch):
    """Backends 'mine' (the reference) and 'wrong' (``planted_wrong_scan``) registered; correctness checks in
    this process; ``run_suite`` replaced by one that reports ``suite.slowdown[name]`` x a ratio of 1 (with a
    1% run-to-run wobble) for the benchmarks it is asked for, recording each call in ``suite.calls``."""
    vimbench.register_scan_backend("mine", selective_scan_ref, devices="cpu")
    vimbench.register_scan_backend("wrong", planted_wrong_scan, devices="cpu")
    monkeypatch.setattr(verify, "run_isolated", lambda fn, args, timeout=None: {"status": "ok", **fn(*args)})

    class Suite:
        calls, slowdown = [], {}

    def fake_run_suite(device, select, log, tests=None, scan=None, exclude=()):
        Suite.calls.append(dict(tests=tests, scan=scan, exclude=list(exclude)))
        names = tests or [n.format(scan) for n in SCAN_BENCHMARKS]
        wobble = 1 + 0.01 * (len(Suite.calls) % 2)
        return ({n: {"ratios": dict.fromkeys(gate_thresholds.REFERENCES, Suite.slowdown.get(n, 1.0) * wobble),
                     "seconds": 0.01}
                 for n in names}, {"git_commit": "abc"})

    monkeypatch.setattr(gate_suite, "run_suite", fake_run_suite)
    return Suite


def test_scan_gate_records_in_the_users_file_passes_unchanged_and_fails_a_2x_slowdown(suite, tmp_path, capsys):
    path = tmp_path / "ci" / "scan-gate.json"
    code, out, err = run(["gate", "--scan", "mine", "--device", "cpu", "--update", "--baseline", str(path)], capsys)
    assert code == 0, out + err
    baseline = json.loads(path.read_text())
    assert baseline["scan"] == "mine" and sorted(baseline["benchmarks"]) == sorted(
        n.format("mine") for n in SCAN_BENCHMARKS)
    assert all(b["threshold"] == gate_thresholds.THRESHOLD_FLOOR for b in baseline["benchmarks"].values())
    assert len(suite.calls) == gate_suite.DEFAULT_BASELINE_RUNS and {c["scan"] for c in suite.calls} == {"mine"}

    code, out, err = run(["gate", "--scan", "mine", "--device", "cpu", "--baseline", str(path)], capsys)
    assert code == 0 and "timing gate: ok (3 benchmarks" in out, out + err

    slow = "test_bench_scan.py::test_scan[mine]"
    suite.slowdown[slow] = 2.0
    suite.calls.clear()
    code, out, err = run(["gate", "--scan", "mine", "--device", "cpu", "--baseline", str(path)], capsys)
    assert code == 1 and "FAILED: 1 benchmark(s)" in err and slow in err
    row = next(line for line in out.splitlines() if line.startswith(slow))
    # baseline: the median of ratios 1.0 and 1.01 over the runs; now: the fastest attempt, 2.0
    assert "SLOWER" in row and f"{2.0 / 1.005 - 1:+.1%}" in row
    assert [c["tests"] for c in suite.calls] == [None] + [[slow]] * gate_suite.CONFIRM_ATTEMPTS


def test_scan_gate_refuses_a_wrong_backend_before_any_timing(suite, tmp_path, capsys):
    path = tmp_path / "scan-gate.json"
    code, _, err = run(["gate", "--scan", "wrong", "--device", "cpu", "--update", "--baseline", str(path)], capsys)
    assert code == 1 and suite.calls == [] and not path.exists()
    assert "scan backend wrong is not timed: correctness check failed: odd-L (2, 6, 7, 4, 1)" in err
    assert "by up to 0.1" in err and "nothing timed" in err
    path.write_text(json.dumps({"kind": "timing", "scan": "wrong", "recorded": "x", "benchmarks": {}}))
    code, out, err = run(["gate", "--scan", "wrong", "--device", "cpu", "--baseline", str(path)], capsys)
    assert code == 1 and suite.calls == [] and "ms_now" not in out


def test_timing_gate_does_not_time_a_builtin_that_fails_its_check(suite, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(REGISTRY, "cpu", dataclasses.replace(REGISTRY["cpu"], forward=planted_wrong_scan))
    monkeypatch.setattr(gate_suite, "timed_scans", lambda device, scan: ["ref", "cpu"])
    names = ["test_bench_scan.py::test_scan[cpu]", "test_bench_scan.py::test_scan[ref]"]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"kind": "timing", "scan": None, "recorded": "x", "environment": {}, "benchmarks": {
        n: {"reference": "matmul", "ratio": 1.0, "threshold": 0.2} for n in names}}))
    suite.calls.clear()
    monkeypatch.setattr(gate_suite, "run_suite", lambda device, select, log, tests=None, scan=None, exclude=(): (
        suite.calls.append(list(exclude)) or ({names[1]: {"ratios": {"matmul": 1.0}, "seconds": 0.01}}, {})))
    code, out, err = run(["gate", "--device", "cpu", "--baseline", str(path)], capsys)
    assert code == 1 and "[cpu]" in suite.calls[0]
    row = next(line for line in out.splitlines() if line.startswith(names[0]))
    assert row.split() == [names[0], "0", "INCORRECT", "(not", "timed)"]     # no ratio, no time, no attempt
    assert "scan backend cpu is not timed: correctness check failed" in err


def test_scan_gate_bad_input_is_one_line_exit_2(suite, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kind": "timing", "scan": "mine", "recorded": "x", "benchmarks": {}}))
    for argv, msg in ((["gate", "--scan", "nope"], "--scan nope: unknown scan backend"),
                      (["gate", "--scan", "mine", "--deterministic"], "apply to the timing gate"),
                      (["gate", "--scan", "mine", "--device", "cuda"], "no CUDA"),
                      (["gate", "--device", "cpu", "--baseline", str(other)], "is the baseline of mine")):
        code, _, err = run(argv, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert suite.calls == []


# ----------------------------------------------------------------------------------------------------
# gate --scan NAME --base REV in the plug-in's repository
# ----------------------------------------------------------------------------------------------------

PLUGIN_SOURCE = '''
REPEAT = {repeat}


def scan(*args, **kwargs):
    """The reference scan, run REPEAT times: REPEAT x its time."""
    from vimbench.kernels.selective_scan import selective_scan_ref
    for _ in range(REPEAT - 1):
        selective_scan_ref(*args, **kwargs)
    return selective_scan_ref(*args, **kwargs)


def register():
    import vimbench
    vimbench.register_scan_backend("plugscan", scan, devices="cpu")
'''
PLUGIN_DIST = "vimbench-plugscan"


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.fixture
def plugin_repo(fresh_plugins, monkeypatch, tmp_path):
    """A plug-in package (scan backend 'plugscan', distribution ``PLUGIN_DIST``) in a git repository, the
    current folder: the first commit runs the reference scan once, the second (HEAD, also the working tree,
    installed as pip would: on the path of this process and of the suite's) twice. Returns the repository."""
    repo, site = tmp_path / "repo", tmp_path / "site"
    repo.mkdir()
    (repo / "pyproject.toml").write_text(f'''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{PLUGIN_DIST}"
version = "0.1.0"

[project.entry-points."vimbench.scan_backends"]
plugscan = "plugscan:register"

[tool.setuptools]
py-modules = ["plugscan"]
''')
    _git(repo, "init", "-q")
    for repeat in (1, 2):
        (repo / "plugscan.py").write_text(PLUGIN_SOURCE.format(repeat=repeat))
        _git(repo, "add", ".")
        _git(repo, "commit", "-q", "-m", f"{repeat}x")
    fake_install(site, PLUGIN_DIST, {"plugscan": "plugscan:register"})
    for path in (site, repo):
        monkeypatch.syspath_prepend(str(path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo), str(site)]))
    monkeypatch.setattr(gate_base, "install_root", lambda: tmp_path / "installed")
    monkeypatch.setattr(verify, "run_isolated", lambda fn, args, timeout=None: {"status": "ok", **fn(*args)})
    monkeypatch.chdir(repo)
    return repo


@pytest.mark.slow
def test_plugin_base_installs_that_revision_of_the_plugin_and_its_entry_point_registers_it(plugin_repo, monkeypatch,
                                                                                         capsys):
    """The wiring, without timing: each side's 'ratio' is the REPEAT of the plugscan that side's suite process
    would import and register (the base's asked of a Python process on the base's PYTHONPATH)."""
    seen = []

    def side(scan, base):
        if base is None:
            import plugscan
            repeat, package = plugscan.REPEAT, REGISTRY["plugscan"].package
        else:
            probe = ("from vimbench.kernels.selective_scan.backends import REGISTRY, scan_backends; scan_backends(); "
                     "import plugscan; print(plugscan.REPEAT, REGISTRY['plugscan'].package, plugscan.__file__)")
            probe_env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, base.path))}
            proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                  cwd=plugin_repo.parent, env=probe_env)
            repeat, package, where = proc.stdout.split()
            assert where.startswith(str(base.path[0]))
        assert package == PLUGIN_DIST
        return {f"test_bench_scan.py::test_scan[{scan}]": {"ratios": dict.fromkeys(gate_thresholds.REFERENCES,
                                                                                  float(repeat)),
                                                          "seconds": 0.01 * int(repeat)}}

    def fake_run_pair(base, device, select, order, log, tests=None, scan=None, exclude=()):
        seen.append(scan)
        return {"base": [side(scan, base)] * 2, "current": [side(scan, None)] * 2}

    monkeypatch.setattr(gate_suite, "run_pair", fake_run_pair)
    code, out, err = run(["gate", "--scan", "plugscan", "--base", "HEAD~1", "--device", "cpu"], capsys)
    assert code == 1 and "FAILED: 1 benchmark(s) slower than base HEAD~1" in err, out + err
    assert f"package '{PLUGIN_DIST}' (scan backend plugscan) at base HEAD~1" in out
    row = next(line for line in out.splitlines() if line.startswith("test_bench_scan.py::test_scan[plugscan]"))
    # every spread 0: the first reference, the threshold floor
    assert row.split()[1:6] == [gate_thresholds.REFERENCES[0], "1", "2", "2", "+20%"] and "SLOWER" in row
    # a pair of processes, then a fresh pair for each confirming attempt of the 2x
    assert seen == ["plugscan"] * (1 + gate_base.BASE_CONFIRM_ATTEMPTS)
    assert not list(plugin_repo.glob("*.json"))                     # no stored baseline read or written
    code, out, err = run(["gate", "--scan", "plugscan", "--base", "HEAD", "--device", "cpu"], capsys)
    assert code == 0 and "timing gate: ok (1 benchmarks within their thresholds of base HEAD)" in out, out + err


def test_plugin_base_bad_input_is_one_line_exit_2(plugin_repo, monkeypatch, tmp_path, capsys):
    for argv, msg in ((["--base", "no-such-revision"], "--base no-such-revision: not a commit of"),
                      (["--base", "HEAD", "--baseline", "x.json"], "it excludes --update, --baseline")):
        code, _, err = run(["gate", "--scan", "plugscan", "--device", "cpu", *argv], capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text((plugin_repo / "pyproject.toml").read_text().replace(PLUGIN_DIST, "other"))
    (other / "plugscan.py").write_text("")
    _git(other, "init", "-q")
    _git(other, "add", ".")
    _git(other, "commit", "-q", "-m", "another package")
    for folder, msg in ((tmp_path, "run it inside the git repository of package"),
                        (other, f"installs other, not package '{PLUGIN_DIST}'")):
        monkeypatch.chdir(folder)
        code, _, err = run(["gate", "--scan", "plugscan", "--base", "HEAD", "--device", "cpu"], capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (folder, err)


@pytest.mark.noisy
@pytest.mark.slow
def test_plugin_base_gate_fails_the_plugins_2x_slower_commit(plugin_repo, capsys):
    code, out, err = run(["gate", "--scan", "plugscan", "--base", "HEAD~1", "--device", "cpu", "-k",
                          "test_scan and not 1248"], capsys)
    row = next(line for line in out.splitlines() if "test_scan[plugscan]" in line)
    assert code == 1 and "SLOWER" in row and "test_scan[plugscan]" in err, out + err
    assert not list(plugin_repo.glob("*.json"))
