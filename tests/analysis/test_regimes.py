"""Regimes as settings of their own, and the answer to "does compiling both contenders change the verdict?"
on constructed data (helpers_csv's power laws, Vim's latency scaled in the compiled regime)."""
import pandas as pd
import pytest
from helpers_csv import scaling_frame

from vimbench.analysis import regimes
from vimbench.present import figures as plotting
from vimbench.commands import main
from vimbench.rows.reader import load_results, split_settings


def _faster_vim(frame: pd.DataFrame, speedup: float) -> pd.DataFrame:
    frame = frame.copy()
    vim = frame["model"] == "vim_tiny"
    for col in ("time_ms", "time_ms_p10", "time_ms_p90"):
        frame.loc[vim, col] /= speedup
    frame.loc[vim, "throughput_img_s"] *= speedup
    return frame


def _with_compiled(tmp_path, eager_speedup: float, compiled_speedup: float) -> tuple:
    """A CSV of helpers_csv's frame (eager) and the same rows compiled (mode default), Vim's latency divided
    by ``eager_speedup`` and ``compiled_speedup``; returns its path and its settings."""
    eager = scaling_frame(device="cpu").assign(compile="none", amp="none")
    comp = _faster_vim(eager.assign(compile="default", compile_s=12.5, graph_breaks=0), compiled_speedup)
    pd.concat([_faster_vim(eager, eager_speedup), comp]).to_csv(tmp_path / "r.csv", index=False)
    return tmp_path / "r.csv", split_settings(*load_results(tmp_path / "r.csv"))


def test_each_regime_is_its_own_setting_and_old_csvs_read_as_eager(tmp_path):
    path, settings = _with_compiled(tmp_path, 1.0, 1.0)
    assert [(s.key["compile"], s.key["amp"]) for s in settings] == [("default", "none"), ("none", "none")]
    assert [s.slug for s in settings] == ["cpu-fp32-b64-backbone-compile_default", "cpu-fp32-b64-backbone"]
    assert all(len(s.rows) == len(scaling_frame()) for s in settings)
    scaling_frame().to_csv(tmp_path / "old.csv", index=False)  # written before the regime columns
    (old,) = split_settings(*load_results(tmp_path / "old.csv"))
    assert (old.key["compile"], old.key["amp"], old.slug) == ("none", "none", "cuda0-fp32-b64-backbone")


def test_compiling_that_flips_the_verdict(tmp_path):
    # eager: Vim (0.05 L ms) never overtakes eager DeiT (0.02 L + 4e-6 L^2) below 7500 tokens; at 1024 px
    # (4097 tokens, the top res DeiT eager ran) Vim/DeiT = 0.0364/0.05 = 0.73. Compiled Vim at twice the speed:
    # faster from 1250 tokens (between 512 and 640 px), 1.46x at 1024 px.
    _, settings = _with_compiled(tmp_path, 1.0, 2.0)
    ((eager, comp),) = regimes.compile_pairs(settings)
    rows = {(r["vim"], r["deit"]): r for r in regimes.verdict_rows(eager, comp)}
    r = rows[("vim_tiny (triton)", "deit_tiny (eager)")]
    assert r["top_res"] == 1024 and r["ratio_eager"] == pytest.approx(0.0363880 / 0.05, rel=1e-4)
    assert r["ratio_compiled"] == pytest.approx(2 * 0.0363880 / 0.05, rel=1e-4)
    assert r["faster_eager"] == "none in range" and r["faster_compiled"].endswith("(between 512 and 640)")
    assert r["answer"].startswith("Yes: compiling both (default) changes the verdict")
    speed = {(s["model"], s["impl"], s["res"]): s for s in regimes.speedups(eager, comp)}
    assert speed[("vim_tiny", "triton", 224)]["speedup"] == pytest.approx(2.0)
    assert speed[("deit_tiny", "eager", 1024)]["speedup"] == pytest.approx(1.0)
    assert speed[("vim_tiny", "triton", 1248)]["compile_s"] == 12.5


def test_compiling_that_changes_nothing_says_no(tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "save", lambda fig, out_dir, stem: [])  # the text is under test
    path, settings = _with_compiled(tmp_path, 1.0, 1.0)
    ((eager, comp),) = regimes.compile_pairs(settings)
    r = {(r["vim"], r["deit"]): r for r in regimes.verdict_rows(eager, comp)}[("vim_tiny (triton)", "deit_tiny (sdpa)")]
    assert r["answer"].startswith("No: compiling both (default) leaves the verdict and the crossover")
    assert main(["report", str(path), "--out-dir", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Does compiling both contenders change the verdict?" in text
    assert "## Setting: CPU run: cpu | fp32 | batch 64 | backbone only | torch.compile default" in text
    assert "Claim check verdicts that compiling changes: none (CPU run: the claims are not measurable here)." in text
    assert "| vim_tiny | triton | 224 | 1.00 | 12.5 | 0 |" in text


def test_a_moved_crossover_is_reported(tmp_path):
    # Vim at 0.025 L ms eager overtakes eager DeiT (0.02 L + 4e-6 L^2) from 1250 tokens (between 512 and
    # 640 px); compiled at 0.0125 L ms it is faster from the first point on; faster at 1024 px in both.
    _, settings = _with_compiled(tmp_path, 2.0, 4.0)
    ((eager, comp),) = regimes.compile_pairs(settings)
    rows = {(r["vim"], r["deit"]): r for r in regimes.verdict_rows(eager, comp)}
    r = rows[("vim_tiny (triton)", "deit_tiny (eager)")]
    assert r["faster_eager"].endswith("(between 512 and 640)")
    assert r["faster_compiled"] == "at or below 224 px (first common point)"
    assert r["ratio_eager"] > 1 and r["ratio_compiled"] > 1
    assert r["answer"].startswith("The verdict holds but the crossover moved")
