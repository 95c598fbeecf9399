"""Paper-style figures drawn from result CSVs only (see ``vimbench.rows.reader``), never from live objects.

Figures of a scaling CSV (one set per setting: device, dtype, batch, head):
    throughput_memory  throughput (img/s, log y) and peak memory (GiB) vs resolution, one line per
                       (model, impl); bands from the p10/p90 latency; OOM/error runs as markers at the top
    flops              GFLOPs per image vs resolution, stacked scan / attention / rest per model, and the
                       share of scan or attention in percent
    loglog             latency, memory and GFLOPs vs tokens on log-log axes with fitted exponents and
                       slope-1 and slope-2 guides
Figure of a kernel CSV (one per setting: device, dtype, batch, width):
    kernels            time (ms) and peak memory (GiB) vs L per (op, impl), log-log, fitted exponents

Conventions: one colour per model (``model_color``, identical in every figure, deterministic for unknown
names), one colour per kernel op (``op_color``), one line style and marker per backend (``impl_style``).
FLOPs are 2 per multiply-add; the CSV's FLOP columns count one forward pass of ``batch`` images, so
figures divide them by ``batch``. Memory is
``mem_peak_gib``: torch's peak allocated on a GPU, peak added resident memory on a CPU. Each figure is
saved as PNG (300 dpi) and PDF.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory

from vimbench.analysis.fit import describe_fit, fit_sweep
from vimbench.rows.reader import Setting, split_settings

MODEL_COLORS = {"vim_tiny": "#1f77b4", "vim_small": "#17becf", "vim_base": "#2ca02c",
                "deit_tiny": "#d62728", "deit_small": "#ff7f0e", "deit_base": "#9467bd"}
OP_COLORS = {"scan": "#08519c", "scan_bidir": "#6baed6", "mixer_vim": "#31a354", "attention": "#a50f15",
             "block_deit": "#fd8d3c"}  # kernel ops: Vim's blue/green, DeiT's red/orange, apart from the model colours
_EXTRA_COLORS = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39",
                 "#7b4173", "#3182bd")
IMPL_STYLES = {"mamba_ssm": ("-", "o"), "triton": ("--", "s"), "cpu": ("-.", "^"), "ref": (":", "D"),
               "eager": ("-", "o"), "sdpa": ("--", "s"), "flash": ("-.", "^"), "efficient": (":", "v"),
               "math": ((0, (5, 1, 1, 1)), "P"), "cudnn": ((0, (1, 1)), "X")}
_EXTRA_STYLES = (((0, (3, 1, 1, 1, 1, 1)), "*"), ((0, (8, 2)), "h"), ((0, (2, 2)), "p"), ((0, (4, 1, 1, 1)), "<"))
RC = {"font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
      "legend.fontsize": 8.5, "figure.titlesize": 11.5, "axes.grid": True, "grid.alpha": 0.3, "lines.linewidth": 1.6,
      "lines.markersize": 5, "pdf.fonttype": 42}
FAIL_MARKERS = {"oom": ("v", "OOM"), "error": ("X", "error")}
_GUIDE = dict(color="0.45", lw=1.0, ls=(0, (6, 3)), zorder=1)


def _styled(fn):
    """Run a figure function (drawing and saving) under the project's rc settings ``RC``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)
    return wrapper


def _pick(name: str, options: tuple):
    return options[int(hashlib.sha1(str(name).encode()).hexdigest(), 16) % len(options)]


def model_color(model: str) -> str:
    """The colour of ``model`` in every figure: fixed for the built-in models, else picked by a hash of
    the name (stable across runs and machines)."""
    return MODEL_COLORS.get(model) or _pick(model, _EXTRA_COLORS)


def op_color(op: str) -> str:
    """The colour of a kernel op (fixed for the ops of ``vimbench kernels``, hashed for others)."""
    return OP_COLORS.get(op) or _pick(op, _EXTRA_COLORS)


