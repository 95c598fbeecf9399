"""The benchmark suite's protocol: device, thread count, calibrated timing, and the test-only slowdown hook.

Run through ``vimbench gate``, which picks the clock (``vimbench.gate.calibration.CLOCKS``), sets the malloc thresholds
(``vimbench.gate.calibration.SUITE_ENV``), compares with a baseline and prints milliseconds per call; or directly:
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \
        pytest vimbench/gate/bench --rootdir vimbench/gate/bench --device cpu --benchmark-timer time.thread_time
With ``--scan NAME`` the scan benchmarks, and ``test_vim_tiny_scan`` (the whole Vim-Ti forward), run with
that backend alone (``vimbench gate --scan NAME``); without it the scan benchmarks run every built-in.
Every benchmark times its workload with the ``calibrated`` fixture (``vimbench.gate.calibration.measure_calibrated``);
pytest-benchmark's own table is per round, a round being ``extra_info['inner']`` calls (1 for workloads of
5 ms or more on CPU, so the Vim-Ti 1248 pair compares directly there).
"""
import os

import pytest
import torch
from pytest_benchmark.utils import load_timer

from vimbench.kernels.selective_scan import SCAN_BACKENDS
from vimbench.gate.calibration import CPU_THREADS, Calibration, default_device, measure_calibrated, suite_environment

SLOWDOWN_ENV = "VIMBENCH_BENCH_SLOWDOWN"
"""Test-only hook: ``SUBSTRING=FACTOR`` makes every benchmark whose test name contains SUBSTRING call its
workload FACTOR (an integer) times per call, i.e. FACTOR x slower. tests/gate/test_gate.py sets it to plant a
regression and check that the gate fails; nothing else should."""


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default=None,
                     help="Device the benchmarks run on (default: cuda when available, else cpu).")
    parser.addoption("--scan", default=None, help="The one scan backend to benchmark, a plug-in's included "
                                                  "(default: every built-in; the whole-model test needs it).")


def pytest_generate_tests(metafunc):
    scan = metafunc.config.option.scan
    if "scan_backend" in metafunc.fixturenames:
        metafunc.parametrize("scan_backend", [scan] if scan else SCAN_BACKENDS)
    if "plugin_scan" in metafunc.fixturenames:
        metafunc.parametrize("plugin_scan", [scan] if scan else [])


def pytest_configure(config):
    device = config.option.device = config.option.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA device here")
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["vimbench_environment"] = suite_environment(torch.device(config.option.device))


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return torch.device(pytestconfig.option.device)


@pytest.fixture(scope="session")
def calibration(device) -> Calibration:
    return Calibration(device)


def _slowdown(test_name: str) -> int:
    spec = os.environ.get(SLOWDOWN_ENV)
    if not spec:
        return 1
    substring, _, factor = spec.rpartition("=")
    return int(factor) if substring in test_name else 1


@pytest.fixture
def calibrated(benchmark, request, device, calibration):
    """``calibrated(fn)`` times ``fn()`` with a calibration before every round (see vimbench.gate)."""
    clock = load_timer(request.config.getoption("benchmark_timer")).target

    def run(fn):
        factor = _slowdown(request.node.name)

        def work():
            for _ in range(factor):
                fn()

        with torch.inference_mode():
            measure_calibrated(benchmark, work if factor > 1 else fn, device, calibration, clock)
    return run
