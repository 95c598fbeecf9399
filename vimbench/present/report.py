"""A Markdown report of a scaling CSV: exponents, FLOP shares, crossovers and the check of the paper's claim.

Everything is computed from the CSV (see ``vimbench.rows.reader``); the figures it embeds are written next to
it by ``vimbench.present.figures`` and referenced by relative path.

Claim check. The paper's Fig. 1 numbers (``vimbench.analysis.paper``) are compared as Vim/DeiT *ratios* (FPS ratio,
memory ratio) at the same patch grid (res // 16, so a sweep point at 736 px stands for the paper's 738 px),
once against eager DeiT and once against fused-attention DeiT (the fastest of sdpa/flash/efficient/cudnn at
each resolution). A claim is *reproduced* when the measured ratio is within a factor ``1 + TOLERANCE`` of
the paper's ratio, either way. TOLERANCE = 0.25 because (1) the paper's FPS are read back from a log10
plot, about +-0.02 decade per value, i.e. about +-10% on a ratio of two values; (2) the paper does not
state its GPU, batch, dtype or memory definition, and a different GPU and software stack shift the
relative speed of a scan kernel and of GEMM-bound attention by 10-20%; (3) run-to-run spread (p10-p90)
adds a few percent. Memory ratios use the column closest to what the paper most likely read (nvidia-smi):
``mem_nvml_gib``, else ``mem_reserved_gib``, else ``mem_peak_gib``, the first that both rows have.
Not measurable: a CPU run (the claim is about GPU batch inference), a resolution outside the sweep, or a
side that failed (OOM/error) at that resolution.

Regimes. Each (compile, amp) regime of the CSV is its own setting, with its own exponents, crossovers and
claim check. "Does compiling both contenders change the verdict?" pairs each compiled setting with its
eager twin (``vimbench.analysis.regimes``): the crossovers and the Vim/DeiT ratio at the top of the sweep
in both, the claim verdicts that differ, and what compiling did to each model's speed.

Training. Train-step rows (mode train) are their own settings, with their own exponents and crossovers
(never fitted with inference rows); the claim check applies to inference settings only (the paper's claims
are about inference). "Training against inference" pairs each train setting with its inference twin
(``vimbench.analysis.training``): per model and backend the train/infer throughput and memory ratios at
each resolution both measured, beside VMamba's published train/infer throughput ratios.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from vimbench.analysis import paper
from vimbench.analysis import regimes, training
from vimbench.analysis.crossovers import crossover_cell
from vimbench.analysis.fit import describe_fit, fit_sweep
from vimbench.present.figures import plot_results, setting_title
from vimbench.rows.reader import Setting, split_settings

TOLERANCE = 0.25
EXPONENT_SLACK = 0.05  # |k - expected| this small reads as "consistent" even outside a narrow CI
FUSED_ATTENTION = ("sdpa", "flash", "efficient", "cudnn")  # "math" materialises softmax(QK^T) like eager
VIM_IMPL_PREFERENCE = ("mamba_ssm", "triton", "cpp", "cpu", "ref")  # the official kernel first, then ours
METRICS = (("time", "time_ms"), ("memory", "mem_peak_gib"), ("FLOPs", "flops_total"))
CLAIM_MEMORY_COLUMNS = ("mem_nvml_gib", "mem_reserved_gib", "mem_peak_gib")
ENV_COLUMNS = ("device_name", "driver_version", "cuda_version", "torch_version", "triton_version", "timm_version",
               "vimbench_version", "git_commit", "cpu_model", "threads", "tf32", "cudnn_benchmark")
ENV_RANGES = (("sm_clock_mhz", "MHz"), ("temperature_c", "°C"), ("power_w", "W"))


def expected_exponent(family: str, impl: str, metric: str) -> float | None:
    """The asymptotic exponent in tokens that theory predicts: Vim is linear in everything; DeiT's FLOPs
    and latency go to 2 (attention's L^2 work); its memory goes to 2 with eager (or math) attention,
    which materialises the L x L matrix, and stays 1 with fused attention. None for other families."""
    if family == "vim":
        return 1.0
    if family == "deit":
        return 1.0 if (metric == "memory" and impl in FUSED_ATTENTION) else 2.0
    return None


def reading(expected: float | None, whole, upper) -> str:
    """A phrase comparing fitted exponents with the expected one, from the data. It judges the upper-half
    fit when that has a CI (n >= 3), else the whole-sweep fit: "consistent with E" (E inside the 95% CI,
    or k within ``EXPONENT_SLACK`` of E: noise-free FLOP counts have a CI of width ~0),
    "heading toward 2" (between 1 and 2 and steeper in the upper half than over the whole sweep), above or
    below E, or "too noisy"/"too few points" when the CI is wider than 1 or missing."""
    if expected is None or whole is None:
        return ""
    use_upper = upper is not None and upper.n >= 3
    f, part = (upper, "upper half") if use_upper else (whole, "whole sweep")
    if math.isnan(f.k_lo):
        return f"too few points to judge (n={f.n})"
    if f.k_hi - f.k_lo > 1:
        return f"too noisy to judge ({part} CI [{f.k_lo:.2f}, {f.k_hi:.2f}])"
    if f.contains(expected) or abs(f.k - expected) <= EXPONENT_SLACK:
        return f"consistent with {expected:g} ({part})"
    if expected == 2 and use_upper and 1 < upper.k < 2 and upper.k > whole.k:
        return f"heading toward 2 (steepens from {whole.k:.2f} to {upper.k:.2f}), not there yet"
    return f"{'below' if f.k < expected else 'above'} the expected {expected:g} ({part} k={f.k:.2f})"


def exponent_table(s: Setting) -> list[str]:
    """Exponents of latency and memory (runs at the setting's batch) and of FLOPs per image (all rows)."""
    rows = s.rows
    ok = rows[(rows["status"] == "ok") & (rows["batch"] == s.batch)]
    out = ["| model | impl | metric | k, whole sweep [95% CI] | k, upper half [95% CI] | expected | reading |",
           "|---|---|---|---|---|---|---|"]
    for (model, impl), g in sorted(ok.groupby(["model", "impl"]), key=lambda kv: _model_order(kv[0][0]) + kv[0]):
        family = str(g["family"].iloc[0])
        for name, col in METRICS:
            src = rows[(rows["model"] == model) & (rows["impl"] == impl)] if name == "FLOPs" else g
            src = src.drop_duplicates("tokens")
            y = src[col] / src["batch"] if name == "FLOPs" else src[col]
            whole, upper = fit_sweep(src["tokens"], y)
            exp = expected_exponent(family, impl, name)
            out.append(f"| {model} | {impl} | {name} | {describe_fit(whole)} | {describe_fit(upper)} | "
                       f"{'' if exp is None else f'{exp:g}'} | {reading(exp, whole, upper)} |")
    return out


def _model_order(model: str) -> tuple:
    return (not str(model).startswith("vim"),)


def attention_share_table(s: Setting) -> list[str]:
    """Percentage of each DeiT model's FLOPs spent in attention (QK^T and AV) per resolution."""
    deit = s.rows[(s.rows["family"] == "deit")].dropna(subset=["flops_total"]).drop_duplicates(["model", "res"])
    if deit.empty:
        return ["No DeiT rows in this setting."]
    models = sorted(deit["model"].unique())
    out = ["| res (px) | tokens | " + " | ".join(f"{m} attention share" for m in models) + " |",
           "|---|---|" + "---|" * len(models)]
    for res, g in deit.groupby("res"):
        cells = []
        for m in models:
            r = g[g["model"] == m]
            cells.append(f"{100 * r['flops_attention'].iloc[0] / r['flops_total'].iloc[0]:.1f}%" if len(r) else "")
        out.append(f"| {int(res)} | {int(g['tokens'].iloc[0])} | " + " | ".join(cells) + " |")
    return out


def vim_impl(rows: pd.DataFrame, model: str) -> str | None:
    """The Vim backend the comparisons use: the first of ``VIM_IMPL_PREFERENCE`` with an ok row, else
    the alphabetically first one."""
    impls = set(rows[(rows["model"] == model) & (rows["status"] == "ok")]["impl"])
    ranked = [i for i in VIM_IMPL_PREFERENCE if i in impls] + sorted(impls - set(VIM_IMPL_PREFERENCE))
    return ranked[0] if ranked else None


def _ok(rows, model, impl, batch=None) -> pd.DataFrame:
    """Ok rows of (model, impl) indexed by res; only those that ran at ``batch`` if given."""
    r = rows[(rows["model"] == model) & (rows["impl"] == impl) & (rows["status"] == "ok")]
    if batch is not None:
        r = r[r["batch"] == batch]
    return r.drop_duplicates("res").set_index("res").sort_index()


def crossover_lines(s: Setting) -> list[str]:
    """Where each Vim model becomes faster (throughput) and lighter (peak memory) than each backend of
    the DeiT model of the same size. Throughput is per image, so runs retried at a smaller batch after an
    OOM count; memory compares only runs at the setting's batch."""
    rows = s.rows
    out = ["| Vim | DeiT | faster from | lighter from | DeiT failed at |", "|---|---|---|---|---|"]
    for vim_model in sorted(m for m in rows["model"].unique() if str(m).startswith("vim_")):
        deit_model = "deit_" + vim_model[len("vim_"):]
        if deit_model not in set(rows["model"]):
            continue
        ok_impls = set(rows[(rows["model"] == vim_model) & (rows["status"] == "ok")]["impl"])
        pairs = [(v, d) for v in VIM_IMPL_PREFERENCE + tuple(sorted(ok_impls - set(VIM_IMPL_PREFERENCE)))
                 if v in ok_impls for d in sorted(rows[rows["model"] == deit_model]["impl"].unique())]
        for v_impl, d_impl in pairs:  # every Vim backend: a slower scan moves the crossover, and that shows
            failed = rows[(rows["model"] == deit_model) & (rows["impl"] == d_impl) & (rows["status"] != "ok")]
            fail = ", ".join(f"{int(r)} ({st})" for r, st in zip(failed["res"], failed["status"])) or "-"
            cells = []
            for col, lower, batch in (("throughput_img_s", False, None), ("mem_peak_gib", True, s.batch)):
                v, d = _ok(rows, vim_model, v_impl, batch), _ok(rows, deit_model, d_impl, batch)
                cells.append(crossover_cell(v[col], d[col], lower, " px"))
            out.append(f"| {vim_model} ({v_impl}) | {deit_model} ({d_impl}) | {cells[0]} | {cells[1]} | {fail} |")
    if len(out) == 2:
        return ["No Vim/DeiT pair of the same size in this setting."]
    return out + ["", "Crossover: the resolution from which Vim stays better through the end of the sweep, with "
                  "log(Vim/DeiT) interpolated linearly in log(resolution) between the two bracketing points; "
                  "\"at or below\" means Vim is already better at the first common point. Only resolutions "
                  "where both ran are compared."]


def verdict(paper_ratio: float, measured: float) -> str:
    """"reproduced" when ``measured`` is within a factor 1 + TOLERANCE of ``paper_ratio`` (either way),
    else "not reproduced", saying whether the measured ratio at least lies on the same side of 1."""
    if abs(math.log(measured / paper_ratio)) <= math.log1p(TOLERANCE):
        return "reproduced"
    if paper_ratio == 1:
        return "not reproduced (not on par)"
    same = (measured > 1) == (paper_ratio > 1)
    return "not reproduced (" + ("same direction, different size" if same else "opposite direction") + ")"


def _at_grid(rows: pd.DataFrame, res: int) -> pd.DataFrame:
    return rows[rows["res"] // paper.PATCH == res // paper.PATCH]


def _claim_memory(v: pd.Series, d: pd.Series) -> tuple[float, str] | tuple[None, None]:
    for col in CLAIM_MEMORY_COLUMNS:
        if col in v.index and pd.notna(v.get(col)) and pd.notna(d.get(col)) and v[col] > 0 and d[col] > 0:
            return v[col] / d[col], col
    return None, None


def _fused_best(rows: pd.DataFrame) -> pd.Series | None:
    ok = rows[(rows["status"] == "ok") & rows["impl"].isin(FUSED_ATTENTION)]
    return ok.loc[ok["throughput_img_s"].idxmax()] if len(ok) else None


def claim_check(s: Setting, vim_model="vim_tiny", deit_model="deit_tiny") -> dict[str, list[dict]]:
    """Rows of the claim check, {"eager": [...], "fused": [...]}. Each row: claim, source, res (the
    measured resolution or ""), paper (Vim/DeiT ratio, or "OOM"), measured (ratio text), verdict."""
    rows = s.rows
    v_impl = vim_impl(rows, vim_model)
    out = {}
    for baseline in ("eager", "fused"):
        table = []
        for p in paper.FIG1:
            vr = _at_grid(rows[(rows["model"] == vim_model) & (rows["impl"] == v_impl)], p.res)
            deit = _at_grid(rows[rows["model"] == deit_model], p.res)
            deit = deit[deit["impl"] == "eager"] if baseline == "eager" else deit[deit["impl"].isin(FUSED_ATTENTION)]
            v = vr[vr["status"] == "ok"].iloc[0] if (vr["status"] == "ok").any() else None
            d = (deit[deit["status"] == "ok"].iloc[0] if (deit["status"] == "ok").any() else None) \
                if baseline == "eager" else _fused_best(deit)
            headline = p.res == paper.HEADLINE_RES
            claims = [("speed", "Vim/DeiT FPS", "abstract: 2.8x faster" if headline else "Fig. 1b",
                       paper.HEADLINE_SPEEDUP if headline else p.vim_fps / p.deit_fps)]
            if p.deit_gb is None:
                claims += [("oom", "DeiT OOM", "Fig. 1c", None),
                           ("memory", "Vim/DeiT memory", "abstract: 86.8% less", 1 - paper.HEADLINE_MEMORY_SAVING)]
            else:
                claims.append(("memory", "Vim/DeiT memory", "Fig. 1c", p.vim_gb / p.deit_gb))
            for what, label, source, ratio in claims:
                table.append(_claim_row(s, p.res, what, label, source, ratio, v, d, vr, deit))
        out[baseline] = table
    return out


def _claim_row(s: Setting, res, what, label, source, ratio, v, d, vr, deit) -> dict:
    row = dict(claim=f"{label} at {res}", source=source, res="", paper="OOM" if ratio is None else f"{ratio:.3g}",
               measured="", verdict="")
    if d is not None:
        row["res"] = f"{int(d['res'])} ({d['impl']}" + (f", batch {int(d['batch'])})" if d["batch"] != s.batch else ")")
    if vr.empty and deit.empty:
        row["verdict"] = "not measurable here (resolution not in the sweep)"
        return row
    if what == "oom":
        if deit.empty:
            row["verdict"] = "not measurable here (DeiT not run at this resolution)"
        elif d is None and (deit["status"] == "oom").any():
            row["measured"] = "OOM"
            row["verdict"] = "not measurable here (CPU run)" if s.is_cpu else "reproduced"
        elif d is None:
            row["measured"] = "error"
            row["verdict"] = "not measurable here (DeiT failed with an error, not OOM)"
        elif d["batch"] < s.batch:  # OOM at the requested batch, then a retry at a smaller one ran
            row["measured"] = f"OOM at batch {s.batch}, ran at {int(d['batch'])}"
            row["verdict"] = "not measurable here (CPU run)" if s.is_cpu else "reproduced"
        else:
            row["measured"] = f"ran ({d['mem_peak_gib']:.1f} GiB peak)" if pd.notna(d["mem_peak_gib"]) else "ran"
            row["verdict"] = "not measurable here (CPU run)" if s.is_cpu else "not reproduced (DeiT fits)"
        return row
    if v is None or d is None:
        failed = [f"{side} {st}" for side, frame in (("Vim", vr), ("DeiT", deit))
                  for st in sorted(set(frame["status"]) - {"ok"})]
        reason = ", ".join(failed) if failed else "a side was not run here"
        row["verdict"] = f"not measurable here ({reason})"
        return row
    if what == "speed":
        measured, note = v["throughput_img_s"] / d["throughput_img_s"], ""
    elif v["batch"] != d["batch"]:
        row["verdict"] = f"not measurable here (Vim ran at batch {int(v['batch'])}, DeiT at {int(d['batch'])})"
        return row
    else:
        measured, col = _claim_memory(v, d)
        note = f" ({col})" if col else ""
    if measured is None:
        row["verdict"] = "not measurable here (no memory column with values on both sides)"
        return row
    row["measured"] = f"{measured:.3g}{note}"
    row["verdict"] = "not measurable here (CPU run)" if s.is_cpu else verdict(ratio, measured)
    return row


def _claim_table(rows: list[dict]) -> list[str]:
    out = ["| claim | source | measured at (DeiT impl) | paper Vim/DeiT | measured Vim/DeiT | verdict |",
           "|---|---|---|---|---|---|"]
    return out + [f"| {r['claim']} | {r['source']} | {r['res']} | {r['paper']} | {r['measured']} | {r['verdict']} |"
                  for r in rows]


def absolute_tables(s: Setting, vim_model="vim_tiny", deit_model="deit_tiny") -> list[str]:
    """Absolute FPS and memory, each beside the device it came from: the paper's, then this run's."""
    out = ["Paper, Fig. 1 (GPU not stated; FPS read off a log plot):", "",
           "| res | tokens | DeiT-Ti FPS | Vim-Ti FPS | DeiT-Ti GB | Vim-Ti GB |", "|---|---|---|---|---|---|"]
    out += [f"| {p.res} | {p.tokens} | {p.deit_fps:g} | {p.vim_fps:g} | "
            f"{'OOM' if p.deit_gb is None else p.deit_gb} | {p.vim_gb} |" for p in paper.FIG1]
    rows = s.rows
    grids = [p.res // paper.PATCH for p in paper.FIG1]
    keep = rows[rows["model"].isin([vim_model, deit_model]) & (rows["res"] // paper.PATCH).isin(grids)]
    if keep.empty:
        return out
    out += ["", f"This run ({setting_title(s)}), img/s and GiB (peak allocated | reserved | NVML):", "",
            "| res | model | impl | status | throughput (img/s) | memory (GiB) |", "|---|---|---|---|---|---|"]
    for _, r in keep.sort_values(["res", "model", "impl"]).iterrows():
        mem = " / ".join("-" if pd.isna(r.get(c)) else f"{r[c]:.2f}" for c in ("mem_peak_gib", "mem_reserved_gib",
                                                                               "mem_nvml_gib") if c in r.index)
        thr = "" if pd.isna(r["throughput_img_s"]) else f"{r['throughput_img_s']:.1f}"
        out.append(f"| {int(r['res'])} | {r['model']} | {r['impl']} | {r['status']} | {thr} | {mem} |")
    return out


def setting_notes(s: Setting) -> list[str]:
    """How this setting differs from the authors' benchmark script (fp32, batch 64, backbone only, GPU)."""
    diffs = []
    if s.is_cpu:
        diffs.append("it ran on a CPU")
    if s.key["dtype"] != "fp32":
        diffs.append(f"dtype {s.key['dtype']} (authors: fp32)")
    if s.batch != 64:
        diffs.append(f"batch {s.batch} (authors: 64)")
    if s.key["head"]:
        diffs.append("the classifier head was timed (paper: backbone only)")
    if s.key.get("compile", "none") != "none":
        diffs.append(f"torch.compile {s.key['compile']} (authors: eager)")
    if s.key.get("amp", "none") != "none":
        diffs.append(f"autocast {s.key['amp']} (authors: none)")
    return [f"This setting differs from the authors' benchmark script: {'; '.join(diffs)}."] if diffs else []


def placement_notes(s: Setting) -> list[str]:
    """Warnings on where the rows of a setting ran: CPU configurations that ran concurrently (``workers``
    above 1 share the cores, so their timings test the machinery and are not measurements), and rows from
    different devices (CSVs of several machines reported together) drawn on the same curves."""
    out = []
    workers = s.rows["workers"] if "workers" in s.rows else None  # numeric, as the reader reads it
    if s.is_cpu and workers is not None and (workers > 1).any():
        out.append(f"**Concurrent CPU workers:** up to {int(workers.max())} configurations ran at once on the same "
                   "cores (the `workers` column). Their timings test the sweep machinery; they are not "
                   "measurements.")
    names = s.rows["device_name"].dropna().unique() if "device_name" in s.rows else []
    if len(names) > 1:
        out.append(f"**Mixed devices:** this setting combines rows from {', '.join(map(str, names))}; its "
                   "curves and fits mix them. Report each device's CSVs separately to compare them.")
    return out


def environment_lines(df: pd.DataFrame) -> list[str]:
    out = ["| field | value(s) |", "|---|---|"]
    for col in ENV_COLUMNS:
        if col in df.columns:
            vals = [str(v) for v in df[col].dropna().unique()]
            out.append(f"| {col} | {', '.join(vals) if vals else '(empty)'} |")
    for col, unit in ENV_RANGES:
        if col in df.columns and df[col].notna().any():
            lo, hi = pd.to_numeric(df[col], errors="coerce").agg(["min", "max"])
            out.append(f"| {col} | {lo:g} {unit} |" if lo == hi else f"| {col} | {lo:g}-{hi:g} {unit} |")
    if "timestamp" in df.columns and df["timestamp"].notna().any():
        ts = df["timestamp"].dropna().astype(str)
        out.append(f"| timestamp | {ts.min()} .. {ts.max()} |")
    if "command" in df.columns and df["command"].notna().any():
        out += ["", "Produced by:", "", "```"] + [str(c) for c in df["command"].dropna().unique()] + ["```"]
    return out


def failures(df: pd.DataFrame) -> list[str]:
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return ["None: every configuration ran."]
    out = ["| model | impl | res | batch | dtype | device | status | error |", "|---|---|---|---|---|---|---|---|"]
    for _, r in bad.iterrows():
        err = str(r.get("error", "")) if pd.notna(r.get("error", None)) else ""
        err = err.splitlines()[0][:120].replace("|", "/") if err else ""
        batch = "" if pd.isna(r["batch"]) else int(r["batch"])
        out.append(f"| {r['model']} | {r['impl']} | {int(r['res'])} | {batch} | {r['dtype']} | "
                   f"{r['device']} | {r['status']} | {err} |")
    return out


def build_report(df: pd.DataFrame, source: str, figures: dict[str, list[str]],
                 memory: pd.DataFrame | None = None, left_out: list[str] = ()) -> str:
    """The report text for checked scaling rows (``source`` names their CSVs), with the rows of a memory
    CSV when one was given. ``figures`` maps a setting slug to the relative paths of its PNG figures;
    ``left_out`` notes the rows and values ``rows.validate.plottable`` set aside."""
    settings = [s for s in split_settings("scaling", df) if (s.rows["status"] == "ok").any()]
    lines = [f"# vimbench report: {source}", ""]
    if any(s.is_cpu for s in settings):
        lines += ["> **CPU run.** " + ("All" if all(s.is_cpu for s in settings) else "Some") +
                  " rows were measured on a CPU. The paper's numbers are GPU numbers: CPU ratios show the "
                  "shape of the scaling, not the claim, and its verdicts read \"not measurable here\".", ""]
    counts = ", ".join(f"{n} {st}" for st, n in df["status"].value_counts().items())
    lines += [f"Source: `{source}`, {len(df)} rows ({counts}).",
              "Units: latency in ms per batch (median), throughput in img/s, memory in GiB (peak allocated by torch "
              "on a GPU, peak added resident memory on a CPU), FLOPs with 2 per multiply-add. Exponents k are "
              "fitted as metric ~ c * tokens^k by least squares in log-log space; the 95% CI uses the Student-t "
              "quantile with n-2 degrees of freedom; the upper half is the points at or above the median resolution.",
              ""]
    for s in settings:
        if len(settings) > 1:
            lines += [f"## Setting: {setting_title(s)}", ""]
        else:
            lines += [f"Setting: **{setting_title(s)}**", ""]
        notes = setting_notes(s) + placement_notes(s)
        lines += notes + [""] if notes else []
        lines += [f"![{Path(f).stem}]({f})" for f in figures.get(s.slug, [])] + [""]
        h = "###" if len(settings) > 1 else "##"
        lines += [f"{h} Scaling exponents in tokens", ""] + exponent_table(s) + [""]
        lines += [f"{h} Share of DeiT FLOPs in attention", ""] + attention_share_table(s) + [""]
        lines += [f"{h} Crossovers", ""] + crossover_lines(s) + [""]
        if s.key.get("mode", "infer") == "train":
            lines += [f"{h} Claim check", "", "Not applicable: the paper's claims (Fig. 1 and the abstract) are "
                      "about inference, and this setting measured train steps; see \"Training against "
                      "inference\" below.", ""]
            if not s.is_cpu:
                lines += [f"{h} Predicted vs measured GPU memory", ""] + memory_prediction_lines(s) + [""]
            continue
        lines += [f"{h} Claim check: Vim-Ti vs DeiT-Ti (paper Fig. 1 and abstract)", ""]
        missing = [m for m in ("vim_tiny", "deit_tiny") if not (s.rows["model"] == m).any()]
        if missing:
            lines += [f"Not measurable here: the claim compares vim_tiny with deit_tiny; this setting has no "
                      f"{' or '.join(missing)} rows.", ""]
            continue
        checks = claim_check(s)
        lines += claim_intro(s) + [""]
        lines += ["Against eager DeiT (materialised attention, as timm 0.4.12 in the paper):", ""]
        lines += _claim_table(checks["eager"]) + [""]
        lines += ["Against fused-attention DeiT (fastest of " + "/".join(FUSED_ATTENTION) + " at each resolution):", ""]
        lines += _claim_table(checks["fused"]) + [""]
        lines += absolute_tables(s) + [""]
        if not s.is_cpu:
            lines += [f"{h} Predicted vs measured GPU memory", ""] + memory_prediction_lines(s) + [""]
    pairs = regimes.compile_pairs(settings)
    if pairs:
        lines += ["## Does compiling both contenders change the verdict?", ""] + compile_lines(pairs) + [""]
    if any(s.key.get("mode", "infer") == "train" for s in settings):
        lines += ["## Training against inference", ""] + training_lines(training.train_pairs(settings)) + [""]
    lines += ["## Predicted GPU memory in the paper's setting vs Fig. 1(c)", ""] + paper_memory_lines(memory) + [""]
    lines += ["## Failed runs", ""] + failures(df) + [""]
    if left_out:
        lines += ["## Rows left out", "", "Rows or values that cannot be drawn or fitted (rows numbered from 1, the "
                  "first after the header):", ""] + [f"- {note}" for note in left_out] + [""]
    lines += ["## Environment", ""] + environment_lines(df) + [""]
    return "\n".join(lines)


def compile_lines(pairs: list[tuple[Setting, Setting]]) -> list[str]:
    """Per (eager, compiled) pair of settings: one answer per Vim/DeiT pair, the crossovers and ratios
    behind it, the claim verdicts compiling changes (GPU runs), and compiled/eager speed per model."""
    out = []
    for eager, compiled in pairs:
        out += [f"### {setting_title(compiled)} vs eager", ""]
        rows = regimes.verdict_rows(eager, compiled)
        if not rows:
            out += ["No Vim/DeiT pair of the same size was measured in both regimes.", ""]
        for r in rows:
            out += [f"- {r['answer']}"]
        if rows:
            out += ["", "| Vim | DeiT | faster from, eager | faster from, compiled | Vim/DeiT at top res, eager | "
                        "compiled |", "|---|---|---|---|---|---|"]
            out += [f"| {r['vim']} | {r['deit']} | {r['faster_eager']} | {r['faster_compiled']} | "
                    f"{r['ratio_eager']:.2f} ({r['top_res']:g} px) | {r['ratio_compiled']:.2f} |" for r in rows]
        if {"vim_tiny", "deit_tiny"} <= set(eager.rows["model"]) & set(compiled.rows["model"]):
            before, after = claim_check(eager), claim_check(compiled)
            changed = [f"{b['claim']} ({baseline}): {b['verdict']} -> {a['verdict']}"
                       for baseline in before for b, a in zip(before[baseline], after[baseline])
                       if b["verdict"] != a["verdict"]]
            out += ["", "Claim check verdicts that compiling changes: " + ("; ".join(changed) if changed else
                    "none" + (" (CPU run: the claims are not measurable here)" if compiled.is_cpu else "")) + "."]
        out += ["", "| model | impl | res | compiled/eager throughput | compile_s | graph_breaks |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['impl']} | {r['res']:g} | {r['speedup']:.2f} | {r['compile_s']:.1f} | "
                f"{r['graph_breaks']:.0f} |" for r in regimes.speedups(eager, compiled)]
        out += [""]
    return out + ["compile_s: wall time of the first call of the compiled model (tracing, inductor compilation, "
                  "one forward), never timed; graph_breaks: places where TorchDynamo fell back to Python."]


def training_lines(pairs: list[tuple[Setting, Setting]]) -> list[str]:
    """Per (inference, train) pair of settings: the train/infer throughput and memory ratio of each model and
    backend at each resolution both measured, with VMamba's published ratios as context."""
    context = ", ".join(f"{m} keeps {r:g}" for m, r in training.PUBLISHED_TRAIN_INFER.items())
    out = [f"Train/infer ratios: a train step (forward, loss, backward, SGD step) against one inference forward, "
           f"images per second and peak memory (rows at the setting's batch). Published context (VMamba's "
           f"README, 224 px, A100): {context} of its inference throughput when training.", ""]
    if not pairs:
        return out + ["No train setting has an inference twin (same device, dtype, batch, head and regime)."]
    for infer, train in pairs:
        ckpt = " with activation checkpointing" if train.key.get("grad_checkpointing") else ""
        out += [f"### {setting_title(train)}{ckpt}", ""]
        rows = training.train_infer_ratios(infer, train)
        if not rows:
            out += ["No model and backend measured ok in both modes at a common resolution.", ""]
            continue
        out += ["| model | impl | res | train/infer throughput | train/infer memory |", "|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['impl']} | {r['res']:g} | {r['throughput_ratio']:.2f} | "
                f"{'' if r['memory_ratio'] is None else format(r['memory_ratio'], '.2f')} |" for r in rows]
        out += [""]
    return out


def memory_prediction_lines(s: Setting) -> list[str]:
    """mem_pred_peak_gib (vimbench.count.memory's prediction, made without a GPU) beside torch's measured peak
    allocated, reserved and NVML memory for each ok row of a GPU setting; the goal is within 10% of peak."""
    if s.key.get("compile", "none") != "none":
        return ["Not predicted: the prediction replays the eager forward, and inductor's fused kernels allocate "
                "differently."]
    rows = s.rows[(s.rows["status"] == "ok") & s.rows["mem_pred_peak_gib"].notna()]
    if rows.empty:
        return ["No ok row carries a prediction."]
    out = ["| model | impl | res | batch | predicted peak | measured peak | error | reserved | NVML |",
           "|---|---|---|---|---|---|---|---|---|"]
    errors = []
    for r in rows.sort_values(["model", "impl", "res"]).itertuples():
        err = r.mem_pred_peak_gib / r.mem_peak_gib - 1
        errors.append(abs(err))
        out.append(f"| {r.model} | {r.impl} | {int(r.res)} | {int(r.batch)} | {r.mem_pred_peak_gib:.3f} | "
                   f"{r.mem_peak_gib:.3f} | {100 * err:+.1f}% | {r.mem_reserved_gib:.3f} | "
                   f"{'' if pd.isna(r.mem_nvml_gib) else f'{r.mem_nvml_gib:.3f}'} |")
    within = sum(e <= 0.10 for e in errors)
    amp = "" if s.key.get("amp", "none") == "none" else f" under autocast {s.key['amp']}"
    out += ["", f"GiB. Predicted = peak allocated (torch.cuda.max_memory_allocated) of the same configuration, "
                f"computed on fake tensors{amp}; {within} of {len(errors)} rows within 10% of the measured peak "
                f"(largest error {100 * max(errors):.1f}%)."]
    return out


def paper_memory_table(memory: pd.DataFrame) -> list[str]:
    """The rows of a memory CSV that the paper measured too (``paper_gib`` present, or NaN for its OOM)
    as a Markdown table: predicted peak and reserved + context beside Fig. 1 (c), errors relative to it.
    Inference rows only: the paper measured inference."""
    rows = memory[(memory["status"] == "ok") & (memory["mode"] == "infer")].copy()
    in_paper = rows["paper_gib"].notna() | (rows["model"] == "deit_tiny")  # NaN for deit_tiny: the paper's OOM
    rows = rows[rows["model"].isin(["vim_tiny", "deit_tiny"]) & in_paper]
    if rows.empty:
        return ["No row of the paper's setting in the memory CSV."]
    card = rows["card"].iloc[0]
    out = [f"| model | impl | kernel | res | tokens | paper (GiB) | pred peak | err peak | pred reserved + context | "
           f"err used | fits {card} |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "" if pd.isna(v) else f"{100 * v:+.0f}%"  # noqa: E731
    for r in rows.sort_values(["model", "res"]).itertuples():
        paper = "OOM" if pd.isna(r.paper_gib) else f"{r.paper_gib:.2f}"
        out.append(f"| {r.model} | {r.impl} | {r.kernel} | {int(r.res)} | {int(r.tokens)} | {paper} | "
                   f"{r.mem_pred_peak_gib:.2f} | {pct(r.mem_pred_peak_gib / r.paper_gib - 1)} | "
                   f"{r.mem_pred_used_gib:.2f} | {pct(r.mem_pred_used_gib / r.paper_gib - 1)} | "
                   f"{'yes' if r.fits else 'no'} |")
    return out


def paper_memory_lines(memory: pd.DataFrame | None) -> list[str]:
    """The predicted memory of the paper's setting (a memory CSV from ``vimbench memory --preset paper``)
    beside Fig. 1 (c), and what each side counts; a pointer to that command when no memory CSV was given."""
    if memory is None:
        return ["Not included: pass the CSV of `vimbench memory --preset paper` to `vimbench report` to set the "
                "predicted memory of the paper's setting beside Fig. 1 (c)."]
    out = paper_memory_table(memory)
    deit = memory[(memory["model"] == "deit_tiny") & (memory["res"] == 1248) & (memory["impl"] == "eager")
                  & (memory["status"] == "ok") & (memory["mode"] == "infer")]
    out += ["", "GiB = 2^30 B; the paper's GB read as GiB. The prediction counts tensors only: peak allocated is "
                "what torch.cuda.max_memory_allocated reports, reserved adds the caching allocator's cached "
                "segments, and the CUDA context (context_gib) is added for what nvidia-smi would show. The "
                "paper's numbers most likely are nvidia-smi readings, and its Vim was the earlier RoPE variant "
                "on mamba_ssm's fused path."]
    if len(deit):
        d = deit.iloc[0]
        out.append(f"DeiT-Ti at 1248 (eager, batch {int(d['batch'])}): predicted {d['mem_pred_peak_gib']:.1f} GiB "
                   f"peak, {d['mem_pred_used_gib']:.1f} GiB with context: it {'fits' if d['fits'] else 'does not fit'} "
                   f"a {d['card']} card, where the paper draws OOM.")
    return out


def claim_intro(s: Setting) -> list[str]:
    v_impl = vim_impl(s.rows, "vim_tiny")
    return [f"Paper setting: {paper.PAPER_SETTING}. Ratios are Vim/DeiT (above 1: Vim faster or heavier). "
            f"Vim backend used: {v_impl or 'none (vim_tiny not in this setting)'}. Resolutions are matched on the "
            f"patch grid (res // 16). A claim is reproduced when the measured ratio is within a factor "
            f"{1 + TOLERANCE:g} of the paper's, either way: the paper's FPS are read off a log plot (about +-10% "
            f"on a ratio), its GPU, batch, dtype and memory definition are unknown (10-20% on relative speed), "
            f"and runs spread by a few percent. Memory ratios use NVML memory if both rows have it, else "
            f"reserved, else peak allocated (the paper most likely read nvidia-smi)."]


def write_report(df: pd.DataFrame, source: str, out_dir, memory: pd.DataFrame | None = None,
                 left_out: list[str] = ()) -> Path:
    """Write the figures and ``report.md`` under ``out_dir`` (``left_out``: see ``build_report``); returns the
    report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = plot_results("scaling", df, out)
    settings = split_settings("scaling", df)
    figures = {}
    for s in settings:
        figures[s.slug] = [os.path.relpath(p, out) for p in paths if p.suffix == ".png"
                           and (len(settings) == 1 or p.stem.endswith(s.slug))]
    report = out / "report.md"
    report.write_text(build_report(df, source, figures, memory, left_out))
    return report