def impl_style(impl: str) -> dict:
    """Line style and marker of a backend (fixed for the known ones, hashed for others)."""
    ls, marker = IMPL_STYLES.get(impl) or _pick(impl, _EXTRA_STYLES)
    return {"linestyle": ls, "marker": marker}


def setting_title(s: Setting) -> str:
    """The title line of a figure: "CPU run" first on a CPU, then device name, dtype, batch, head."""
    rows = s.rows
    names = [n for n in rows.get("device_name", pd.Series(dtype=str)).dropna().astype(str).unique() if n]
    device = ", ".join(names) or str(s.key["device"])
    parts = [f"CPU run: {device}" if s.is_cpu else device, str(s.key["dtype"]), f"batch {s.batch}"]
    if "head" in s.key:
        parts.append("with classifier head" if s.key["head"] else "backbone only")
    if "width" in s.key:
        parts.append(f"width {int(s.key['width'])}")
    if s.key.get("mode", "infer") == "train":
        parts.append("train step" + (", activation checkpointing" if s.key.get("grad_checkpointing") else ""))
    if s.key.get("compile", "none") != "none" or s.key.get("amp", "none") != "none":
        parts.append(regime_title(s.key))
    return " | ".join(parts)


def regime_title(key: dict) -> str:
    """The regime of a setting in words: "eager" or "torch.compile <mode>", then "autocast <dtype>" if any."""
    mode, amp = key.get("compile", "none"), key.get("amp", "none")
    return ("eager" if mode == "none" else f"torch.compile {mode}") + ("" if amp == "none" else f", autocast {amp}")


def memory_label(s: Setting) -> str:
    return "peak added RSS (GiB)" if s.is_cpu else "peak allocated memory (GiB)"


@_styled
def save(fig: Figure, out_dir, stem: str) -> list[Path]:
    """Write ``stem``.png (300 dpi) and ``stem``.pdf under ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=300)
    fig.savefig(paths[1])
    return paths


def plot_results(kind: str, df: pd.DataFrame, out_dir) -> list[Path]:
    """Every figure of a checked CSV (see ``vimbench.rows.reader.load_results``), one set per setting. File
    stems are the figure names, suffixed with the setting's slug when the CSV holds several settings."""
    settings = split_settings(kind, df)
    makers = SCALING_FIGURES if kind == "scaling" else KERNEL_FIGURES
    paths = []
    for s in settings:
        if not (s.rows["status"] == "ok").any():
            continue
        for name, make in makers.items():
            stem = name if len(settings) == 1 else f"{name}-{s.slug}"
            paths += save(make(s), out_dir, stem)
    return paths


def _figure(ncols: int, width: float, s: Setting) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, 4.3), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.suptitle(setting_title(s))
    return fig, list(axes)


def _curves(rows: pd.DataFrame, by: tuple[str, ...]):
    """(key, ok rows sorted by the x column) per group, in a stable order (Vim first, then by name)."""
    ok = rows[rows["status"] == "ok"]
    order = sorted(ok.groupby(list(by)).groups, key=lambda k: (not str(k[0]).startswith("vim"), k))
    return [(k, ok.groupby(list(by)).get_group(k)) for k in order]


