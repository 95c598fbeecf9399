"""`vimbench gate`: the comparison logic on made-up numbers (stored baseline and same-run base), the machine key,
the fallback without a stored baseline, the real timing gate end to end on a small selection (an unchanged
tree passes three times in a row; a planted 2x slowdown fails; the same with --base HEAD), and the
deterministic gate (unchanged passes; a changed scan FLOP formula or kernel resources fail with a diff)."""
import dataclasses
import importlib
import math
import os
import sys

import pytest
import torch

from vimbench.gate import (base as gate_base, calibration as gate_calibration, deterministic as gate_exact,
                           store as gate_store, suite as gate_suite, thresholds as gate_thresholds)
from vimbench.count import kernel_compile
from vimbench.commands import main
from vimbench.errors import InputError
from vimbench.measure.env import cpu_model, slug

# the module itself (vimbench.kernels re-exports a function of the same name)
scan_module = importlib.import_module("vimbench.kernels.selective_scan.ops")

SMALL_SELECTION = "test_scan and cpu and not 1248"
"""One real benchmark, test_scan[cpu] (~10 ms per call on CPU), against the committed CPU baseline."""


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------
# Comparison logic
# ----------------------------------------------------------------------------------------------------

def _bench(name, seconds, calibration, inner=2):
    """A pytest-benchmark JSON entry as the suite writes it: seconds per round, calibration per round."""
    return {"fullname": name, "stats": {"data": [s * inner for s in seconds]},
            "extra_info": {"inner": inner, "calibration_matmul_s": [c for c, _ in calibration],
                           "calibration_memory_s": [m for _, m in calibration]}}


def test_ratios_are_medians_of_per_round_calibrated_ratios():
    # round 2 ran while the machine was twice as slow: workload and both calibrations doubled
    bench = _bench("test_x.py::test_a", [1.0, 2.0, 1.1], [(0.5, 2.0), (1.0, 4.0), (0.5, 2.0)])
    got = gate_suite.run_ratios({"benchmarks": [bench]})["test_x.py::test_a"]
    assert got["ratios"] == pytest.approx({"matmul": 2.0, "memory": 0.5, "geomean": 1.0})
    assert got["seconds"] == pytest.approx(1.1) and got["rounds"] == 3


def test_a_run_that_took_turns_gives_one_set_of_ratios_per_segment():
    bench = _bench("test_x.py::test_a", [1.0, 3.0, 2.0, 4.0, 4.0], [(1.0, 1.0)] * 5)
    bench["extra_info"]["segments"] = 2                     # rounds 0-1, then 2-4 (calibration.segment_starts)
    first, second = gate_suite.segment_ratios({"benchmarks": [bench]})
    assert first["test_x.py::test_a"]["ratios"]["matmul"] == pytest.approx(2.0)
    assert second["test_x.py::test_a"]["ratios"]["memory"] == pytest.approx(4.0)
    assert second["test_x.py::test_a"]["rounds"] == 3
    del bench["extra_info"]["segments"]
    assert gate_suite.segment_ratios({"benchmarks": [bench]}) == [gate_suite.run_ratios({"benchmarks": [bench]})]


def test_threshold_uses_the_quietest_reference_has_a_floor_scales_with_spread_and_is_capped():
    quiet = gate_thresholds.threshold_from_runs({"matmul": [1.0, 1.01, 0.99, 1.0, 1.0],
                                                 "memory": [1.0, 1.2, 0.9, 1.0, 1.0]})
    assert quiet["reference"] == "matmul" and quiet["ratio"] == 1.0 and not quiet["noisy"]
    assert quiet["threshold"] == gate_thresholds.THRESHOLD_FLOOR
    assert quiet["spreads"]["memory"] == pytest.approx(math.log(1.2))
    mid = gate_thresholds.threshold_from_runs({"memory": [1.0, 1.2, 1.0, 1.0, 1.0]})
    assert mid["spread"] == pytest.approx(math.log(1.2))
    assert mid["threshold"] == pytest.approx(1.2 ** gate_thresholds.THRESHOLD_SPREADS - 1)
    loud = gate_thresholds.threshold_from_runs({"geomean": [1.0, 1.5, 1.0, 1.0, 1.0]})
    assert loud["threshold"] == gate_thresholds.THRESHOLD_CEILING and loud["noisy"]


