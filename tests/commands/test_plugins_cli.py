"""A plug-in scan backend through the command line: listed by `vimbench models`, passing `check-backend`,
benchmarked by `vimbench kernels` (the example package installed, a broken plug-in beside it), and a wrong
one refused before any timing."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import vimbench
from helpers import EXAMPLE_PLUGIN, fake_install, fresh_plugins, planted_wrong_scan  # noqa: F401
from vimbench.commands import main
from vimbench.kernels.selective_scan import SCAN_BACKENDS, selective_scan_ref
from vimbench.kernels.selective_scan.ref import selective_scan_ref_backward
from vimbench.measure import verify

FAST = ["--repeats", "1", "--min-time", "0", "--device", "cpu", "--threads", "1", "--res", "32"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_a_registered_scan_backend(fresh_plugins, capsys):
    vimbench.register_scan_backend("mine", selective_scan_ref, devices=("cpu", "cuda"), description="my scan")
    code, out, _ = run(["models", "--res", "32"], capsys)
    assert code == 0
    built_in = "|".join(SCAN_BACKENDS)
    listed = next(l for l in out.splitlines() if "vim_tiny " in l)  # installed plug-ins (the peers) may follow
    assert f"scan=auto ({built_in}|mine|" in listed and listed.split()[4].endswith("|auto)")
    row = next(l for l in out.split("plug-in backends:")[1].splitlines() if l.split()[:2] == ["scan", "mine"])
    assert row.split()[:7] == ["scan", "mine", "(direct", "call)", "cpu,cuda", "unavailable", "forward-only"]
    vimbench.register_scan_backend("trains", selective_scan_ref, devices="cpu", backward=selective_scan_ref_backward)
    out = run(["models", "--res", "32"], capsys)[1]
    row = next(l for l in out.split("plug-in backends:")[1].splitlines() if l.startswith("scan ") and "trains" in l)
    assert row.split()[5:7] == ["unavailable", "yes"]


@pytest.mark.slow
def test_check_backend_passes_a_correct_plugin_and_fails_a_wrong_one(fresh_plugins, monkeypatch, capsys):
    # the check runs in this process (its worker would not see a backend registered here)
    monkeypatch.setattr(verify, "run_isolated", lambda fn, args, timeout=None: {"status": "ok", **fn(*args)})
    vimbench.register_scan_backend("mine", selective_scan_ref, devices="cpu")
    vimbench.register_scan_backend("wrong", planted_wrong_scan, devices="cpu")
    code, out, _ = run(["check-backend", "mine", "--device", "cpu"], capsys)
    assert code == 0 and "mine is correct on cpu: 74 cases" in out   # its scan 24, entry points 48, mixer 2
    assert "check-backend: scan backend 'mine' (package '(direct call)') is forward-only" in out
    vimbench.register_scan_backend("trains", selective_scan_ref, devices="cpu", backward=selective_scan_ref_backward)
    code, out, _ = run(["check-backend", "trains", "--device", "cpu"], capsys)
    assert code == 0 and "trains's gradients are correct on cpu: 48 cases" in out
    code, _, err = run(["check-backend", "wrong", "--device", "cpu"], capsys)
    assert code == 1 and "wrong FAILED on cpu: odd-L (2, 6, 7, 4, 1) float32 extras" in err
    assert "by up to 0.1" in err
    code, _, err = run(["check-backend", "nope"], capsys)
    assert code == 2 and "unknown scan backend 'nope'" in err and len(err.strip().splitlines()) == 1


def test_kernels_refuses_a_wrong_scan_before_any_timing(fresh_plugins, monkeypatch, tmp_path, capsys):
    vimbench.register_scan_backend("wrong", planted_wrong_scan, devices="cpu")
    # the check runs in this process (a worker would not see a backend registered here); timing would not
    monkeypatch.setattr(verify, "run_isolated", lambda fn, args, timeout=None: {"status": "ok", **fn(*args)})
    timed = []
    monkeypatch.setattr("vimbench.commands.kernels.kernel_row", lambda cfg, fixed: timed.append(cfg))
    out = tmp_path / "k.csv"
    code, _, err = run(["kernels", "--models", "vim_tiny", "--scan", "wrong", "--out", str(out), *FAST], capsys)
    assert code == 1 and timed == []
    df = pd.read_csv(out)
    assert set(df.op) == {"scan", "scan_bidir", "mixer_vim"} and (df.impl == "wrong").all()
    assert (df.status == "error").all() and df.time_ms.isna().all()
    assert df.error.str.contains(r"correctness check failed: odd-L \(2, 6, 7, 4, 1\)").all()
    assert df.error.str.contains("by up to 0.1").all()
    assert "kernels: no timing for wrong" in err


@pytest.mark.slow
def test_kernels_refuses_a_wrong_scan_in_submitit_jobs(fresh_plugins, monkeypatch, tmp_path, capsys):
    """--launcher local: the check runs in the preamble job and the configurations in theirs (processes that
    find the wrong backend as an installed plug-in); the failed check still means error rows, no timing."""
    site = tmp_path / "site"
    fake_install(site, "wrong-scan", {"wrong": "helpers:register_planted_wrong_scan"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1])]))
    out = tmp_path / "k.csv"
    code, _, err = run(["kernels", "--models", "vim_tiny", "--scan", "wrong", "--out", str(out), "--launcher", "local",
                        "--workers", "2", *FAST], capsys)
    assert code == 1 and "kernels: no timing for wrong" in err
    df = pd.read_csv(out)
    assert set(df.op) == {"scan", "scan_bidir", "mixer_vim"} and (df.impl == "wrong").all()
    assert (df.status == "error").all() and df.time_ms.isna().all() and df.repeats.isna().all()
    assert df.error.str.contains(r"correctness check failed: odd-L \(2, 6, 7, 4, 1\)").all()
    assert (df.launcher == "local").all() and df.job_id.is_unique and (df.ceiling_gbs > 0).all()


@pytest.mark.slow
def test_installed_example_is_benchmarked_beside_a_broken_plugin(tmp_path):
    """End to end in a fresh process: the example's entry point (as pip installs it) and a broken one."""
    site = tmp_path / "site"
    fake_install(site, "vimbench-scan-plugin", {"example": "vimbench_scan_plugin:register"})
    fake_install(site, "broken-plugin", {"fast": "no_such_module_here:register"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(EXAMPLE_PLUGIN)])}
    out = tmp_path / "k.csv"
    proc = subprocess.run([sys.executable, "cli.py", "kernels", "--models", "vim_tiny", "--scan", "example",
                           "--out", str(out), *FAST], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "example: correct on 74 cases against the reference" in proc.stderr
    assert proc.stderr.count("skipped plug-in 'fast' of package 'broken-plugin'") == 1
    df = pd.read_csv(out)
    assert set(df.op) == {"scan", "scan_bidir", "mixer_vim"} and (df.impl == "example").all()
    assert (df.status == "ok").all() and (df.time_ms > 0).all() and (df.flops_total > 0).all()