def mark_failures(ax, failed: pd.DataFrame, x: str, color_of) -> None:
    """Draw each failed run (status oom or error) as a marker at the top of ``ax`` at its x, stacked when
    several fail at one x, with one "OOM"/"error" label per x. Markers carry gid "oom"/"error" and
    labels gid "fail-label". Leaves headroom above the data so no marker hides a curve."""
    failed = failed[failed["status"].isin(list(FAIL_MARKERS))]
    if failed.empty:
        return
    tr = blended_transform_factory(ax.transData, ax.transAxes)
    for xv, group in failed.groupby(x, sort=True):
        for j, (_, row) in enumerate(group.iterrows()):
            marker, _ = FAIL_MARKERS[row["status"]]
            ax.plot([xv], [0.95 - 0.05 * j], transform=tr, marker=marker, ls="none", ms=7, clip_on=False,
                    color=color_of(row), markeredgecolor="black", markeredgewidth=0.6, gid=row["status"], zorder=5)
        label = "/".join(FAIL_MARKERS[st][1] for st in sorted(group["status"].unique()))
        ax.annotate(label, xy=(xv, 0.95), xycoords=tr, xytext=(0, 6), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8, fontweight="bold", gid="fail-label", annotation_clip=False)
    lo, hi = ax.get_ylim()
    depth = 0.05 * failed.groupby(x).size().max() + 0.1
    if ax.get_yscale() == "log":
        ax.set_ylim(lo, lo * (hi / lo) ** (1 / (1 - depth)))
    else:
        ax.set_ylim(lo, lo + (hi - lo) / (1 - depth))


def _fail_legend_handles(rows: pd.DataFrame) -> list:
    return [Line2D([], [], marker=m, ls="none", color="0.5", markeredgecolor="black", label=f"{label} (marker at top)")
            for st, (m, label) in FAIL_MARKERS.items() if (rows["status"] == st).any()]


@_styled
def fig_throughput_memory(s: Setting) -> Figure:
    """Fig. 1 style: throughput (img/s, log y; band = batch / latency p90..p10) and peak memory (GiB)
    against resolution, one line per (model, impl); failed runs as markers at the top."""
    fig, (ax_t, ax_m) = _figure(2, 11.5, s)
    for (model, impl), c in _curves(s.rows, ("model", "impl")):
        style = dict(color=model_color(model), **impl_style(impl))
        label = f"{model} ({impl})"
        ax_t.plot(c["res"], c["throughput_img_s"], label=label, **style)
        band = c.dropna(subset=["time_ms_p10", "time_ms_p90"])
        ax_t.fill_between(band["res"], band["batch"] * 1e3 / band["time_ms_p90"],
                          band["batch"] * 1e3 / band["time_ms_p10"], color=style["color"], alpha=0.15, lw=0)
        mem = c.dropna(subset=["mem_peak_gib"])
        ax_m.plot(mem["res"], mem["mem_peak_gib"], label=label, **style)
        for _, r in mem[mem["batch"] != s.batch].iterrows():  # ran at a smaller batch after an OOM
            ax_m.annotate(f"b={int(r['batch'])}", xy=(r["res"], r["mem_peak_gib"]), xytext=(4, -10),
                          textcoords="offset points", fontsize=7.5, color=style["color"], gid="batch-note")
    ax_t.set_yscale("log")
    color_of = lambda row: model_color(row["model"])  # noqa: E731
    failed = s.rows[s.rows["status"] != "ok"]
    for ax in (ax_t, ax_m):
        mark_failures(ax, failed, "res", color_of)
        ax.set_xlabel("resolution (px, square image)")
    ax_t.set_ylabel("throughput (img/s, log scale)")
    ax_t.set_title("throughput (band: p10-p90)")
    ax_m.set_ylabel(memory_label(s))
    ax_m.set_title("peak memory")
    ax_m.set_ylim(bottom=0)
    handles, labels = ax_t.get_legend_handles_labels()
    extra = _fail_legend_handles(s.rows)
    fig.legend(handles + extra, labels + [h.get_label() for h in extra], loc="outside right upper")
    return fig


def _flops_per_model(rows: pd.DataFrame) -> pd.DataFrame:
    """GFLOPs per image by (model, res), one row each (FLOPs do not depend on the backend; failed rows
    keep them)."""
    cols = ["flops_total", "flops_scan", "flops_attention", "flops_linear", "flops_other"]
    f = rows.dropna(subset=["flops_total"]).drop_duplicates(["model", "res"]).copy()
    for col in cols:
        f[col] = f[col].fillna(0) / f["batch"] / 1e9
    f["rest"] = f["flops_linear"] + f["flops_other"]
    return f.sort_values(["model", "res"])