def _baseline(**ratios):
    return {"benchmarks": {name: {"reference": "matmul", "ratio": r, "threshold": 0.2} for name, r in ratios.items()}}


def _now(**ratios):
    return {name: {"ratios": {"matmul": r}, "seconds": 1e-3} for name, r in ratios.items()}


def test_compare_fails_only_on_slowdowns_beyond_threshold():
    result = gate_thresholds.compare_timing(_baseline(a=1.0, b=1.0, c=1.0), _now(a=1.3, b=1.15, c=0.5), complete=True)
    status = {r["benchmark"]: r["status"] for r in result.rows}
    assert status == {"a": "SLOWER", "b": "ok", "c": "faster"} and result.regressions == ["a"]
    assert next(r for r in result.rows if r["benchmark"] == "a")["change"] == "+30.0%"


def test_compare_missing_fails_only_for_the_whole_suite_and_new_is_a_note():
    base, now = _baseline(a=1.0, gone=1.0), _now(a=1.0, fresh=1.0)
    full = gate_thresholds.compare_timing(base, now, complete=True)
    assert full.regressions == ["gone"] and any("fresh" in n for n in full.notes)
    selected = gate_thresholds.compare_timing(base, now, complete=False)
    assert selected.regressions == [] and "gone" not in {r["benchmark"] for r in selected.rows}


@pytest.mark.parametrize("reruns,expected", [([1.0], "ok"), ([1.3, 1.25], "SLOWER")])
def test_over_threshold_is_confirmed_by_reruns_keeping_the_fastest(monkeypatch, reruns, expected):
    results = iter([_now(a=1.3, b=1.0)] + [_now(a=r) for r in reruns])
    calls = []

    def fake_run_suite(device, select, log, tests=None, scan=None, exclude=()):
        calls.append(tests)
        return next(results), {}

    monkeypatch.setattr(gate_suite, "run_suite", fake_run_suite)
    result, _ = gate_suite.check_timing(_baseline(a=1.0, b=1.0), "cpu", None, log=lambda msg: None)
    row = next(r for r in result.rows if r["benchmark"] == "a")
    assert row["status"] == expected and row["attempts"] == 1 + len(reruns)
    assert calls == [None] + [["a"]] * len(reruns)


def test_update_of_a_selection_keeps_the_other_entries():
    old = {"benchmarks": {"kept": {"ratio": 2.0}, "redone": {"ratio": 9.0}}}
    runs = [{"redone": {"ratios": {"matmul": r, "memory": 3 * r, "geomean": 2 * r}, "seconds": 0.01}}
            for r in (1.0, 1.05, 0.98)]
    new = gate_thresholds.make_timing_baseline("cpu", runs, {"git_commit": "abc"}, old)
    assert new["benchmarks"]["kept"] == {"ratio": 2.0}
    redone = new["benchmarks"]["redone"]
    assert redone["ratio"] == 1.0 and redone["runs"] == [1.0, 1.05, 0.98] and redone["git_commit"] == "abc"
    assert new["clock"] == "time.thread_time" and new["cpu_threads"] == gate_calibration.CPU_THREADS


# ----------------------------------------------------------------------------------------------------
# The real timing gate (subprocess running benchmarks/, committed CPU baseline)
# ----------------------------------------------------------------------------------------------------

def _run(**ratios):
    """One ``run_ratios`` result: each benchmark's ratio, the same against every reference."""
    return {name: {"ratios": dict.fromkeys(gate_thresholds.REFERENCES, r), "seconds": r * 1e-3, "rounds": 5}
            for name, r in ratios.items()}


