"""`vimbench gpu-check` as far as it can be checked without a GPU: its plan under a budget, the run of its
steps (stubbed at the step boundary), interruption, the archive and its unpacking, floors, summary, the
exp2 kernel."""
import datetime
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import needs_no_gpu
from vimbench.analysis.paper import PAPER_SETTING_OPTIONS
from vimbench.commands import cli, main
from vimbench.commands.gpu_check import call_command
from vimbench.gpucheck import checks, run as gpu_run, steps as gpu_steps, summary
from vimbench.gpucheck.steps import Step
from vimbench.measure import preflight, verify
from vimbench.rows.schema import KERNELS, SCALING


@needs_no_gpu
def test_needs_a_gpu(capsys):
    assert main(["gpu-check"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_default_out_names_card_and_date():
    out = gpu_run.default_out("NVIDIA H100 80GB HBM3", datetime.date(2026, 11, 25))
    assert str(out) == "results/gpu/nvidia-h100-80gb-hbm3-2026-11-25"


@pytest.fixture(scope="module")
def real_steps(tmp_path_factory):
    """The real plan on an H100/H200 with the triton and cpu scans (estimates count FLOPs on meta)."""
    return gpu_steps.build_steps(tmp_path_factory.mktemp("out"), ["cpu", "triton"], call=call_command)


def test_every_planned_call_names_options_of_its_command(real_steps):
    """Every vimbench command the plan calls takes the options the plan gives it (nothing is run), and its
    sweeps write under the output folder."""
    calls = [c for step in real_steps for c in step.calls]
    assert {name for name, _ in calls} == {"scaling", "report", "kernels"}
    for name, options in calls:
        assert set(options) <= {p.name for p in cli.commands[name].params}, name
    assert all(Path(o["out"]).name.startswith(("kernels-", "scaling-")) for n, o in calls if n != "report")


def test_paper_step_calls_scaling_with_the_paper_preset(real_steps):
    name, options = real_steps[2].calls[0]
    assert name == "scaling" and options == {**PAPER_SETTING_OPTIONS, "scan_spec": "triton",
                                             "out": str(Path(options["out"]).parent / "scaling-paper.csv")}


@pytest.mark.parametrize("budget, expected", [
    (60, ["check"]),
    (420, ["check", "tests", "paper", "floor", "designs"]),
    (3600, ["check", "tests", "paper", "floor", "designs", "backward", "kernels", "figures"]),
    (None, ["check", "tests", "paper", "floor", "designs", "backward", "kernels", "figures"])])
def test_plan_under_budget_in_priority_order(real_steps, budget, expected):
    chosen, left_out = gpu_run.plan(real_steps, budget)
    assert [s.name for s in chosen] == expected
    assert [s.name for s in chosen + left_out] == ["check", "tests", "paper", "floor", "designs", "backward",
                                                   "kernels", "figures"]
    assert sum(s.estimate_s for s in chosen) + gpu_run.WRAP_UP_S <= (budget or float("inf"))


def test_plan_with_mamba_ssm_present(tmp_path):
    """mamba_ssm adds a backend check and becomes the paper step's scan; 420 s still delivers steps 1-3."""
    steps = gpu_steps.build_steps(tmp_path, ["cpu", "triton", "mamba_ssm"], call=call_command)
    assert [s.name for s in gpu_run.plan(steps, 420)[0]][:4] == ["check", "tests", "paper", "floor"]
    assert steps[2].calls[0][1]["scan_spec"] == "mamba_ssm"
    cost = gpu_steps.COST  # triton compiles 6 shapes x 2 dtypes x 2 (with/without extras) specialisations
    assert steps[0].estimate_s == 2 * cost["check_other_s"] + cost["worker_s"] + 24 * cost["compile_s"]
    assert gpu_run.plan(steps, 60)[0] == []


def test_forward_estimate_closed_form():
    """DeiT-Ti eager at 1248, batch 64: 407.64 GFLOPs per image (341.24 of them QK^T and AV) at 40 TFLOP/s,
    plus the score matrix's 16 bytes per element = flops_attention / 16 bytes at 2.5 TB/s."""
    flops, attention = 407_640_572_928 * 64, 341_242_905_600 * 64
    expected = flops / 40e12 + attention / 16 / 2.5e12
    assert gpu_steps.forward_s("deit_tiny", 1248, 64, True) == pytest.approx(expected)
    assert gpu_steps.forward_s("deit_tiny", 1248, 64, False) == pytest.approx(flops / 40e12)


def test_kernel_configuration_counts():
    """3 Vim ops (scan, scan_bidir, mixer) per scan backend, 2 DeiT ops (attention, block) per attention backend."""
    assert gpu_steps.op_configs_count(5, vim=(3, 2), deit=(1, 4)) == 5 * (3 * 2 * 3 + 4 * 2)
    assert gpu_steps.op_configs_count(1, vim=(1, 1)) == 3


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_step(name, estimate, clock, took=None, failures=(), correctness=False, ran=None):
    """A step that 'takes' ``took`` seconds (default: its estimate) of the fake clock."""
    def run():
        clock.now += estimate if took is None else took
        if ran is not None:
            ran.append(name)
        return list(failures)
    return Step(name, f"fake {name}", estimate, run, correctness=correctness)


def test_scaled_down_plan_delivers_steps_1_to_3_in_420_s(real_steps, tmp_path):
    """The real plan's estimates with the work stubbed out: each step takes its estimate (then 10% more) on
    a fake clock; a 420 s budget runs check, tests, paper and floor (and the designs step when the estimates
    hold) and records their durations."""
    for overrun in (1.0, 1.1):
        clock, ran = FakeClock(), []
        steps = [fake_step(s.name, s.estimate_s, clock, took=s.estimate_s * overrun, ran=ran,
                           correctness=s.correctness) for s in real_steps]
        records = gpu_run.run_steps(steps, 420, tmp_path / f"steps{overrun}.jsonl",
                                           echo=lambda _: None, clock=clock)
        delivered = 5 if overrun == 1.0 else 4
        assert ran == ["check", "tests", "paper", "floor", "designs"][:delivered]
        assert [r["status"] for r in records] == ["ok"] * delivered + ["no budget"] * (len(real_steps) - delivered)
        assert [r["actual_s"] for r in records[:4]] == [round(s.estimate_s * overrun, 1) for s in real_steps[:4]]
        logged = [json.loads(line) for line in (tmp_path / f"steps{overrun}.jsonl").read_text().splitlines()]
        assert [r["name"] for r in logged] == [s.name for s in real_steps] and logged[0]["budget_s"] == 420


def test_run_stops_starting_steps_that_would_overrun(tmp_path):
    clock, ran = FakeClock(), []
    steps = [fake_step("a", 10, clock, took=25, ran=ran), fake_step("b", 20, clock, ran=ran),
             fake_step("c", 6, clock, ran=ran)]
    # budget 60 less 10 for the wrap-up: a takes 25 s (estimated 10), b fits the 25 s left, then 5 s < c's 6
    records = gpu_run.run_steps(steps, 60, tmp_path / "s.jsonl", echo=lambda _: None,
                                       clock=clock)
    assert ran == ["a", "b"] and [r["status"] for r in records] == ["ok", "ok", "no budget"]


def test_failed_correctness_skips_every_later_timing(tmp_path):
    clock, ran = FakeClock(), []
    steps = [fake_step("check", 1, clock, failures=["triton: out differs"], correctness=True, ran=ran),
             fake_step("tests", 1, clock, correctness=True, ran=ran), fake_step("paper", 1, clock, ran=ran),
             fake_step("kernels", 1000, clock, ran=ran)]
    records = gpu_run.run_steps(steps, 100, tmp_path / "s.jsonl", echo=lambda _: None,
                                       clock=clock)
    assert ran == ["check", "tests"]
    assert [r["status"] for r in records] == ["failed", "ok", "skipped", "skipped"]


def test_budget_spent_mid_step_cuts_it_short(tmp_path):
    """A step still running when the budget is spent is stopped by the alarm; later steps do not start."""
    ran, old_alarm = [], signal.getsignal(signal.SIGALRM)

    def slow():
        ran.append("slow")
        time.sleep(30)
        return []
    steps = [Step("slow", "sleeps", 0.0, slow), Step("next", "never", 0.0, lambda: ran.append("next") or [])]
    records = gpu_run.run_steps(steps, gpu_run.WRAP_UP_S + 0.2, tmp_path / "s.jsonl",
                                       echo=lambda _: None)
    assert ran == ["slow"] and records[0]["status"] == "cut short: budget spent" and records[0]["actual_s"] < 30
    assert records[1]["status"] == "no budget" and signal.getsignal(signal.SIGALRM) == old_alarm


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """gpu-check on CPU: a CUDA card named NVIDIA H200 that passes the preflight, and a plan whose steps the
    test supplies."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(preflight, "run_preflight", lambda device: [])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "README.md").write_text(
        "# Committed results\n\n| folder | machine | what | command |\n|---|---|---|---|\n"
        "| [cpu-2026-12-01/](cpu-2026-12-01/) | CPU | sweep | `vimbench scaling` |\n"
        "| gpu/ | — | nothing yet | |\n\nText after.\n")

    def use(steps):
        monkeypatch.setattr(gpu_steps, "build_steps", lambda out, present=None, command="", call=None: steps(out))
    return use


def writes(name, text="x"):
    def run(out):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
        return []
    return run


def step_in(out, name, run, estimate=1.0, correctness=False):
    return Step(name, f"fake {name}", estimate, lambda: run(out), correctness=correctness)


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt, 130), ("SIGTERM", 143)])
def test_interrupted_run_still_writes_its_archive(fake_gpu, tmp_path, stop, code, capsys):
    def interrupt(out):
        (out / "kernels-b1-fp32.csv").write_text("op\nscan\n")
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        raise stop()
    fake_gpu(lambda out: [step_in(out, "check", writes("check.json", json.dumps(
                              {"triton": {"status": "ok", "check_ok": True, "checked": 24}})), correctness=True),
                          step_in(out, "paper", interrupt), step_in(out, "floor", writes("never.txt"))])
    old_term = signal.getsignal(signal.SIGTERM)
    assert main(["gpu-check", "--budget", "420", "--archive", "gpu.tar.gz", "--out-dir", "run"]) == code
    assert signal.getsignal(signal.SIGTERM) == old_term
    assert "interrupted; summary and archive written" in capsys.readouterr().err
    with tarfile.open(tmp_path / "gpu.tar.gz") as tar:
        names = set(tar.getnames())
        top = f"nvidia-h200-{datetime.date.today().isoformat()}"
        assert {f"{top}/{n}" for n in ("check.json", "kernels-b1-fp32.csv", "summary.md", "steps.jsonl",
                                       "environment.json")} <= names
        assert f"{top}/never.txt" not in names
        summary = tar.extractfile(f"{top}/summary.md").read().decode()
        env = json.loads(tar.extractfile(f"{top}/environment.json").read())
    assert summary.splitlines()[0] == ("# GPU check: NVIDIA H200: kernel correctness not checked: the timings "
                                       "below are untrusted")
    assert "stopped during: paper (interrupted)" in summary
    assert env["device_name"] == "NVIDIA H200" and env["budget_s"] == 420 and "clocks_end" in env
    assert env["command"] == "vimbench gpu-check --budget 420 --archive gpu.tar.gz --out-dir run"


def test_unpack_recreates_the_folder_and_indexes_it(fake_gpu, tmp_path, capsys):
    fake_gpu(lambda out: [step_in(out, "check", writes("check.json", json.dumps(
                              {"triton": {"status": "ok", "check_ok": True, "checked": 24}})), correctness=True),
                          step_in(out, "tests", writes("tests.json", json.dumps({"returncode": 0, "passed": 82})),
                                  correctness=True),
                          step_in(out, "paper", writes("report/report.md")),
                          step_in(out, "kernels", writes("kernels.csv"), estimate=10_000)])
    assert main(["gpu-check", "--budget", "100", "--archive", "gpu.tar.gz", "--out-dir", "run"]) == 0
    top = f"nvidia-h200-{datetime.date.today().isoformat()}"
    assert main(["gpu-check", "--unpack", "gpu.tar.gz"]) == 0
    dest = tmp_path / "results" / "gpu" / top
    made = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file()) == made
    for rel in made:
        assert (dest / rel).read_bytes() == (tmp_path / "run" / rel).read_bytes()
    summary = (dest / "summary.md").read_text().splitlines()
    assert summary[0] == "# GPU check: NVIDIA H200: kernels correct"
    assert summary[6] == "- **Not run for lack of budget:** kernels (estimate 10000 s)"
    readme = (tmp_path / "results" / "README.md").read_text().splitlines()
    assert readme[4].startswith(f"| [gpu/{top}/](gpu/{top}/) | NVIDIA H200")
    assert "summary.md): kernels correct;" in readme[4] and f"[report](gpu/{top}/report/report.md)" in readme[4]
    assert readme[5].startswith("| [cpu-2026-12-01/]")
    assert not any(line.startswith("| gpu/ |") for line in readme) and readme[-1] == "Text after."
    capsys.readouterr()
    assert main(["gpu-check", "--unpack", "gpu.tar.gz"]) == 2  # never overwritten
    assert "exists already" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--budget", "abc"], "'abc' is not a valid float"),
    (["--budget", "0"], "--budget"),
    (["--budget", "-5"], "--budget"),
    (["--budget", "nan"], "not a finite number of seconds"),
    (["--budget", "inf"], "not a finite number of seconds"),
    (["--archive", "gpu.zip"], "must end in .tar.gz or .tgz"),
    (["--archive", "missing/gpu.tar.gz"], "does not exist"),
    (["--archive", "old.tar.gz"], "exists already"),
    (["--unpack", "missing.tar.gz"], "cannot read it as a tar archive"),
    (["--unpack", "foreign.tar.gz"], "not a gpu-check archive"),
    (["--unpack", "old.tar.gz", "--budget", "60"], "--unpack takes no other option")])
def test_bad_values_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "README.md").write_text("|a|\n|---|\n")
    (tmp_path / "old.tar.gz").write_bytes(b"")
    (tmp_path / "x.txt").write_text("x")
    with tarfile.open(tmp_path / "foreign.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "x.txt", arcname="x.txt")
    assert main(["gpu-check", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("vimbench gpu-check: error:")


def test_a_sweep_resumes_only_a_csv_with_rows(tmp_path):
    csv = tmp_path / "s.csv"
    assert not gpu_steps.started(str(csv))
    csv.write_text("")
    assert not gpu_steps.started(str(csv))
    csv.write_text("model\n")
    assert gpu_steps.started(str(csv))


def readable(df, schema):
    """``df`` with every column the reader requires of ``schema``'s CSVs (those it lacks set to a neutral value)."""
    neutral = {"head": False, "device": "cuda", "family": "vim", "device_name": "NVIDIA H100 80GB HBM3"}
    return df.assign(**{c: neutral.get(c, 1.0) for c in schema.required if c not in df.columns})


def fake_kernels_csv():
    # vim_tiny at L=6085, batch 64: one direction moves 1.2e9 bytes; both directions twice the exp2 work
    shape = dict(res=1248, tokens=6085, batch=64, dtype="fp32", status="ok", ceiling_gbs=3000.0)
    vim = dict(model="vim_tiny", d_inner=384, d_state=16, **shape)
    exps = 64 * 384 * 6085 * 16  # one per (b, e, t, n) and direction
    return pd.DataFrame([
        dict(op="scan", impl="triton", time_ms=1.0, bytes=1.2e9, exps=exps, **vim),
        dict(op="scan_bidir", impl="triton", time_ms=2.0, bytes=2.0e9, exps=2 * exps, **vim),
        dict(op="scan", impl="cpu", time_ms=50.0, bytes=1.2e9, exps=exps, **vim),
        dict(op="attention", impl="sdpa", model="deit_tiny", time_ms=9.0, bytes=1e9, exps=0, d_inner=None,
             d_state=None, **shape)])


def test_scan_floors_closed_form():
    floors = summary.scan_floors(fake_kernels_csv(), exp2_per_s=4e12)
    assert list(floors.op) == ["scan", "scan_bidir"] and set(floors.impl) == {"triton"}  # Triton scan rows only
    exps = 64 * 384 * 6085 * 16
    one = floors.iloc[0]
    assert one.mem_floor_ms == pytest.approx(1.2e9 / 3000e9 * 1e3)
    assert one.exp_floor_ms == pytest.approx(exps / 4e12 * 1e3)
    assert one.floor_ms == pytest.approx(max(0.4, exps / 4e12 * 1e3))
    assert one.ratio == pytest.approx(1.0 / one.floor_ms)
    assert floors.iloc[1].exp_floor_ms == pytest.approx(2 * exps / 4e12 * 1e3)


def fake_paper_csv():
    row = dict(res=1248, status="ok", batch=64, dtype="fp32")
    return pd.DataFrame([dict(model="vim_tiny", impl="triton", throughput_img_s=120.0, mem_peak_gib=8.5, **row),
                         dict(model="deit_tiny", impl="eager", throughput_img_s=40.0, mem_peak_gib=60.0, **row),
                         dict(model="deit_tiny", impl="sdpa", throughput_img_s=80.0, mem_peak_gib=4.0, **row),
                         dict(model="vim_tiny", impl="triton", throughput_img_s=999.0, mem_peak_gib=1.0,
                              **{**row, "res": 512})])


def test_summary_from_fake_results(tmp_path):
    (tmp_path / "facts.json").write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "exp2_per_s": 4e12,
                                                     "cuda_context_gib": 0.52}))
    (tmp_path / "check.json").write_text(json.dumps({b: {"status": "ok", "check_ok": True, "checked": 24}
                                                     for b in ("cpu", "triton")}))
    (tmp_path / "tests.json").write_text(json.dumps({"returncode": 0, "passed": 84}))
    pipelined = dict(fake_kernels_csv().iloc[0], impl="triton_pipelined", time_ms=0.8)  # the second Triton design
    kernels = pd.concat([fake_kernels_csv(), pd.DataFrame([pipelined])])
    readable(kernels, KERNELS).to_csv(tmp_path / "kernels-b64-fp32.csv", index=False)
    readable(fake_paper_csv(), SCALING).to_csv(tmp_path / "scaling-paper.csv", index=False)
    steps = [dict(run="r1", name="check", what="w", estimate_s=30, actual_s=12.5, status="ok"),
             dict(run="r2", name="check", what="w", estimate_s=30, actual_s=20.0, status="ok"),
             dict(run="r2", name="kernels", what="w", estimate_s=1100, actual_s=None, status="no budget")]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    lines = summary.write_summary(tmp_path).read_text().splitlines()
    assert lines[0] == "# GPU check: NVIDIA H100 80GB HBM3: kernels correct"
    assert lines[3] == ("- **Kernels correct?** correct: cpu correct on 24 cases; triton correct on 24 cases; "
                        "CUDA tests of the Triton scan: 84 passed, 0 failed, 0 errors")
    assert lines[4] == ("- **Vim-Ti vs DeiT-Ti at 1248 px, the paper's setting** (fp32, batch 64, backbone): "
                        "Vim-Ti (triton) 120 img/s, 8.5 GiB; DeiT-Ti eager 40 img/s, 60 GiB; DeiT-Ti fused (sdpa) "
                        "80 img/s, 4 GiB; Vim-Ti runs 3.00x the images/s of DeiT-Ti eager; Vim-Ti runs 1.50x the "
                        "images/s of DeiT-Ti fused (sdpa)")
    # scan: 1 ms against max(1.2e9 B / 3000 GB/s = 0.4 ms, 64*384*6085*16 exp2 / 4e12 = 0.598 ms)
    floor_ms = 64 * 384 * 6085 * 16 / 4e12 * 1e3
    assert lines[5].startswith(f"- **Triton scan against its floor:** scan (triton) 1 ms = {1 / floor_ms:.2f}x its "
                               "floor (misses the goal <= 1.4x); scan_bidir (triton) 2 ms")
    assert lines[6] == "- **Not run for lack of budget:** kernels (estimate 1100 s)"
    text = "\n".join(lines)
    assert "| check | ok | 30 | 20 | w |" in text and "12.5" not in text  # the latest run's steps only
    assert "84 passed, 0 failed, 0 errors (exit code 0)" in text and "CUDA context: 0.52 GiB" in text
    assert "| scan | triton | vim_tiny | 1248 | 6085 | 64 | fp32 | 1 |" in text
    assert "| scan | triton_pipelined | vim_tiny | 1248 | 6085 | 64 | fp32 | 0.8 |" in text
    assert "- scan fp32: triton_pipelined is 1.25x faster than triton (0.8 ms vs 1 ms)" in text
    assert "see [report" not in text  # no report yet


