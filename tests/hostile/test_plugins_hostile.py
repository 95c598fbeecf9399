"""Hostile plug-ins: a register() or a backend that hangs, exits (sys.exit), raises KeyboardInterrupt or aborts
the interpreter; backends that return the wrong type, shape, dtype or device; models registered under names
that impersonate timm's or break CSV cells, file names and spreadsheets.

Every case is installed as a package would be (``helpers.fake_install``: an entry point in a distribution
found on sys.path) and run through the command line in this process (``main``), with the time limits set to
seconds (``plugins.TIME_LIMITS_S``'s variables). Each asserts the rule: the command ends with its documented
exit code (0: the hostile plug-in is skipped and the command carries on; 1: the backend fails its check; 2:
bad input), within ``DEADLINE_S`` (a hazard sleeps ten minutes), with exactly one stderr line naming the
plug-in and what it did, no traceback, and no row of the --out CSV lost.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import vimbench
from helpers import fake_install, fresh_plugins, scan_case  # noqa: F401
from vimbench.commands import main
from vimbench.kernels import plugins
from vimbench.kernels.attention import attention, attention_eager
from vimbench.kernels.selective_scan import bidirectional_scan, selective_scan
from vimbench.kernels.selective_scan.check import check_named_backend
from vimbench.measure import isolation, verify
from vimbench.models.registry import model_entry, register_model

LOAD_S, CHECK_S = 2, 3
"""The time limits the tests run under (seconds; VIMBENCH_LOAD_TIMEOUT_S, VIMBENCH_CHECK_TIMEOUT_S)."""
DEADLINE_S = 90
"""Longest a command may take here before the test fails as hung: the limits above, the workers' forks and
a loaded 2-core machine; far below a hazard's ten-minute sleep."""
DIST = "hostile-plugins"

HOSTILE = '''
import os, sys, time

import vimbench
from vimbench.kernels.selective_scan import selective_scan_ref
from vimbench.models.registry import register_model


def hang(*args, **kwargs):
    time.sleep(600)


def leave(*args, **kwargs):
    sys.exit(3)


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def abort(*args, **kwargs):
    os.abort()


def _backend(fn):
    return lambda: vimbench.register_scan_backend("bad", fn, devices="cpu")


backend_hang, backend_leave, backend_interrupt, backend_abort = map(_backend, (hang, leave, interrupt, abort))


def _returning(change):
    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        out, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
        return change(out, last) if return_last_state else change(out, last)[0]
    return _backend(scan)


returns_list_state = _returning(lambda out, last: (out, [last]))
returns_short_out = _returning(lambda out, last: (out[..., :-1], last))
returns_float64 = _returning(lambda out, last: (out.double(), last))
returns_meta = _returning(lambda out, last: (out.to("meta"), last))


def model_named(name):
    return lambda: register_model(name, "vim", "impostor")(lambda img_size, scan="auto": None)


MODEL_NAMES = {"timm": "timm:resnet18", "newline": "vim\\nimpostor", "slash": "../vim", "formula": "=HYPERLINK(1)",
               "plus": "+1", "minus": "-1", "at": "@SUM(1)", "taken": "vim_tiny"}
for _key, _name in MODEL_NAMES.items():
    globals()[f"model_{_key}"] = model_named(_name)
'''
HAZARDS = {"hang": f"timed out after {LOAD_S} s", "leave": "SystemExit: 3", "interrupt": "KeyboardInterrupt",
           "abort": "worker killed by SIGABRT"}
"""Hazard -> what the one line says it did (the check's limit for a hanging backend is CHECK_S)."""
MODEL_NAMES = {"timm": "timm: prefix is reserved", "newline": "use letters", "slash": "use letters",
               "formula": "use letters", "plus": "use letters", "minus": "use letters", "at": "use letters",
               "taken": "'vim_tiny' clashes with a registered model"}


@pytest.fixture
def install(fresh_plugins, monkeypatch, tmp_path):
    """``install(entry_points, group)``: the hostile module installed as distribution DIST with those entry
    points ({name: function in the module}), loaded afresh on the next use of the registries; the limits set
    to LOAD_S and CHECK_S; the fork server started beforehand (its torch import is no plug-in's time)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "hostile_plugins.py").write_text(HOSTILE)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("VIMBENCH_LOAD_TIMEOUT_S", str(LOAD_S))
    monkeypatch.setenv("VIMBENCH_CHECK_TIMEOUT_S", str(CHECK_S))
    monkeypatch.chdir(tmp_path)
    isolation.run_isolated(plugins.returned, (None,))

    def install(entry_points: dict[str, str], group: str = "vimbench.scan_backends") -> None:
        fake_install(site, DIST, {k: f"hostile_plugins:{v}" for k, v in entry_points.items()}, group)
        plugins._loaded.clear()
    return install


@contextlib.contextmanager
def deadline(seconds: float = DEADLINE_S):
    """Fails the test when the block runs longer than ``seconds`` (a command that hangs)."""
    def expire(signum, frame):
        pytest.fail(f"still running after {seconds} s: hung")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(argv, capsys) -> tuple[int, str]:
    """``main(argv)`` within the deadline: (exit code, stderr)."""
    capsys.readouterr()
    with deadline():
        code = main(argv)
    return code, capsys.readouterr().err


def one_line_about(err: str, name: str) -> str:
    """The single stderr line mentioning ``name``; fails on a traceback or on more than one such line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if name in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("hazard", HAZARDS)