@_styled
def fig_flops(s: Setting) -> Figure:
    """GFLOPs per image vs resolution as grouped bars per model (stacked: scan, attention, rest = linear
    + other), and the percentage of each model's FLOPs spent in the scan or in attention."""
    fig, (ax_b, ax_s) = _figure(2, 12.0, s)
    f = _flops_per_model(s.rows)
    models = sorted(f["model"].unique(), key=lambda m: (not m.startswith("vim"), m))
    res = sorted(f["res"].unique())
    pos = {r: i for i, r in enumerate(res)}
    width = 0.8 / len(models)
    parts = (("flops_scan", "scan", "////", 1.0), ("flops_attention", "attention", "xxx", 1.0),
             ("rest", "rest (linear + other)", None, 0.45))
    for m_i, model in enumerate(models):
        g = f[f["model"] == model]
        x = np.array([pos[r] for r in g["res"]]) - 0.4 + width * (m_i + 0.5)
        bottom = np.zeros(len(g))
        for col, _, hatch, alpha in parts:
            ax_b.bar(x, g[col], width, bottom=bottom, color=model_color(model), alpha=alpha, hatch=hatch,
                     edgecolor="white", linewidth=0.5)
            bottom += g[col].to_numpy()
        for col, ls in (("flops_scan", "-"), ("flops_attention", "--")):
            share = 100 * g[col] / g["flops_total"]
            if (share > 0).any():
                ax_s.plot(g["res"], share, color=model_color(model), ls=ls, marker="o",
                          label=f"{model}: {'scan' if col == 'flops_scan' else 'attention'}")
    ax_b.set_xticks(range(len(res)), [str(int(r)) for r in res], rotation=45 if len(res) > 8 else 0)
    ax_b.set_xlabel("resolution (px)")
    ax_b.set_ylabel("GFLOPs per image (2 per multiply-add)")
    ax_b.set_title("FLOPs by part")
    ax_b.grid(axis="x", visible=False)
    ax_b.legend(handles=[Patch(facecolor=model_color(m), label=m) for m in models]
                + [Patch(facecolor="0.6", alpha=a, hatch=h, edgecolor="white", label=lab) for _, lab, h, a in parts],
                loc="upper left")
    ax_s.set_xlabel("resolution (px)")
    ax_s.set_ylabel("share of total FLOPs (%)")
    ax_s.set_title("scan or attention share")
    ax_s.set_ylim(0, 100)
    if ax_s.lines:
        ax_s.legend(loc="best")
    return fig


def slope_guides(ax, x: np.ndarray, y_anchor: float, label_x: str) -> None:
    """Dashed guide lines of slope 1 and 2 on log-log axes, starting at (min x, ``y_anchor``)."""
    x0, x1 = float(np.min(x)), float(np.max(x))
    for k in (1, 2):
        ax.plot([x0, x1], [y_anchor, y_anchor * (x1 / x0) ** k], **_GUIDE, gid=f"guide-{k}")
        ax.annotate(f"∝ {label_x}" + ("²" if k == 2 else ""), xy=(x1, y_anchor * (x1 / x0) ** k),
                    xytext=(3, 0), textcoords="offset points", fontsize=8, color="0.35", va="center")


def _fit_label(x, y) -> str:
    """"k = whole | upper half" for a curve, or "" when it has fewer than two distinct points."""
    whole, upper = fit_sweep(x, y)
    return "" if whole is None else f"{describe_fit(whole, ci=False)} | {describe_fit(upper, ci=False)}"