def test_summary_first_line_says_when_timings_are_untrusted(tmp_path):
    readable(fake_paper_csv(), SCALING).to_csv(tmp_path / "scaling-paper.csv", index=False)
    first = lambda: summary.write_summary(tmp_path).read_text().splitlines()[0]  # noqa: E731
    assert first() == "# GPU check: card unknown: kernel correctness not checked: the timings below are untrusted"
    (tmp_path / "check.json").write_text(json.dumps({"triton": {"status": "ok", "check_ok": False, "checked": 3,
                                                                "check_failure": "odd-L: out differs"}}))
    assert first() == ("# GPU check: card unknown: KERNELS INCORRECT: no timing is taken or shown after a failed "
                       "correctness check")
    text = (tmp_path / "summary.md").read_text()
    assert "img/s" not in text and text.count("withheld: the kernels failed their correctness checks") == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    text = summary.write_summary(empty).read_text()
    assert text.splitlines()[0] == "# GPU check: card unknown: kernel correctness not checked"
    assert text.count("not measured") >= 2 and text.count("not run") >= 2


def test_run_checks_records_every_backend_and_names_failures(tmp_path, monkeypatch):
    """The check step's bookkeeping, with the worker's result stubbed (the check itself needs CUDA)."""
    results = {"cpu": {"status": "ok", "check_ok": True, "checked": 24, "check_failure": ""},
               "triton": {"status": "ok", "check_ok": False, "checked": 5, "check_failure": "odd-L: out differs"},
               "mamba_ssm": {"status": "error", "error": "RuntimeError: no kernel image"}}
    monkeypatch.setattr(verify, "run_isolated", lambda fn, args, timeout: results[args[0]])
    failures = checks.run_checks(tmp_path, ["cpu", "triton", "mamba_ssm"])
    assert failures == ["triton: odd-L: out differs", "mamba_ssm: RuntimeError: no kernel image"]
    assert json.loads((tmp_path / "check.json").read_text()) == results


