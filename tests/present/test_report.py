"""`vimbench report`: the Markdown report, its sections on constructed data, and bad input."""
import pandas as pd
import pytest
from helpers_csv import kernel_frame, scaling_frame

from vimbench.present import figures as plotting
from vimbench.commands import main
from vimbench.rows.reader import load_results, split_settings


def test_report_command_writes_markdown_with_its_figures(tmp_path):
    scaling_frame().to_csv(tmp_path / "s.csv", index=False)
    assert main(["report", str(tmp_path / "s.csv"), "--out-dir", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    for fig in ("throughput_memory", "flops", "loglog"):
        assert f"]({fig}.png)" in text and (tmp_path / "rep" / f"{fig}.png").is_file()
    assert "| vim_tiny | triton | time | 1.00 [1.00, 1.00] (n=7) |" in text
    assert "heading toward 2" in text  # deit eager latency steepens in the synthetic data
    assert "| 1248 | 6085 | 84.1% |" in text  # attention share of DeiT FLOPs at 1248
    assert "| vim_tiny (triton) | deit_tiny (eager) | none in range |" in text
    assert "vimbench scaling --models vim_tiny,deit_tiny" in text and "CPU run" not in text


def test_cpu_run_is_labelled_and_not_judged(tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "save", lambda fig, out_dir, stem: [])  # the text is under test, not the figures
    scaling_frame(device="cpu").to_csv(tmp_path / "c.csv", index=False)
    assert main(["report", str(tmp_path / "c.csv"), "--out-dir", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert text.splitlines()[2].startswith("> **CPU run.**") and "Setting: **CPU run: cpu" in text


def test_claim_check_needs_both_tiny_models(tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "save", lambda fig, out_dir, stem: [])
    frame = scaling_frame()
    frame.loc[frame["model"] == "deit_tiny", "model"] = "deit_small"
    frame.to_csv(tmp_path / "s.csv", index=False)
    assert main(["report", str(tmp_path / "s.csv"), "--out-dir", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "this setting has no deit_tiny rows" in text and "| Vim/DeiT FPS at 512 |" not in text


@pytest.mark.parametrize("content,expected", [
    (None, "no such file"),
    ("", "is empty"),
    ("model,res,throughput_img_s\n", "has a header but no rows"),
    ("model,foo\nvim_tiny,1\n", "not a vimbench CSV"),
    ("drop:time_ms", "lacks column(s) time_ms"),
    ("all-oom", "no rows with status ok (21 oom)"),
    ("kernel", "is a kernels CSV; this needs a scaling or memory CSV"),
])
def test_bad_csv_exits_2_with_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.csv"
    if content == "drop:time_ms":
        scaling_frame().drop(columns=["time_ms"]).to_csv(path, index=False)
    elif content == "all-oom":
        scaling_frame().assign(status="oom").to_csv(path, index=False)
    elif content == "kernel":
        kernel_frame().to_csv(path, index=False)
    elif content is not None:
        path.write_text(content)
    assert main(["report", str(path), "--out-dir", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and err.startswith("vimbench report: error:")
    assert not (tmp_path / "rep" / "report.md").exists()


def test_memory_prediction_sections(tmp_path):
    """GPU rows: predicted vs measured peak per row with the error; the paper-setting prediction table."""
    from vimbench.present.report import memory_prediction_lines, paper_memory_lines
    df = scaling_frame()
    df.loc[(df.model == "vim_tiny") & (df.res == 224), "mem_pred_peak_gib"] *= 1.2  # one prediction 20% high
    df.to_csv(tmp_path / "s.csv", index=False)
    kind, df = load_results(tmp_path / "s.csv")
    lines = memory_prediction_lines(split_settings(kind, df)[0])
    row = next(line for line in lines if line.startswith("| vim_tiny | triton | 224 |"))
    assert "| +20.0% |" in row
    ok = int((df.status == "ok").sum())
    assert f"{ok - 1} of {ok} rows within 10% of the measured peak (largest error 20.0%)" in lines[-1]
    assert "vimbench memory --preset paper" in paper_memory_lines(None)[0]  # the report reads CSVs only


def test_report_reads_a_memory_csv_beside_the_scaling_csv(tmp_path):
    """The paper-setting memory table comes from a memory CSV given with the scaling CSV; errors are
    relative to the paper's value, and the paper's OOM stays OOM."""
    scaling_frame().to_csv(tmp_path / "s.csv", index=False)
    pd.DataFrame([dict(model="vim_tiny", impl="triton", kernel="triton", res=1248, tokens=6085, batch=64,
                       dtype="fp32", head=False, status="ok", mem_pred_peak_gib=5.57, mem_pred_reserved_gib=6.0,
                       mem_pred_used_gib=6.5, card="h100-80gb", fits=True, paper_gib=11.14),
                  dict(model="deit_tiny", impl="eager", kernel="eager", res=1248, tokens=6085, batch=64,
                       dtype="fp32", head=False, status="ok", mem_pred_peak_gib=40.0, mem_pred_reserved_gib=41.0,
                       mem_pred_used_gib=41.5, card="h100-80gb", fits=True, paper_gib=None)]
                 ).to_csv(tmp_path / "m.csv", index=False)
    assert main(["report", str(tmp_path / "s.csv"), str(tmp_path / "m.csv"), "--out-dir", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| vim_tiny | triton | triton | 1248 | 6085 | 11.14 | 5.57 | -50% | 6.50 | -42% | yes |" in text
    assert "| deit_tiny | eager | eager | 1248 | 6085 | OOM | 40.00 |  | 41.50 |  | yes |" in text
    assert "DeiT-Ti at 1248 (eager, batch 64): predicted 40.0 GiB peak" in text


def test_csvs_of_several_machines_make_one_report(tmp_path, monkeypatch):
    """Vim rows from one machine, DeiT rows from another: read as one, the same tables as one CSV of both,
    and a warning that the setting mixes devices."""
    monkeypatch.setattr(plotting, "save", lambda fig, out_dir, stem: [])
    frame = scaling_frame()
    frame.to_csv(tmp_path / "both.csv", index=False)
    frame[frame.model == "vim_tiny"].to_csv(tmp_path / "a.csv", index=False)
    deit = frame[frame.model == "deit_tiny"].assign(device_name="NVIDIA A100-SXM4-80GB", host="node7")
    deit.to_csv(tmp_path / "b.csv", index=False)
    assert main(["report", str(tmp_path / "both.csv"), "--out-dir", str(tmp_path / "one")]) == 0
    assert main(["report", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--out-dir", str(tmp_path / "two")]) == 0
    one, two = ((tmp_path / d / "report.md").read_text() for d in ("one", "two"))
    section = lambda text: text[text.index("## Scaling exponents"):text.index("## Environment")]  # noqa: E731
    assert MIXED in two and MIXED not in one
    assert section(two).replace(MIXED, "").replace(", NVIDIA A100-SXM4-80GB", "") == section(one)


MIXED = ("**Mixed devices:** this setting combines rows from NVIDIA H100 80GB HBM3, NVIDIA A100-SXM4-80GB; its "
         "curves and fits mix them. Report each device's CSVs separately to compare them.\n\n")


@pytest.mark.parametrize("workers,noted", [(1, False), (2, True)])
def test_concurrent_cpu_workers_are_flagged_as_no_measurement(tmp_path, monkeypatch, workers, noted):
    monkeypatch.setattr(plotting, "save", lambda fig, out_dir, stem: [])
    scaling_frame(device="cpu").assign(workers=workers, launcher="local").to_csv(tmp_path / "c.csv", index=False)
    assert main(["report", str(tmp_path / "c.csv"), "--out-dir", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert ("**Concurrent CPU workers:** up to 2 configurations ran at once" in text) == noted
    assert ("they are not measurements" in text) == noted


def test_train_rows_are_their_own_setting_with_ratios_against_inference(tmp_path, monkeypatch):
    """Train rows: 3x the latency of inference for Vim, 1.25x for DeiT, twice the memory. They are fitted on
    their own (Vim's exponent stays 1.00 over 7 points, not 14), get no claim check, and the training section
    gives the ratios at each common resolution."""
    monkeypatch.setattr(plotting, "save", lambda fig, out_dir, stem: [])
    infer = scaling_frame()
    train = infer.assign(mode="train")
    slow = train["model"].map({"vim_tiny": 3.0, "deit_tiny": 1.25})
    train = train.assign(time_ms=train["time_ms"] * slow, time_ms_p10=train["time_ms_p10"] * slow,
                         time_ms_p90=train["time_ms_p90"] * slow, throughput_img_s=train["throughput_img_s"] / slow,
                         mem_peak_gib=train["mem_peak_gib"] * 2)
    pd.concat([infer, train]).to_csv(tmp_path / "s.csv", index=False)
    assert main(["report", str(tmp_path / "s.csv"), "--out-dir", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert text.count("| vim_tiny | triton | time | 1.00 [1.00, 1.00] (n=7) |") == 2
    assert text.count("Claim check: Vim-Ti vs DeiT-Ti") == 1 and "Not applicable: the paper's claims" in text
    section = text.split("## Training against inference")[1].split("\n## ")[0]
    assert "| vim_tiny | triton | 512 | 0.33 | 2.00 |" in section
    assert "| deit_tiny | eager | 1024 | 0.80 | 2.00 |" in section and "| deit_tiny | eager | 1248 |" not in section
    assert "VMamba-T keeps 0.34" in section and "train step" in section