def test_base_comparison_fails_a_2x_slowdown_with_a_threshold_from_the_runs_spread():
    base = [_run(a=1.0, b=1.0, gone=1.0), _run(a=1.02, b=1.0, gone=1.0)]
    cur = [_run(a=2.0, b=1.1, new=1.0), _run(a=2.02, b=1.5, new=1.0)]
    result = gate_thresholds.compare_with_base(base, cur, complete=True)
    rows = {r["benchmark"]: r for r in result.rows}
    assert result.regressions == ["a", "gone"] and rows["gone"]["status"] == "MISSING"
    assert rows["a"]["ratio"] == pytest.approx(2.01 / 1.01) and rows["a"]["status"] == "SLOWER"
    # b: current runs 1.1 and 1.5, median 1.3: spread ln(1.3 / 1.1), threshold twice that in log space
    assert rows["b"]["threshold"] == f"+{(1.3 / 1.1) ** gate_thresholds.THRESHOLD_SPREADS - 1:.0%}"
    assert rows["b"]["status"] == "ok" and rows["new"]["status"] == "new (not in base)"
    assert gate_thresholds.compare_with_base(base, base, complete=True).regressions == []
    assert gate_thresholds.compare_with_base(base, cur, complete=False).regressions == ["a"]


def test_base_comparison_confirms_what_is_over_its_threshold_with_fresh_pairs_of_runs(monkeypatch):
    """A benchmark over its threshold is timed again, base and current alike: a one-off shift between the first
    pair of processes (1.3x, then 1.0x) passes at its second attempt; a 2x that persists fails after every
    attempt; a benchmark within its threshold runs once."""
    calls = []

    def fake_run_pair(base, device, select, order, log, tests=None, scan=None, exclude=()):
        calls.append(tests)
        current = {"shift": 1.3 if len(calls) == 1 else 1.0, "slow": 2.0, "same": 1.0}
        return {"base": [_run(**dict.fromkeys(tests or current, 1.0))] * 2,
                "current": [_run(**{n: current[n] for n in tests or current})] * 2}

    monkeypatch.setattr(gate_suite, "run_pair", fake_run_pair)
    result = gate_base.check_against_base(gate_suite.BaseTree(gate_suite.SUITE_DIR, ()), "cpu", None, lambda line: None)
    rows = {r["benchmark"]: r for r in result.rows}
    assert result.regressions == ["slow"] and rows["slow"]["status"] == "SLOWER"
    assert rows["slow"]["attempts"] == 1 + gate_base.BASE_CONFIRM_ATTEMPTS and rows["slow"]["ratio"] == 2.0
    assert rows["shift"]["status"] == "ok" and rows["shift"]["attempts"] == 2 and rows["shift"]["ratio"] == 1.0
    assert rows["same"]["attempts"] == 1
    more = gate_base.BASE_CONFIRM_ATTEMPTS - 1
    assert calls == [None, ["shift", "slow"]] + [["slow"]] * more


def test_the_suite_process_does_not_inherit_an_xdist_workers_variables(monkeypatch, tmp_path):
    """Run from an xdist worker (a user's CI that runs the gate in its test suite), the suite's process gets
    none of PYTEST_XDIST_*: with PYTEST_XDIST_WORKER set, pytest-benchmark there disables itself and writes no
    JSON. The other variables pass through."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("VIMBENCH_SOMETHING", "kept")
    _, env, _ = gate_suite._suite_command("cpu", None, None, None, (), None, {}, tmp_path)
    assert not [k for k in env if k.startswith("PYTEST_XDIST_")] and env["VIMBENCH_SOMETHING"] == "kept"


def test_two_suite_processes_take_turns_in_the_order_granted(monkeypatch, tmp_path):
    """``run_pair`` with each side's suite replaced by a small process that takes two turns per benchmark (as
    ``take_turn`` does) and logs each: once both are ready, one runs at a time, in the order granted; the side
    with more benchmarks finishes alone; each side's JSON comes back, one set of ratios per segment."""
    log = tmp_path / "turns.txt"
    child = f"""
import json, os, sys
read, write = map(int, os.environ["{gate_calibration.TURN_ENV}"].split(","))
side, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    for segment in range(2):
        os.write(write, b"y")
        assert os.read(read, 1) == b"g"
        with open({str(log)!r}, "a") as f:
            f.write(f"{{side}}{{i}}.{{segment}} ")
data = [1.0, 1.0, 2.0, 2.0]
bench = {{"fullname": "t", "stats": {{"data": data}}, "extra_info": {{"inner": 1, "segments": 2,
         "calibration_matmul_s": [1.0] * 4, "calibration_memory_s": [1.0] * 4}}}}
open("bench.json", "w").write(json.dumps({{"benchmarks": [bench]}}))
"""

    def command(device, select, tests, scan, exclude, base, env, folder):
        side = "base" if base is not None else "current"
        return [sys.executable, "-c", child, side, "1" if base is not None else "2"], dict(os.environ), \
            folder / "bench.json"

    monkeypatch.setattr(gate_suite, "_suite_command", command)
    runs = gate_suite.run_pair(gate_suite.BaseTree(tmp_path, ()), "cpu", None, gate_base.BASE_ORDER, lambda line: None)
    assert log.read_text().split() == ["base0.0", "current0.0", "current0.1", "base0.1", "current1.0", "current1.1"]
    assert [[r["t"]["ratios"]["matmul"] for r in runs[side]] for side in ("base", "current")] == [[1.0, 2.0]] * 2