def test_backward_step_estimate_and_placement(tmp_path):
    """The backward step comes after the current priorities (check .. designs), so a 420 s budget still
    delivers those; its estimate: the gradient checks (cpu and mamba_ssm twice check_other_s, triton a worker and
    its forward and backward specialisations of 24 cases), then per dtype: a worker, the exp2 rate, the cpu
    reference, 2 designs x (forward, backward) compiled and timed, and with mamba_ssm its backward and reference
    call timed too."""
    cost = gpu_steps.COST
    for present, mamba_ops in ((["cpu", "triton"], 0), (["cpu", "triton", "mamba_ssm"], 2)):
        steps = gpu_steps.build_steps(tmp_path, present, call=call_command)
        names = [s.name for s in steps]
        assert names.index("backward") == names.index("designs") + 1
        grads = (len(present) - 1) * 2 * cost["check_other_s"] + cost["worker_s"] + 2 * 24 * cost["compile_s"]
        per_dtype = (cost["worker_s"] + cost["exp2_s"] + cost["check_other_s"] + 4 * cost["compile_s"]
                     + (4 + mamba_ops) * cost["op_s"])
        assert steps[names.index("backward")].estimate_s == cost["step_s"] + grads + 2 * per_dtype
        assert "backward" not in [s.name for s in gpu_run.plan(steps, 420)[0]]