def test_a_register_that_hangs_exits_interrupts_or_aborts_is_skipped_and_the_command_carries_on(
        install, hazard, tmp_path, capsys):
    out = tmp_path / "flops.csv"
    argv = ["flops", "--models", "vim_tiny", "--res", "32", "--out", str(out)]
    assert run(argv, capsys)[0] == 0
    before = out.read_bytes()
    install({"bad": hazard})
    code, err = run([*argv[:4], "32,48", *argv[5:], "--resume"], capsys)
    assert code == 0
    line = one_line_about(err, f"plug-in 'bad' of package '{DIST}'")
    assert line.startswith("vimbench: skipped plug-in") and HAZARDS[hazard] in line
    assert out.read_bytes().startswith(before) and list(pd.read_csv(out).res) == [32, 48]
    assert plugins.problems == [line]


@pytest.mark.parametrize("hazard", HAZARDS)
def test_a_backend_that_hangs_exits_interrupts_or_aborts_fails_check_backend_in_one_line(install, hazard, capsys):
    install({"bad": f"backend_{hazard}"})
    code, err = run(["check-backend", "bad", "--device", "cpu"], capsys)
    assert code == 1
    line = one_line_about(err, "bad")
    assert line.startswith(f"check-backend: bad FAILED on cpu: scan backend 'bad' (package '{DIST}'): ")
    assert HAZARDS[hazard].replace(f"{LOAD_S} s", f"{CHECK_S} s") in line


WRONG = {"returns_list_state": "returned tuple (Tensor (1, 4, 1) float32 on cpu, list (Tensor (1, 4, 4) float32 on "
                               "cpu)), expected (Tensor (1, 4, 1) float32 on cpu, Tensor (1, 4, 4) float32 on cpu)",
         "returns_short_out": "returned tuple (Tensor (1, 4, 0) float32 on cpu, Tensor (1, 4, 4) float32 on cpu)",
         "returns_float64": "returned tuple (Tensor (1, 4, 1) float64 on cpu,",
         "returns_meta": "returned tuple (Tensor (1, 4, 1) float32 on meta,"}


@pytest.mark.parametrize("wrong", WRONG)
def test_a_backend_returning_the_wrong_type_fails_every_path_in_one_line(install, wrong, capsys):
    install({"bad": wrong})
    code, err = run(["check-backend", "bad", "--device", "cpu"], capsys)
    line = one_line_about(err, "bad")
    assert code == 1 and line.startswith("check-backend: bad FAILED on cpu: L1 (1, 4, 1, 4, 0) float32 extras: "
                                         f"raised TypeError: scan backend 'bad' (package '{DIST}'): its scan ")
    assert WRONG[wrong] in line
    args, kw = scan_case(2, 6, 5, 4, 0)
    pair = dict(z=kw["z"], delta_bias=kw["delta_bias"], delta_bias_b=kw["delta_bias"])
    calls = [lambda: selective_scan(*args, **kw, backend="bad")]   # the entry points in this process too
    if wrong != "returns_list_state":                               # the pair asks for no last state
        calls.append(lambda: bidirectional_scan(*args, kw["D"], *args, kw["D"], **pair, backend="bad"))
    for call in calls:
        with pytest.raises(TypeError, match=f"scan backend 'bad' \\(package '{DIST}'\\): its scan returned"):
            call()


def test_an_attention_backend_returning_the_wrong_type_is_named_with_what_it_returned(fresh_plugins):
    vimbench.register_attention_backend("pair", lambda q, k, v: (attention_eager(q, k, v), None), devices="cpu")
    vimbench.register_attention_backend("wide", lambda q, k, v: attention_eager(q, k, v).double(), devices="cpu")
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match=r"^attention backend 'pair' \(package '\(direct call\)'\): its attention "
                                        r"returned tuple \(Tensor \(1, 2, 5, 8\) float32 on cpu, None\), expected "
                                        r"Tensor \(1, 2, 5, 8\) float32 on cpu$"):
        attention(q, q, q, "pair")
    with pytest.raises(TypeError, match="its attention returned Tensor \\(1, 2, 5, 8\\) float64 on cpu"):
        attention(q, q, q, "wide")
    with torch.autocast("cpu", dtype=torch.bfloat16):   # under autocast the dtype is the matmuls' to pick
        assert attention(q, q, q, "wide").dtype == torch.float64