def test_a_benchmark_that_takes_turns_times_its_segments_in_separate_turns(monkeypatch):
    """Under TURN_ENV, ``measure_calibrated`` asks for a turn before its warm-up call and before its second
    segment (then warms up again), and says 2 segments; without it, no turn and 1 segment."""
    grant_r, grant_w = os.pipe()
    ready_r, ready_w = os.pipe()
    os.write(grant_w, b"gg")
    monkeypatch.setenv(gate_calibration.TURN_ENV, f"{grant_r},{ready_w}")
    calls, bench = _measure(0.01)
    assert os.read(ready_r, 16) == b"yy" and bench.extra_info["segments"] == gate_calibration.TURN_SEGMENTS
    assert bench.rounds == gate_calibration.MAX_ROUNDS and calls == bench.rounds + 3   # warm-ups, probe, rounds
    monkeypatch.delenv(gate_calibration.TURN_ENV)
    calls, bench = _measure(0.01)
    assert bench.extra_info["segments"] == 1 and calls == bench.rounds + 2
    for fd in (grant_r, grant_w, ready_r, ready_w):
        os.close(fd)


def _measure(call_s):
    """(calls of the workload, the fake benchmark) of ``measure_calibrated`` timing a workload of ``call_s``."""
    calls = [0]

    def call():
        calls[0] += 1

    class Benchmark:
        def __init__(self):
            self.extra_info = {}

        def pedantic(self, target, setup, rounds):
            self.rounds = rounds
            for _ in range(rounds):
                setup()
                target()

    class Calibration:
        def measure(self, clock):
            return 1.0, 2.0

    bench = Benchmark()
    gate_calibration.measure_calibrated(bench, call, torch.device("cpu"), Calibration(), lambda: calls[0] * call_s)
    return calls[0], bench


@pytest.mark.parametrize("budget,call_s,rounds", [(None, 0.01, 25), (0.5, 0.01, 13), (None, 1.0, 5), (0.5, 1.0, 3)])
def test_gate_base_halves_the_rounds_of_every_benchmark_both_bounds_included(monkeypatch, budget, call_s, rounds):
    """A call of ``call_s`` (>= MIN_ROUND_S: one call per round): 100 rounds in the 1 s budget (capped at 25,
    at 13 with half the budget) or 1 (raised to 5, to 3): each side of ``gate --base`` with a base from before
    turns times two runs of about half a stored-baseline run's rounds. No warm-up round: a calibration for every
    timed round."""
    if budget is not None:
        monkeypatch.setenv(gate_calibration.ROUND_BUDGET_ENV, str(budget))
    calls, bench = _measure(call_s)
    assert bench.rounds == rounds and len(bench.extra_info["calibration_memory_s"]) == rounds
    assert calls == rounds + 2          # the warm-up call, the probe, the rounds


def test_baseline_key_separates_cpu_capabilities_cores_and_torch_versions(monkeypatch):
    key = gate_store.device_class("cpu")
    capability = torch.backends.cpu.get_cpu_capability()
    assert key.startswith(f"cpu-{slug(cpu_model())}-") and capability.lower() in key
    assert f"-{os.cpu_count()}c-torch{torch.__version__.split('+')[0].replace('.', '-')}" in key
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2" if capability != "AVX2" else "AVX512")
    assert gate_store.device_class("cpu") != key
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert "-64c-" in gate_store.device_class("cpu")