def test_run_backward_records_both_dtypes_and_names_failures(tmp_path, monkeypatch):
    """The backward step's bookkeeping, with the worker's result stubbed (the timing itself needs CUDA): a
    gradient failure and a failed worker are named; mamba_ssm's backward is asked for only when present."""
    design = dict(fwd_ms=1.0, bwd_ms=2.0, bwd_over_fwd=2.0, bwd_over_floor=3.0, grad_failures=[])
    fp32 = {"status": "ok", "floor_ms": 0.7, "triton": dict(design, grad_failures=["dA differs from cpu's by 0.1"]),
            "triton_pipelined": design}
    results = {"fp32": fp32, "bf16": {"status": "error", "error": "OutOfMemoryError: CUDA out of memory"},
               **{b: {**CHECKED, "grad_ok": True} for b in ("cpu", "triton")}}
    asked = []
    for module in (verify, checks):  # the gradient checks (verify's), then the backward step's own workers
        monkeypatch.setattr(module, "run_isolated",
                            lambda fn, args, timeout=None: asked.append(args) or results[args[0]])
    failures = checks.run_backward(tmp_path, ["cpu", "triton"])
    assert failures == ["backward fp32 triton: dA differs from cpu's by 0.1",
                        "backward bf16: OutOfMemoryError: CUDA out of memory"]
    assert asked == [("cpu", "cuda", True), ("triton", "cuda", True), ("fp32", False), ("bf16", False)]
    assert json.loads((tmp_path / "backward.json").read_text()) == {k: results[k] for k in ("fp32", "bf16")}


