"""The preflight says within seconds, one line each, exactly what a GPU run is missing, and never raises."""
import importlib
import types

import torch

from vimbench.measure import preflight


def by_name(checks):
    return {c.name: c for c in checks}


def test_on_cpu_the_cuda_checks_are_skipped_and_the_rest_checked():
    checks = by_name(preflight.run_preflight("cpu"))
    assert [n for n in checks if n.startswith("import ")] == [f"import {m}" for m in
                                                             (*preflight.REQUIRED_IMPORTS, "pynvml")]
    assert checks["nvml"].status == checks["triton launch"].status == "skipped"
    assert {checks[n].status for n in ("c compiler", "python headers", "triton cache")} <= {"ok", "missing"}
    lines = preflight.report_lines(checks.values())
    assert len(lines) == len(checks) and all("\n" not in line for line in lines)
    assert "preflight nvml: skipped (optional): not a CUDA device" in lines


def test_a_missing_compiler_is_named_with_the_fix(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    check = preflight.check_c_compiler()
    assert check.status == "missing" and check.required and "install gcc or set CC" in check.message
    monkeypatch.setenv("CC", "/usr/bin/cc-that-does-not-exist")
    assert preflight.check_c_compiler().status == "missing"


def test_missing_python_headers(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight.sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})
    check = preflight.check_python_headers()
    assert check.status == "missing" and f"no Python.h in {tmp_path}" in check.message


def test_an_unwritable_triton_cache(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(preflight, "triton_cache_dir", lambda: blocker / "cache")  # a folder under a file
    check = preflight.check_triton_cache()
    assert check.status == "missing" and "TRITON_CACHE_DIR" in check.message
    monkeypatch.setattr(preflight, "triton_cache_dir", lambda: tmp_path / "cache")
    assert preflight.check_triton_cache().status == "ok"


def test_a_missing_import_names_the_package(monkeypatch):
    real = importlib.import_module

    def without(name, *args):
        if name in ("tqdm", "pynvml"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args)
    monkeypatch.setattr(preflight.importlib, "import_module", without)
    checks = preflight.run_preflight("cpu")
    assert [c.name for c in preflight.failed(checks)] == ["import tqdm"]  # pynvml is optional
    nvml = by_name(checks)["import pynvml"]
    assert nvml.status == "missing" and not nvml.required and "install the nvidia-ml-py package" in nvml.message


def test_a_failing_triton_launch_is_one_line(monkeypatch):
    def broken(x, iters):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable")
    monkeypatch.setitem(importlib.sys.modules, "vimbench.kernels.exp_rate", types.SimpleNamespace(exp2_chain=broken))
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: None)
    check = preflight.check_triton_launch(torch.device("cuda", 0))
    assert check.status == "missing" and check.required
    assert check.message == ("a tiny Triton kernel failed: RuntimeError: Failed to find C compiler. Please specify "
                             "via CC environment variable")


def test_gpu_check_stops_before_measuring_when_preflight_fails(monkeypatch, tmp_path, capsys):
    from vimbench.commands import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(preflight, "run_preflight", lambda device: [
        preflight.Check("c compiler", "missing", True, "no C compiler: install gcc or set CC"),
        preflight.Check("nvml", "missing", False, "nvml unavailable")])
    assert main(["gpu-check", "--out-dir", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "preflight c compiler: missing: no C compiler" in out and "preflight failed (c compiler)" in err
    assert not (tmp_path / "out").exists()