def _loglog_panel(ax, curves, x: str, y: str, color_of, style_of) -> None:
    """One line per curve with its fitted exponents written at its last point, plus slope guides."""
    xs, anchors = [], []
    for i, (key, c) in enumerate(curves):
        c = c.dropna(subset=[y])
        c = c[c[y] > 0]
        if c.empty:
            continue
        ax.plot(c[x], c[y], color=color_of(key), **style_of(key), label=" ".join(map(str, key)))
        text = _fit_label(c[x], c[y])
        if text:
            ax.annotate(text, xy=(c[x].iloc[-1], c[y].iloc[-1]), xytext=(4, 9 * (i % 3) - 9),
                        textcoords="offset points", fontsize=7.5, color=color_of(key), gid="slope")
        xs.append(c[x].to_numpy())
        anchors.append(c[y].iloc[0])
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers at 1, 2, 5 x 10^n; no crowded minor labels
        axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    if xs:
        slope_guides(ax, np.concatenate(xs), min(anchors) / 2, "tokens")


@_styled
def fig_loglog(s: Setting) -> Figure:
    """Latency (ms per batch), memory (GiB) and GFLOPs per image against tokens on log-log axes; each
    line carries its fitted exponent k (whole sweep | upper half), guides show slopes 1 and 2. Latency and
    memory use only the runs at the setting's batch."""
    fig, axes = _figure(3, 15.0, s)
    # runs retried at a smaller batch after an OOM appear in Fig. 1 only
    curves = _curves(s.rows[s.rows["batch"] == s.batch], ("model", "impl"))
    color_of = lambda key: model_color(key[0])  # noqa: E731
    style_of = lambda key: impl_style(key[1])  # noqa: E731
    _loglog_panel(axes[0], curves, "tokens", "time_ms", color_of, style_of)
    _loglog_panel(axes[1], curves, "tokens", "mem_peak_gib", color_of, style_of)
    f = _flops_per_model(s.rows)
    _loglog_panel(axes[2], [((m,), g) for m, g in f.groupby("model")], "tokens", "flops_total",
                  color_of, lambda key: {"linestyle": "-", "marker": "o"})
    for ax, ylabel, title in zip(axes, ("latency (ms per batch, median)", memory_label(s), "GFLOPs per image"),
                                 ("latency", "memory", "FLOPs (all backends)")):
        ax.set_xlabel("tokens L (incl. cls)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}; fitted k: whole | upper half")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper")
    return fig


@_styled
def fig_kernels(s: Setting) -> Figure:
    """Kernel sweep: time (ms, median; band p10-p90) and peak memory (GiB) against sequence length (tokens) per
    (op, impl), log-log, with fitted exponents and slope guides; failed runs marked at the top."""
    fig, (ax_t, ax_m) = _figure(2, 12.0, s)
    curves = _curves(s.rows, ("op", "impl"))
    color_of = lambda key: op_color(key[0])  # noqa: E731
    style_of = lambda key: impl_style(key[1])  # noqa: E731
    _loglog_panel(ax_t, curves, "tokens", "time_ms", color_of, style_of)
    for key, c in curves:
        band = c.dropna(subset=["time_ms_p10", "time_ms_p90"])
        ax_t.fill_between(band["tokens"], band["time_ms_p10"], band["time_ms_p90"], color=color_of(key),
                          alpha=0.15, lw=0)
    _loglog_panel(ax_m, curves, "tokens", "mem_peak_gib", color_of, style_of)
    failed = s.rows[s.rows["status"] != "ok"]
    for ax in (ax_t, ax_m):
        mark_failures(ax, failed, "tokens", lambda row: op_color(row["op"]))
        ax.set_xlabel("sequence length (tokens)")
    ax_t.set_ylabel("time (ms, median)")
    ax_t.set_title("time; fitted k: whole | upper half")
    ax_m.set_ylabel(memory_label(s))
    ax_m.set_title("peak memory; fitted k: whole | upper half")
    handles, labels = ax_t.get_legend_handles_labels()
    extra = _fail_legend_handles(s.rows)
    fig.legend(handles + extra, labels + [h.get_label() for h in extra], loc="outside right upper")
    return fig


SCALING_FIGURES = {"throughput_memory": fig_throughput_memory, "flops": fig_flops, "loglog": fig_loglog}
KERNEL_FIGURES = {"kernels": fig_kernels}
