"""`vimbench plot` and the figures: files written, OOM/error markers drawn, colours fixed per model."""
import struct

import pandas as pd
import pytest
from helpers_csv import kernel_frame, scaling_frame

from vimbench.present import figures as plotting
from vimbench.commands import main
from vimbench.present.figures import fig_kernels, fig_loglog, fig_throughput_memory, model_color, op_color
from vimbench.rows.reader import load_results, split_settings


def _setting(tmp_path, frame, name="r.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    kind, df = load_results(path)
    return kind, split_settings(kind, df)


def _fail_markers(ax, gid):
    return [ln for ln in ax.lines if ln.get_gid() == gid]


def test_plot_command_writes_png_at_300_dpi_and_pdf(tmp_path):
    scaling_frame().to_csv(tmp_path / "s.csv", index=False)
    kernel_frame().to_csv(tmp_path / "k.csv", index=False)
    assert main(["plot", str(tmp_path / "s.csv"), "--out-dir", str(tmp_path / "figs")]) == 0
    assert main(["plot", str(tmp_path / "k.csv"), "--out-dir", str(tmp_path / "figs")]) == 0
    for stem in ("throughput_memory", "flops", "loglog", "kernels"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "figs" / f"{stem}.{ext}").stat().st_size > 10_000
    png = (tmp_path / "figs" / "throughput_memory.png").read_bytes()
    width = struct.unpack(">I", png[16:20])[0]
    assert width == pytest.approx(11.5 * 300, abs=2)  # 11.5 in wide at 300 dpi


def test_oom_and_error_runs_are_marked_at_the_top(tmp_path):
    _, (s,) = _setting(tmp_path, scaling_frame())
    fig = fig_throughput_memory(s)
    for ax in fig.axes:
        (oom,) = _fail_markers(ax, "oom")  # deit_tiny eager at 1248
        (err,) = _fail_markers(ax, "error")  # deit_tiny sdpa at 224
        assert list(oom.get_xdata()) == [1248] and list(err.get_xdata()) == [224]
        display = oom.get_transform().transform((1248, oom.get_ydata()[0]))
        assert ax.transAxes.inverted().transform(display)[1] > 0.8  # at the top of the panel, whatever the y data
        assert oom.get_color() == model_color("deit_tiny")
        labels = {t.get_text(): t.xy[0] for t in ax.texts if t.get_gid() == "fail-label"}
        assert labels == {"OOM": 1248, "error": 224}
        top = max(max(ln.get_ydata()) for ln in ax.lines if ln.get_gid() is None and len(ln.get_xdata()))
        top_frac = ax.transAxes.inverted().transform(ax.transData.transform((1248, top)))[1]
        assert top_frac < 0.86  # headroom: no curve runs under the markers
    assert "OOM (marker at top)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_one_colour_per_model_across_figures(tmp_path):
    _, (s,) = _setting(tmp_path, scaling_frame())
    for fig in (fig_throughput_memory(s), fig_loglog(s)):
        for ax in fig.axes:
            for line in ax.lines:
                label = line.get_label()
                if label.startswith(("vim_tiny", "deit_tiny")):
                    assert line.get_color() == model_color(label.split()[0])
    assert model_color("some_new_model") in plotting._EXTRA_COLORS  # an unknown model never takes a built-in colour
    assert model_color("some_new_model") not in plotting.MODEL_COLORS.values()


def test_loglog_writes_fitted_slopes_and_guides(tmp_path):
    _, (s,) = _setting(tmp_path, scaling_frame())
    fig = fig_loglog(s)
    latency = fig.axes[0]
    assert latency.get_xscale() == latency.get_yscale() == "log"
    assert {ln.get_gid() for ln in latency.lines} >= {"guide-1", "guide-2"}
    slopes = [t.get_text() for t in latency.texts if t.get_gid() == "slope"]
    assert "1.00 | 1.00" in slopes and len(slopes) == 3  # vim latency is exactly linear in the synthetic data


def test_cpu_run_is_labelled(tmp_path):
    _, (s,) = _setting(tmp_path, scaling_frame(device="cpu"))
    assert fig_throughput_memory(s)._suptitle.get_text().startswith("CPU run")


def test_several_settings_get_one_figure_set_each(tmp_path, monkeypatch):
    saved = []  # record what would be saved instead of rendering 6 figures at 300 dpi
    monkeypatch.setattr(plotting, "save",
                        lambda fig, out_dir, stem: saved.append((stem, fig._suptitle.get_text())) or [])
    frame = pd.concat([scaling_frame(), scaling_frame().assign(dtype="bf16")])
    frame.to_csv(tmp_path / "two.csv", index=False)
    assert main(["plot", str(tmp_path / "two.csv"), "--out-dir", str(tmp_path / "figs")]) == 0
    title = "NVIDIA H100 80GB HBM3 | {} | batch 64 | backbone only"
    assert sorted(saved) == sorted((f"{fig}-cuda0-{dt}-b64-backbone", title.format(dt))
                                   for fig in ("throughput_memory", "flops", "loglog") for dt in ("fp32", "bf16"))


def test_kernel_figure_marks_oom_and_fits(tmp_path):
    _, (s,) = _setting(tmp_path, kernel_frame())
    ax_t, _ = fig_kernels(s).axes[:2]
    assert [list(ln.get_xdata()) for ln in _fail_markers(ax_t, "oom")] == [[16384]]
    assert sorted(t.get_text() for t in ax_t.texts if t.get_gid() == "slope") == ["1.00 | 1.00", "2.00 | 2.00"]
    colors = {ln.get_label(): ln.get_color() for ln in ax_t.lines if ln.get_gid() is None}
    assert colors == {"scan triton": op_color("scan"), "attention eager": op_color("attention")}
    assert len(set(plotting.OP_COLORS.values()) | set(plotting.MODEL_COLORS.values())) == 11  # all distinct