CHECKED = {"status": "ok", "check_ok": True, "checked": 24, "check_failure": "", "forward_only": ""}
"""A worker's ``check_named_backend`` result with grads whose forward check passed (grad_* to add)."""


def test_backward_step_checks_gradients_before_any_timing(tmp_path, monkeypatch):
    """The backward step (the only one that times a backward) first checks the gradients of every scan backend
    present, each in a worker (check_named_backend with grads); a wrong gradient is named and nothing is timed."""
    from vimbench.kernels.selective_scan.check import check_named_backend
    results = {"cpu": {**CHECKED, "grad_ok": True, "grad_checked": 48},
               "triton": {**CHECKED, "grad_ok": False, "grad_checked": 3, "grad_failure": "odd-L: dB differs"}}
    calls = []
    monkeypatch.setattr(verify, "run_isolated",
                        lambda fn, args, timeout=None: calls.append((fn, args)) or results[args[0]])
    steps = gpu_steps.build_steps(tmp_path, ["cpu", "triton"], call=call_command)
    backward = next(s for s in steps if s.name == "backward")
    assert backward.run() == ["triton: gradient check failed: odd-L: dB differs",
                                      "backward: not timed (a scan backend failed its gradient check)"]
    assert calls == [(check_named_backend, ("cpu", "cuda", True)), (check_named_backend, ("triton", "cuda", True))]
    assert json.loads((tmp_path / "grad-check.json").read_text()) == results
    assert not (tmp_path / "backward.json").exists()