def test_a_hanging_backend_gets_error_rows_from_kernels_and_no_timing(install, monkeypatch, tmp_path, capsys):
    """kernels' preamble (gate and scaling run the same ``check_scans``): the check in its real worker, the
    ceilings and the timing stubbed."""
    install({"bad": "backend_hang"})
    real = verify.run_isolated
    monkeypatch.setattr(verify, "run_isolated", lambda fn, args, timeout=None: real(fn, args, timeout)
                        if fn is check_named_backend else {"status": "ok", "ceiling_gbs": 1.0, "ceiling_gflops_s": 1.0})
    timed = []
    monkeypatch.setattr("vimbench.commands.kernels.kernel_row", lambda cfg, fixed: timed.append(cfg))
    out = tmp_path / "k.csv"
    argv = ["kernels", "--models", "vim_tiny", "--scan", "bad", "--out", str(out), "--repeats", "1", "--min-time",
            "0", "--device", "cpu", "--threads", "1", "--res", "32"]
    code, err = run(argv, capsys)
    assert code == 1 and timed == []
    assert f"kernels: no timing for bad: correctness check failed: scan backend 'bad' (package '{DIST}'): " \
           f"timed out after {CHECK_S} s; worker killed (limit set by VIMBENCH_CHECK_TIMEOUT_S)" in err
    assert "Traceback" not in err
    before = out.read_bytes()
    df = pd.read_csv(out)
    assert len(df) == 3 and (df.status == "error").all() and df.error.str.contains("timed out after").all()
    code, err = run([*argv[:-1], "32,48", "--resume"], capsys)
    assert code == 1 and out.read_bytes().startswith(before) and len(pd.read_csv(out)) == 9


def test_check_scans_reports_a_crashing_backend_with_its_package_for_forward_and_gradients(install):
    install({"bad": "backend_abort"})
    with deadline():
        failed = verify.check_scans(["bad"], "cpu", print, grads=True)
    assert failed == {"bad": f"correctness check failed: scan backend 'bad' (package '{DIST}'): worker killed by "
                             f"SIGABRT"}


def test_impostor_model_names_are_skipped_one_line_each_and_timm_names_stay_timms(install, capsys):
    install({f"m_{key}": f"model_{key}" for key in MODEL_NAMES}, group="vimbench.models")
    code, err = run(["flops", "--models", "nope", "--res", "32"], capsys)   # an unknown name loads the group
    assert code == 2
    for key, why in MODEL_NAMES.items():
        assert why in one_line_about(err, f"plug-in 'm_{key}' of package '{DIST}'")
    assert one_line_about(err, "unknown model 'nope'") == (     # the built-ins only
        "vimbench flops: error: --models: unknown model 'nope'; known: deit_base, deit_small, deit_tiny, vim_base, "
        "vim_small, vim_small_s8, vim_tiny, vim_tiny_s8 or timm:<name>")
    assert "impostor" not in {model_entry(name).description for name in vimbench.list_models()}
    assert model_entry("timm:resnet18").family == "timm"


@pytest.mark.parametrize("name", ["timm:resnet18", "vim\nx", "a/b", "=1+1", "+1", "-1", "@A1", "", 3, "vim_tiny"])
def test_register_model_refuses_names_that_break_the_rule(fresh_plugins, name):
    with pytest.raises(ValueError, match="model name"):
        register_model(name, "vim", "x")(lambda img_size, scan="auto": None)


def test_a_time_limit_that_is_not_a_positive_number_is_one_line_and_exit_2(install, monkeypatch, capsys):
    install({"bad": "backend_hang"})
    for value in ("abc", "0", "-1", "inf", "nan"):
        monkeypatch.setenv("VIMBENCH_LOAD_TIMEOUT_S", value)
        plugins._loaded.clear()
        code, err = run(["check-backend", "bad"], capsys)
        assert code == 2 and err.strip() == (f"vimbench check-backend: error: VIMBENCH_LOAD_TIMEOUT_S={value!r}: give "
                                             f"the time limit as a positive number of seconds")


@pytest.mark.slow
def test_an_aborting_backend_ends_check_backend_with_one_line_in_a_fresh_process(tmp_path):
    """The console path end to end: exit 1 and one line, not 134 and nothing."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "hostile_plugins.py").write_text(HOSTILE)
    fake_install(site, DIST, {"bad": "hostile_plugins:backend_abort"})
    env = {**os.environ, "PYTHONPATH": str(site), "VIMBENCH_CHECK_TIMEOUT_S": str(CHECK_S)}
    proc = subprocess.run([sys.executable, "cli.py", "check-backend", "bad", "--device", "cpu"], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"check-backend: bad FAILED on cpu: scan backend 'bad' (package '{DIST}'): worker killed by SIGABRT")
