"""`vimbench gpu-check` as far as it can be checked without a GPU: its plan, floors, summary, exp2 kernel."""
import datetime
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from helpers import needs_no_gpu
from vimbench import gpucheck
from vimbench.commands import cli, main


@needs_no_gpu
def test_needs_a_gpu(capsys):
    assert main(["gpu-check"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_default_out_names_card_and_date():
    out = gpucheck.default_out("NVIDIA H100 80GB HBM3", datetime.date(2026, 11, 25))
    assert str(out) == "results/gpu/nvidia-h100-80gb-hbm3-2026-11-25"


@pytest.mark.parametrize("part", ["kernels", "scaling"])
def test_plan_command_lines_parse(part, tmp_path):
    """Every planned command line is accepted by the real CLI parser (nothing is run)."""
    steps = gpucheck.plan(part, tmp_path)
    assert steps
    for name, argv in steps:
        command = cli.commands[argv[0]]
        with command.make_context(argv[0], list(argv[1:])) as ctx:
            assert ctx.params  # parsed
        assert any(str(tmp_path) in a for a in argv), name


def test_with_resume_only_for_existing_csv(tmp_path):
    argv = ["scaling", "--out", str(tmp_path / "s.csv")]
    assert gpucheck.with_resume(argv) == argv
    (tmp_path / "s.csv").write_text("model\n")
    assert gpucheck.with_resume(argv) == [*argv, "--resume"]
    report = ["report", "x.csv", "--out-dir", str(tmp_path)]
    assert gpucheck.with_resume(report) == report


def fake_kernels_csv():
    # vim_tiny at L=6085, batch 64: one direction moves 1.2e9 bytes; both directions twice the exp2 work
    return pd.DataFrame([
        dict(op="scan", impl="triton", model="vim_tiny", tokens=6085, batch=64, dtype="fp32", status="ok", time_ms=1.0,
             bytes=1.2e9, ceiling_gbs=3000.0, d_inner=384, d_state=16),
        dict(op="scan_bidir", impl="triton", model="vim_tiny", tokens=6085, batch=64, dtype="fp32", status="ok",
             time_ms=2.0, bytes=2.0e9, ceiling_gbs=3000.0, d_inner=384, d_state=16),
        dict(op="scan", impl="cpu", model="vim_tiny", tokens=6085, batch=64, dtype="fp32", status="ok", time_ms=50.0,
             bytes=1.2e9, ceiling_gbs=3000.0, d_inner=384, d_state=16),
        dict(op="attention", impl="sdpa", model="deit_tiny", tokens=6085, batch=64, dtype="fp32", status="ok",
             time_ms=9.0, bytes=1e9, ceiling_gbs=3000.0, d_inner=None, d_state=None)])


def test_scan_floors_closed_form():
    floors = gpucheck.scan_floors(fake_kernels_csv(), exp2_per_s=4e12)
    assert list(floors.op) == ["scan", "scan_bidir"] and set(floors.impl) == {"triton"}  # Triton scan rows only
    exps = 64 * 384 * 6085 * 16
    one = floors.iloc[0]
    assert one.mem_floor_ms == pytest.approx(1.2e9 / 3000e9 * 1e3)
    assert one.exp_floor_ms == pytest.approx(exps / 4e12 * 1e3)
    assert one.floor_ms == pytest.approx(max(0.4, exps / 4e12 * 1e3))
    assert one.ratio == pytest.approx(1.0 / one.floor_ms)
    assert floors.iloc[1].exp_floor_ms == pytest.approx(2 * exps / 4e12 * 1e3)


def test_summary_from_fake_results(tmp_path):
    (tmp_path / "facts.json").write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "exp2_per_s": 4e12,
                                                     "cuda_context_gib": 0.52}))
    (tmp_path / "tests.json").write_text(json.dumps({"returncode": 0, "passed": 84}))
    pipelined = dict(fake_kernels_csv().iloc[0], impl="triton_pipelined", time_ms=0.8)  # the second Triton design
    pd.concat([fake_kernels_csv(), pd.DataFrame([pipelined])]).to_csv(tmp_path / "kernels-b64-fp32.csv", index=False)
    text = gpucheck.write_summary(tmp_path).read_text()
    assert text.startswith("# GPU check: NVIDIA H100 80GB HBM3")
    assert "84 passed, 0 failed, 0 errors (exit code 0)" in text and "CUDA context: 0.52 GiB" in text
    assert "| scan | triton | vim_tiny | 6085 | 64 | fp32 | 1 |" in text
    assert "| scan | triton_pipelined | vim_tiny | 6085 | 64 | fp32 | 0.8 |" in text
    assert "- scan fp32: triton_pipelined is 1.25x faster than triton (0.8 ms vs 1 ms)" in text
    assert "not run" in text  # no report yet
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gpucheck.write_summary(empty).read_text().count("not run") >= 3


def test_exp2_chain_kernel_under_interpreter():
    code = ("import torch; from vimbench.kernels.exp_rate import exp2_chain, exp2_chain_ref;"
            "x = torch.rand(3000); r = exp2_chain_ref(x.double(), 16);"
            "y = exp2_chain(x.clone(), 16); assert torch.allclose(y.double(), r, rtol=1e-5), (y, r); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