def test_exp2_chain_kernel_under_interpreter():
    code = ("import torch; from vimbench.kernels.exp_rate import exp2_chain, exp2_chain_ref;"
            "x = torch.rand(3000); r = exp2_chain_ref(x.double(), 16);"
            "y = exp2_chain(x.clone(), 16); assert torch.allclose(y.double(), r, rtol=1e-5), (y, r); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_sweep_call_starts_from_the_commands_defaults_and_records_the_command(tmp_path, monkeypatch):
    """``call_command`` passes the command's defaults overridden by the step's options, resume only for a CSV
    with rows."""
    from vimbench.commands import options, scaling
    seen = []
    monkeypatch.setattr(scaling, "sweep", lambda command, **opts: seen.append((command, opts)) or [])
    csv = tmp_path / "scaling-paper.csv"
    assert call_command("scaling", {"scan_spec": "triton", "out": str(csv)}, "vimbench gpu-check --budget 9") == 0
    csv.write_text("model\n")
    assert call_command("scaling", {"scan_spec": "triton", "out": str(csv)}, "vimbench gpu-check") == 0
    expected = {**options.defaults(scaling.command), "scan_spec": "triton", "out": str(csv)}
    assert seen == [("vimbench gpu-check --budget 9", {**expected, "resume": False}),
                    ("vimbench gpu-check", {**expected, "resume": True})]


def test_a_call_with_bad_input_gives_exit_code_2_and_one_line(tmp_path, capsys):
    missing = str(tmp_path / "none.csv")
    assert call_command("report", {"results": [missing], "out_dir": str(tmp_path / "r")}, "vimbench gpu-check") == 2
    assert capsys.readouterr().err == f"vimbench report: error: {missing}: no such file\n"
