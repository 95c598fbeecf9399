"""What a scaling sweep says about the Vim paper's claims: expected exponents and their reading, Vim/DeiT
crossovers in resolution, and the check of the paper's Fig. 1 numbers. Rows as dicts; ``vimbench.present.report``
renders them.

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
"""
from __future__ import annotations

import math

import pandas as pd

from vimbench.analysis import paper
from vimbench.analysis.crossovers import crossover_cell
from vimbench.analysis.fit import fit_sweep
from vimbench.rows.reader import Setting

TOLERANCE = 0.25
EXPONENT_SLACK = 0.05  # |k - expected| this small reads as "consistent" even outside a narrow CI
FUSED_ATTENTION = ("sdpa", "flash", "efficient", "cudnn")  # "math" materialises softmax(QK^T) like eager
VIM_IMPL_PREFERENCE = ("mamba_ssm", "triton", "cpp", "cpu", "ref")  # the official kernel first, then ours
METRICS = (("time", "time_ms"), ("memory", "mem_peak_gib"), ("FLOPs", "flops_total"))
CLAIM_MEMORY_COLUMNS = ("mem_nvml_gib", "mem_reserved_gib", "mem_peak_gib")


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


def exponent_rows(s: Setting) -> list[dict]:
    """Fitted exponents in tokens of latency and memory (runs at the setting's batch) and of FLOPs per image
    (all rows), per (model, impl) with Vim first: model, impl, metric, whole and upper (``PowerLawFit`` or
    None), expected (``expected_exponent``) and reading (``reading``)."""
    rows = s.rows
    ok = rows[(rows["status"] == "ok") & (rows["batch"] == s.batch)]
    out = []
    for (model, impl), g in sorted(ok.groupby(["model", "impl"]), key=lambda kv: _model_order(kv[0][0]) + kv[0]):
        family = str(g["family"].iloc[0])
        for name, col in METRICS:
            src = rows[(rows["model"] == model) & (rows["impl"] == impl)] if name == "FLOPs" else g
            src = src.drop_duplicates("tokens")
            y = src[col] / src["batch"] if name == "FLOPs" else src[col]
            whole, upper = fit_sweep(src["tokens"], y)
            exp = expected_exponent(family, impl, name)
            out.append(dict(model=model, impl=impl, metric=name, whole=whole, upper=upper, expected=exp,
                            reading=reading(exp, whole, upper)))
    return out


def _model_order(model: str) -> tuple:
    return (not str(model).startswith("vim"),)


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


def crossover_rows(s: Setting) -> list[dict]:
    """Where each Vim model becomes faster (throughput) and lighter (peak memory) than each backend of
    the DeiT model of the same size, for every Vim backend: vim, deit ("model (impl)"), faster, lighter
    (``crossover_cell`` phrases) and failed (the DeiT backend's failed resolutions, or "-"). Throughput is per
    image, so runs retried at a smaller batch after an OOM count; memory compares only runs at the setting's
    batch."""
    rows = s.rows
    out = []
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
            out.append(dict(vim=f"{vim_model} ({v_impl})", deit=f"{deit_model} ({d_impl})", faster=cells[0],
                            lighter=cells[1], failed=fail))
    return out


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