def test_gate_without_a_stored_baseline_says_so_and_compares_with_the_default_base(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(gate_store, "BASELINE_DIR", tmp_path)
    monkeypatch.setattr(gate_base, "install_base", lambda rev, log: calls.append(rev) or tmp_path)
    monkeypatch.setattr(gate_base, "check_against_base", lambda base, device, select, log, exclude, scan:
                        gate_thresholds.compare_with_base([_run(a=1.0)], [_run(a=2.5)], complete=True))
    code, out, err = run(["gate", "--device", "cpu", "-k", SMALL_SELECTION], capsys)
    rev, why = gate_base.default_base()
    assert calls == [rev]
    assert f"no stored baseline for this machine ({tmp_path / gate_store.device_class('cpu')}.json)" in out
    assert why in out and code == 1 and "slower than base" in err


def test_without_git_the_default_base_is_bad_input(monkeypatch, tmp_path):
    monkeypatch.setattr(gate_store, "REPO_ROOT", tmp_path)       # not a git checkout
    with pytest.raises(InputError, match="not a git checkout"):
        gate_base.default_base()


def test_base_bad_input_is_one_line_exit_2(capsys):
    for argv in (["gate", "--base", "no-such-revision-xyz", "-k", SMALL_SELECTION],
                 ["gate", "--base", "HEAD", "--update"], ["gate", "--base", "HEAD", "--deterministic"]):
        code, out, err = run(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, argv


@pytest.mark.noisy
def test_base_gate_passes_an_unchanged_tree_and_fails_a_planted_2x_slowdown(monkeypatch, capsys):
    code, out, err = run(["gate", "--device", "cpu", "--base", "HEAD", "-k", SMALL_SELECTION], capsys)
    assert code == 0, out + err
    assert "timing gate: ok (1 benchmarks within their thresholds of base HEAD)" in out
    monkeypatch.setenv(gate_suite.PLANTED_SLOWDOWN_ENV, "test_scan[cpu]=2")   # the base's suite runs without it
    code, out, err = run(["gate", "--device", "cpu", "--base", "HEAD", "-k", SMALL_SELECTION], capsys)
    row = next(line for line in out.splitlines() if "test_scan[cpu]" in line)
    assert code == 1 and "SLOWER" in row and "test_scan[cpu]" in err


@pytest.mark.noisy
def test_timing_gate_unchanged_tree_passes_three_times_in_a_row(capsys):
    for _ in range(3):
        code, out, err = run(["gate", "--device", "cpu", "-k", SMALL_SELECTION], capsys)
        assert code == 0, out + err
        assert "test_bench_scan.py::test_scan[cpu]" in out and "timing gate: ok (1 benchmarks" in out


@pytest.mark.noisy
def test_timing_gate_fails_on_a_planted_2x_slowdown(monkeypatch, capsys):
    monkeypatch.setenv("VIMBENCH_BENCH_SLOWDOWN", "test_scan[cpu]=2")   # read by vimbench/gate/bench/conftest.py
    code, out, err = run(["gate", "--device", "cpu", "-k", SMALL_SELECTION], capsys)
    assert code == 1
    row = next(line for line in out.splitlines() if "test_scan[cpu]" in line)
    assert "SLOWER" in row and "+" in row
    assert "timing gate: FAILED: 1 benchmark(s)" in err and "test_scan[cpu]" in err


def test_timing_gate_bad_input_is_one_line_exit_2(tmp_path, capsys):
    for argv, msg in ((["gate", "--runs", "5"], "--runs applies to --update only"),
                      (["gate", "--deterministic", "-k", "x"], "apply to the timing gate"),
                      (["gate", "--baseline", str(tmp_path / "none.json")], "no baseline at"),
                      (["gate", "--update", "--runs", "1"], "--runs must be >= 4")):
        code, _, err = run(argv, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)


# ----------------------------------------------------------------------------------------------------
# The deterministic gate (committed benchmarks/baselines/deterministic.json)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_deterministic_gate_passes_on_the_unchanged_tree(capsys):
    code, out, err = run(["gate", "--deterministic"], capsys)
    assert code == 0, out + err
    assert "deterministic gate: ok" in out


@pytest.mark.slow
def test_deterministic_gate_fails_when_the_scan_flop_formula_changes(monkeypatch, capsys):
    monkeypatch.setattr(scan_module, "SCAN_FLOPS_PER_STATE", scan_module.SCAN_FLOPS_PER_STATE + 1)
    code, out, err = run(["gate", "--deterministic"], capsys)
    assert code == 1 and "deterministic gate: FAILED" in err
    diff = [line for line in out.splitlines() if line.startswith("flops ")]
    assert any("vim_tiny res=224 batch=1" in line and "flops_scan" in line for line in diff)
    assert not any("deit" in line for line in diff)          # attention models have no scan


@pytest.mark.slow
def test_deterministic_gate_fails_when_kernel_registers_change(monkeypatch, capsys):
    real = kernel_compile.compile_report

    def more_registers(archs):
        rows = real(archs)
        return [dataclasses.replace(rows[0], registers=rows[0].registers + 8)] + rows[1:]

    monkeypatch.setattr(kernel_compile, "compile_report", more_registers)
    code, out, err = run(["gate", "--deterministic"], capsys)
    assert code == 1
    diff = [line for line in out.splitlines() if line.startswith("kernels ")]
    assert len(diff) == 1 and "registers" in diff[0] and "sm_80" in diff[0]


KERNEL = "k [scan float32] | N=16 | sm_90"


def snapshot(triton, registers):
    return {"flops": {"m res=224 batch=1": {"flops_total": 10}}, "triton": triton,
            "kernels": {KERNEL: {"registers": registers, "spill_bytes": 0, "shared_bytes": 0, "status": "ok"}}}


def test_triton_key_is_major_minor():
    assert gate_exact.triton_key("3.6.0") == "3.6" and gate_exact.triton_key("3.8.1+git1234") == "3.8"


def test_kernel_baselines_are_kept_per_triton_release(monkeypatch, tmp_path, capsys):
    """Triton 3.6 and 3.8 each gate against their own numbers; --update adds a release beside the others."""
    path = tmp_path / "det.json"
    monkeypatch.setattr(gate_exact, "deterministic_snapshot", lambda: snapshot("3.8", 168))
    assert run(["gate", "--deterministic", "--update", "--baseline", str(path)], capsys)[0] == 0
    monkeypatch.setattr(gate_exact, "deterministic_snapshot", lambda: snapshot("3.6", 128))
    assert run(["gate", "--deterministic", "--update", "--baseline", str(path)], capsys)[0] == 0
    by_triton = gate_store.load_baseline(path, "deterministic")["kernels_by_triton"]
    assert {v: k[KERNEL]["registers"] for v, k in by_triton.items()} == {"3.6": 128, "3.8": 168}
    for triton, registers in (("3.6", 128), ("3.8", 168)):
        monkeypatch.setattr(gate_exact, "deterministic_snapshot", lambda: snapshot(triton, registers))
        code, out, err = run(["gate", "--deterministic", "--baseline", str(path)], capsys)
        assert code == 0 and "deterministic gate: ok" in out, out + err
    monkeypatch.setattr(gate_exact, "deterministic_snapshot", lambda: snapshot("3.6", 168))  # 3.8's numbers on 3.6
    code, out, err = run(["gate", "--deterministic", "--baseline", str(path)], capsys)
    assert code == 1 and "registers" in out


def test_a_triton_release_without_baseline_is_named_not_failed(monkeypatch, tmp_path, capsys):
    path = tmp_path / "det.json"
    monkeypatch.setattr(gate_exact, "deterministic_snapshot", lambda: snapshot("3.8", 168))
    run(["gate", "--deterministic", "--update", "--baseline", str(path)], capsys)
    monkeypatch.setattr(gate_exact, "deterministic_snapshot", lambda: snapshot("3.9", 99))
    code, out, err = run(["gate", "--deterministic", "--baseline", str(path)], capsys)
    assert code == 0 and "no kernel baseline for Triton 3.9 (the baseline has: 3.8)" in err
    assert "1 FLOP counts equal" in out
    broken = snapshot("3.9", 99)
    broken["flops"]["m res=224 batch=1"]["flops_total"] = 11  # the FLOPs are still gated
    monkeypatch.setattr(gate_exact, "deterministic_snapshot", lambda: broken)
    assert run(["gate", "--deterministic", "--baseline", str(path)], capsys)[0] == 1
