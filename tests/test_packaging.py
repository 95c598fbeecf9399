"""The package stands on its own: a wheel installed away from the checkout runs the scan gate (its benchmark
suite ships inside the package) and check-backend; an uninstalled checkout runs ``python cli.py``."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from vimbench.layout import MAPPED

REPO = Path(__file__).resolve().parent.parent


def test_checkout_mapping_matches_pyproject():
    """``vimbench.layout.MAPPED`` is pyproject.toml's package-dir (less vimbench itself), and the gate's suite
    ships as a package of its own."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {k: v for k, v in tool["package-dir"].items() if k != "vimbench"} == MAPPED
    assert {"vimbench.gate", "vimbench.gate.bench", "vimbench.gpucheck"} <= set(tool["packages"])


def bare_venv(path: Path) -> Path:
    """A venv without pip or vimbench whose interpreter finds this environment's dependencies (torch, pytest,
    ...) through a .pth line; .pth files of that folder (the editable install of vimbench) are not run, so
    vimbench is importable only from what is installed into the venv or from the script's folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run(argv, cwd: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**clean, **env}, timeout=900)


@pytest.mark.slow
def test_wheel_installed_away_from_the_checkout_runs_the_scan_gate_and_check_backend(tmp_path):
    src = tmp_path / "src"  # a copy, so that building writes nothing into the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "results", "__pycache__", "build",
                                                               "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("vimbench-*.whl"))
    python = bare_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    work = tmp_path / "ci"
    work.mkdir()
    where = run([str(python), "-c", "import vimbench.kernels, vimbench.gate.suite as s; "
                 "print(vimbench.kernels.__file__); print(s.SUITE_DIR)"], work)
    assert where.returncode == 0, where.stderr
    site = tmp_path / "venv" / "lib"
    assert all(Path(line).is_relative_to(site) for line in where.stdout.split()), where.stdout
    vimbench = tmp_path / "venv" / "bin" / "vimbench"
    checked = run([str(vimbench), "check-backend", "ref"], work)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    gate = run([str(vimbench), "gate", "--device", "cpu", "--scan", "ref", "--update", "--runs", "4",
                "-k", "test_scan and not 1248"], work, VIMBENCH_ROUND_BUDGET_S="0.05")
    assert gate.returncode == 0, gate.stdout + gate.stderr
    baseline = json.loads(next(work.glob("vimbench-gate-ref-*.json")).read_text())
    assert baseline["scan"] == "ref" and list(baseline["benchmarks"]) == ["test_bench_scan.py::test_scan[ref]"]
    outside = run([str(vimbench), "gate", "--device", "cpu"], work)  # the whole suite's baselines: a checkout's
    assert outside.returncode == 2 and "outside a vimbench checkout" in outside.stderr


@pytest.mark.slow
def test_cli_py_runs_from_an_uninstalled_checkout(tmp_path):
    python = bare_venv(tmp_path / "venv")
    found = run([str(python), "-c", "import importlib.util; print(importlib.util.find_spec('vimbench'))"], tmp_path)
    assert found.stdout.strip() == "None"  # nothing installed: only the checkout itself provides vimbench
    listed = run([str(python), str(REPO / "cli.py"), "models"], tmp_path)
    assert listed.returncode == 0 and "vim_tiny" in listed.stdout, listed.stderr
