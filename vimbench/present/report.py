"""A Markdown report of a scaling CSV: exponents, FLOP shares, crossovers and the check of the paper's claim.

Everything is computed from the CSV (see ``vimbench.rows.reader``); the figures it embeds are written next to
it by ``vimbench.present.figures`` and referenced by relative path.

Claim check: ``vimbench.analysis.claims`` decides the exponents' readings, the crossovers and the verdicts on
the paper's Fig. 1 numbers (its docstring gives the tolerance and why); this module only renders them.

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

import os
from pathlib import Path

import pandas as pd

from vimbench.analysis import paper
from vimbench.analysis import regimes, training
from vimbench.analysis.claims import (FUSED_ATTENTION, TOLERANCE, claim_check, crossover_rows, exponent_rows,
                                      vim_impl)
from vimbench.analysis.fit import describe_fit
from vimbench.present.figures import plot_results, setting_title
from vimbench.present.tables import markdown_table
from vimbench.rows.reader import Setting, split_settings

ENV_COLUMNS = ("device_name", "driver_version", "cuda_version", "torch_version", "triton_version", "timm_version",
               "vimbench_version", "git_commit", "cpu_model", "cpu_capability", "threads", "tf32", "cudnn_benchmark")
ENV_RANGES = (("sm_clock_mhz", "MHz"), ("temperature_c", "°C"), ("power_w", "W"))


def exponent_table(s: Setting) -> list[str]:
    """Exponents of latency and memory (runs at the setting's batch) and of FLOPs per image (all rows)."""
    return markdown_table(
        ["model", "impl", "metric", "k, whole sweep [95% CI]", "k, upper half [95% CI]", "expected", "reading"],
        ([r["model"], r["impl"], r["metric"], describe_fit(r["whole"]), describe_fit(r["upper"]),
          "" if r["expected"] is None else f"{r['expected']:g}", r["reading"]] for r in exponent_rows(s)))


def attention_share_table(s: Setting) -> list[str]:
    """Percentage of each DeiT model's FLOPs spent in attention (QK^T and AV) per resolution."""
    deit = s.rows[(s.rows["family"] == "deit")].dropna(subset=["flops_total"]).drop_duplicates(["model", "res"])
    if deit.empty:
        return ["No DeiT rows in this setting."]
    models = sorted(deit["model"].unique())
    body = []
    for res, g in deit.groupby("res"):
        cells = []
        for m in models:
            r = g[g["model"] == m]
            cells.append(f"{100 * r['flops_attention'].iloc[0] / r['flops_total'].iloc[0]:.1f}%" if len(r) else "")
        body.append([int(res), int(g["tokens"].iloc[0]), *cells])
    return markdown_table(["res (px)", "tokens", *(f"{m} attention share" for m in models)], body)


def crossover_lines(s: Setting) -> list[str]:
    """Where each Vim model becomes faster and lighter than each backend of the DeiT model of the same size."""
    rows = crossover_rows(s)
    if not rows:
        return ["No Vim/DeiT pair of the same size in this setting."]
    out = markdown_table(["Vim", "DeiT", "faster from", "lighter from", "DeiT failed at"],
                         ([r["vim"], r["deit"], r["faster"], r["lighter"], r["failed"]] for r in rows))
    return out + ["", "Crossover: the resolution from which Vim stays better through the end of the sweep, with "
                  "log(Vim/DeiT) interpolated linearly in log(resolution) between the two bracketing points; "
                  "\"at or below\" means Vim is already better at the first common point. Only resolutions "
                  "where both ran are compared."]


def _claim_table(rows: list[dict]) -> list[str]:
    cols = ["claim", "source", "res", "paper", "measured", "verdict"]
    return markdown_table(["claim", "source", "measured at (DeiT impl)", "paper Vim/DeiT", "measured Vim/DeiT",
                           "verdict"], ([r[c] for c in cols] for r in rows))


def absolute_tables(s: Setting, vim_model="vim_tiny", deit_model="deit_tiny") -> list[str]:
    """Absolute FPS and memory, each beside the device it came from: the paper's, then this run's."""
    out = ["Paper, Fig. 1 (GPU not stated; FPS read off a log plot):", ""] + markdown_table(
        ["res", "tokens", "DeiT-Ti FPS", "Vim-Ti FPS", "DeiT-Ti GB", "Vim-Ti GB"],
        ([p.res, p.tokens, f"{p.deit_fps:g}", f"{p.vim_fps:g}", "OOM" if p.deit_gb is None else p.deit_gb, p.vim_gb]
         for p in paper.FIG1))
    rows = s.rows
    grids = [p.res // paper.PATCH for p in paper.FIG1]
    keep = rows[rows["model"].isin([vim_model, deit_model]) & (rows["res"] // paper.PATCH).isin(grids)]
    if keep.empty:
        return out
    out += ["", f"This run ({setting_title(s)}), img/s and GiB (peak allocated | reserved | NVML):", ""]
    body = []
    for _, r in keep.sort_values(["res", "model", "impl"]).iterrows():
        mem = " / ".join("-" if pd.isna(r.get(c)) else f"{r[c]:.2f}" for c in ("mem_peak_gib", "mem_reserved_gib",
                                                                               "mem_nvml_gib") if c in r.index)
        thr = "" if pd.isna(r["throughput_img_s"]) else f"{r['throughput_img_s']:.1f}"
        body.append([int(r["res"]), r["model"], r["impl"], r["status"], thr, mem])
    return out + markdown_table(["res", "model", "impl", "status", "throughput (img/s)", "memory (GiB)"], body)


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
    body = []
    for col in ENV_COLUMNS:
        if col in df.columns:
            vals = [str(v) for v in df[col].dropna().unique()]
            body.append([col, ", ".join(vals) if vals else "(empty)"])
    for col, unit in ENV_RANGES:
        if col in df.columns and df[col].notna().any():
            lo, hi = pd.to_numeric(df[col], errors="coerce").agg(["min", "max"])
            body.append([col, f"{lo:g} {unit}" if lo == hi else f"{lo:g}-{hi:g} {unit}"])
    if "timestamp" in df.columns and df["timestamp"].notna().any():
        ts = df["timestamp"].dropna().astype(str)
        body.append(["timestamp", f"{ts.min()} .. {ts.max()}"])
    out = markdown_table(["field", "value(s)"], body)
    if "command" in df.columns and df["command"].notna().any():
        out += ["", "Produced by:", "", "```"] + [str(c) for c in df["command"].dropna().unique()] + ["```"]
    return out


def failures(df: pd.DataFrame) -> list[str]:
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return ["None: every configuration ran."]
    body = []
    for _, r in bad.iterrows():
        err = str(r.get("error", "")) if pd.notna(r.get("error", None)) else ""
        err = err.splitlines()[0][:120].replace("|", "/") if err else ""
        batch = "" if pd.isna(r["batch"]) else int(r["batch"])
        body.append([r["model"], r["impl"], int(r["res"]), batch, r["dtype"], r["device"], r["status"], err])
    return markdown_table(["model", "impl", "res", "batch", "dtype", "device", "status", "error"], body)


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
            out += [""] + markdown_table(
                ["Vim", "DeiT", "faster from, eager", "faster from, compiled", "Vim/DeiT at top res, eager",
                 "compiled"],
                ([r["vim"], r["deit"], r["faster_eager"], r["faster_compiled"],
                  f"{r['ratio_eager']:.2f} ({r['top_res']:g} px)", f"{r['ratio_compiled']:.2f}"] for r in rows))
        if {"vim_tiny", "deit_tiny"} <= set(eager.rows["model"]) & set(compiled.rows["model"]):
            before, after = claim_check(eager), claim_check(compiled)
            changed = [f"{b['claim']} ({baseline}): {b['verdict']} -> {a['verdict']}"
                       for baseline in before for b, a in zip(before[baseline], after[baseline])
                       if b["verdict"] != a["verdict"]]
            out += ["", "Claim check verdicts that compiling changes: " + ("; ".join(changed) if changed else
                    "none" + (" (CPU run: the claims are not measurable here)" if compiled.is_cpu else "")) + "."]
        out += [""] + markdown_table(
            ["model", "impl", "res", "compiled/eager throughput", "compile_s", "graph_breaks"],
            ([r["model"], r["impl"], f"{r['res']:g}", f"{r['speedup']:.2f}", f"{r['compile_s']:.1f}",
              f"{r['graph_breaks']:.0f}"] for r in regimes.speedups(eager, compiled)))
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
        out += markdown_table(
            ["model", "impl", "res", "train/infer throughput", "train/infer memory"],
            ([r["model"], r["impl"], f"{r['res']:g}", f"{r['throughput_ratio']:.2f}",
              "" if r["memory_ratio"] is None else format(r["memory_ratio"], ".2f")] for r in rows))
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
    body, errors = [], []
    for r in rows.sort_values(["model", "impl", "res"]).itertuples():
        err = r.mem_pred_peak_gib / r.mem_peak_gib - 1
        errors.append(abs(err))
        body.append([r.model, r.impl, int(r.res), int(r.batch), f"{r.mem_pred_peak_gib:.3f}",
                     f"{r.mem_peak_gib:.3f}", f"{100 * err:+.1f}%", f"{r.mem_reserved_gib:.3f}",
                     "" if pd.isna(r.mem_nvml_gib) else f"{r.mem_nvml_gib:.3f}"])
    out = markdown_table(["model", "impl", "res", "batch", "predicted peak", "measured peak", "error", "reserved",
                          "NVML"], body)
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
    body = []
    pct = lambda v: "" if pd.isna(v) else f"{100 * v:+.0f}%"  # noqa: E731
    for r in rows.sort_values(["model", "res"]).itertuples():
        paper = "OOM" if pd.isna(r.paper_gib) else f"{r.paper_gib:.2f}"
        body.append([r.model, r.impl, r.kernel, int(r.res), int(r.tokens), paper, f"{r.mem_pred_peak_gib:.2f}",
                     pct(r.mem_pred_peak_gib / r.paper_gib - 1), f"{r.mem_pred_used_gib:.2f}",
                     pct(r.mem_pred_used_gib / r.paper_gib - 1), "yes" if r.fits else "no"])
    return markdown_table(["model", "impl", "kernel", "res", "tokens", "paper (GiB)", "pred peak", "err peak",
                           "pred reserved + context", "err used", f"fits {card}"], body)


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
