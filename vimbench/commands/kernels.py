"""`vimbench kernels`: the token mixers alone, scan against attention at matched sequence lengths, to CSV."""
from __future__ import annotations

import datetime
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np

from ..csvlog import CsvLog, check_writable
from ..env import environment
from ..errors import InputError
from ..fit import crossover, fit_power_law, upper_half
from ..isolation import run_isolated
from ..kernelbench import OPS, Geometry, measure_ceilings, measure_op, model_geometry, op_cost
from ..kernels.attention import ATTENTION_BACKENDS, check_attention_backend
from ..kernels.selective_scan import SCAN_CHOICES, BackendUnavailable, resolve_scan_backend
from ..measure import DTYPES
from ..plotting import plot_results
from ..registry import model_entry
from ..results import Setting, load_results, split_settings
from ..sweep import run_sweep
from ..table import format_table
from ._options import checked_list, comma_list, command_line, models_option, res_option, resolutions
from .scaling import resolve_device

COLUMNS = [
    # identity: what ran, at which sizes
    "op", "impl", "kernel", "model", "width", "heads", "head_dim", "d_inner", "d_state", "L", "res", "batch",
    "dtype", "device", "status", "error",
    # time and memory
    "time_ms", "time_ms_p10", "time_ms_p90", "repeats", "mem_peak_gib",
    # work and rates
    "flops", "bytes", "gflops_s", "gbs", "frac_peak_flops", "frac_peak_bw", "ceiling_gflops_s", "ceiling_gbs",
    # environment
    "device_name", "driver_version", "cuda_version", "torch_version", "triton_version", "timm_version",
    "vimbench_version", "git_commit", "cpu_model", "threads", "load_avg_1m", "timestamp", "command",
]
KEY = ["op", "impl", "model", "res", "batch", "dtype", "device"]
CPU_TIMING = dict(warmup=0, repeats=3, min_time=0.5)
"""CPU timing defaults: after one untimed call, at least 3 timed calls and 0.5 s of them (a full default
sweep then takes a few minutes on 2 cores). GPUs use do_bench's own warm-up and repetitions."""
GPU_FUSED = ("flash", "efficient", "cudnn")
CONFIG_TIMEOUT_S = 1800
PAIRS = (("scan_bidir", "attention"), ("scan", "attention"), ("mixer_vim", "block_deit"))
"""(Vim op, attention op) pairs whose crossovers are printed."""


def scan_impls(spec: str, device) -> list[str]:
    """The concrete scan backends named by ``spec`` ('auto' resolved for ``device``, duplicates dropped);
    InputError for a backend that cannot run here."""
    out = []
    for name in checked_list(spec, SCAN_CHOICES, "scan backend"):
        try:
            impl = resolve_scan_backend(name, device)
        except BackendUnavailable as e:
            raise InputError(f"--scan {name}: {e}") from None
        out += [impl] if impl not in out else []
    return out


def attention_impls(spec: str | None, device, dtype) -> list[str]:
    """Explicit ``spec``: those backends, InputError for one that cannot run on (device, dtype).
    None: eager and sdpa, plus on a GPU each of flash, efficient and cudnn that runs there."""
    names = checked_list(spec, ATTENTION_BACKENDS, "attention backend") if spec else ["eager", "sdpa"]
    candidates = [] if spec or device.type != "cuda" else list(GPU_FUSED)
    for name in names:
        try:
            check_attention_backend(name, device, dtype, head_dim=64)
        except BackendUnavailable as e:
            raise InputError(f"--attn {name}: {e}") from None
    for name in candidates:
        try:
            check_attention_backend(name, device, dtype, head_dim=64)
            names.append(name)
        except BackendUnavailable:
            pass
    return list(dict.fromkeys(names))


def _rates(row: dict) -> dict:
    """Achieved GFLOP/s and GB/s of an ok row, and their fractions of the measured ceilings."""
    seconds = row["time_ms"] * 1e-3
    out = {"gflops_s": row["flops"] / seconds / 1e9, "gbs": row["bytes"] / seconds / 1e9}
    if row.get("ceiling_gflops_s"):
        out["frac_peak_flops"] = out["gflops_s"] / row["ceiling_gflops_s"]
        out["frac_peak_bw"] = out["gbs"] / row["ceiling_gbs"]
    return out


def _measure_config(cfg: dict, fixed: dict) -> dict:
    """One CSV row: ``measure_op`` in its own worker, plus sizes, FLOPs, bytes, rates and ``fixed``
    (environment, ceilings, command)."""
    g = cfg["geometry"]
    row = {k: cfg[k] for k in KEY}
    row.update({k: g[k] or "" for k in ("width", "heads", "head_dim", "d_inner", "d_state")}, L=g["L"],
               kernel=cfg["impl"], **fixed, **op_cost(cfg["op"], Geometry(**g), cfg["dtype"]),
               timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    row.update(run_isolated(measure_op, (cfg,), timeout=CONFIG_TIMEOUT_S))
    if row["status"] == "ok":
        row.update(_rates(row))
    return row


def _fit_text(x, y) -> str:
    """Fitted exponent "k [95% CI]" of y ~ x^k over the positive points, whole sweep | upper half."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(y) & (y > 0)
    x, y = x[keep], y[keep]
    if np.unique(x).size < 2:
        return "n/a"
    parts = []
    for fx, fy in ((x, y), upper_half(x, y)):
        if np.unique(fx).size < 2:
            parts.append("n/a")
            continue
        f = fit_power_law(fx, fy)
        parts.append(f"{f.k:.2f}" + ("" if np.isnan(f.k_lo) else f" [{f.k_lo:.2f}, {f.k_hi:.2f}]"))
    return " | ".join(parts)


def _curves(s: Setting) -> dict:
    """(op, impl) -> ok rows indexed by L, sorted."""
    ok = s.rows[s.rows["status"] == "ok"]
    return {key: g.drop_duplicates("L", keep="last").set_index("L").sort_index()
            for key, g in ok.groupby(["op", "impl"], sort=False)}


def exponent_rows(s: Setting) -> list[dict]:
    """Per (op, impl): fitted exponents in L of time and memory (whole sweep | upper half)."""
    return [{"op": op, "impl": impl, "kernel": "/".join(dict.fromkeys(c["kernel"].astype(str))), "n": len(c),
             "k_time": _fit_text(c.index, c["time_ms"]), "k_mem": _fit_text(c.index, c["mem_peak_gib"])}
            for (op, impl), c in _curves(s).items()]


def crossover_rows(s: Setting) -> list[dict]:
    """For each (Vim op, attention op) pair of ``PAIRS`` and each pair of their backends: the L from which
    the Vim op stays faster (and uses less memory), via ``fit.crossover``; only common L are compared."""
    curves, out = _curves(s), []
    for vim_op, attn_op in PAIRS:
        for (op_a, impl_a), a in curves.items():
            for (op_b, impl_b), b in curves.items():
                if (op_a, op_b) != (vim_op, attn_op):
                    continue
                cells = {}
                for col, name in (("time_ms", "faster_from"), ("mem_peak_gib", "lighter_from")):
                    common = [L for L in a.index.intersection(b.index) if a.at[L, col] > 0 and b.at[L, col] > 0]
                    if not common:
                        cells[name] = "no common points"
                        continue
                    c = crossover(common, a.loc[common, col], b.loc[common, col], lower_is_better=True)
                    note = f" (curves cross {c.sign_changes} times)" if c.sign_changes > 1 else ""
                    cells[name] = c.describe(" tokens") + note
                out.append({"vim": f"{op_a} [{impl_a}]", "attention": f"{op_b} [{impl_b}]", **cells})
    return out


def summary(path) -> str:
    """Exponents and crossovers of every setting in the kernel CSV at ``path``."""
    _, df = load_results(path, kinds=("kernel",))
    blocks = []
    for s in split_settings("kernel", df):
        title = ", ".join(f"{k} {v}" for k, v in s.key.items())
        blocks += [f"\n{title}: fitted exponents in L (time, memory; whole sweep | upper half, 95% CI)",
                   format_table(exponent_rows(s), ["op", "impl", "kernel", "n", "k_time", "k_mem"])]
        rows = crossover_rows(s)
        blocks += [f"{title}: crossovers (the L from which the Vim op stays faster / lighter)",
                   format_table(rows, ["vim", "attention", "faster_from", "lighter_from"]) if rows
                   else "no Vim op and attention op measured at common L"]
    return "\n".join(blocks)


@click.command("kernels")
@models_option
@res_option
@click.option("--scan", "scan_spec", default="auto", show_default=True,
              help=f"Scan backend(s) for the Vim ops: {', '.join(SCAN_CHOICES)}.")
@click.option("--attn", "attn_spec", default=None,
              help=f"Attention backend(s): {', '.join(ATTENTION_BACKENDS)} [eager,sdpa; on a GPU also flash, "
                   "efficient and cudnn where they run]. An explicit backend that cannot run here is refused.")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences (images) per call.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--device", "device_spec", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--repeats", type=int, default=CPU_TIMING["repeats"], show_default=True,
              help="CPU: at least this many timed calls (GPU: do_bench decides).")
@click.option("--min-time", type=float, default=CPU_TIMING["min_time"], show_default=True,
              help="CPU: ...and at least this many seconds of them.")
@click.option("--threads", type=int, default=0, help="CPU threads for torch [torch's default].")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="CSV to write [results/kernels-<device>-<time>.csv].")
@click.option("--resume", is_flag=True, help="Continue --out: skip configurations already ok, append the rest.")
@click.option("--plot", is_flag=True, help="Also draw the log-log time/memory figure next to the CSV.")
@click.pass_context
def command(ctx, **opts):
    """Time the token mixers alone at each resolution's sequence length L: the selective scan (one
    direction and Vim's pair) against attention, and Vim's mixer layer against DeiT's attention block,
    for the widths of the --models given (Vim models run the scan ops, DeiT models the attention ops).

    One CSV row per (op, backend, model, resolution), each measured in its own worker; prints a table,
    the fitted exponents in L and the crossovers.
    """
    device = resolve_device(opts["device_spec"])
    dtype = DTYPES[opts["dtype"]]
    for name, value, low in (("--batch", opts["batch"], 1), ("--repeats", opts["repeats"], 1),
                             ("--min-time", opts["min_time"], 0), ("--threads", opts["threads"], 0)):
        if value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    res_list = resolutions(opts["res_spec"])
    models = comma_list(opts["models_spec"])
    if not models:
        raise InputError("no models to run")
    for model in models:
        family = model_entry(model).family
        if family not in ("vim", "deit"):
            raise InputError(f"{model} is a {family} model; kernels takes Vim and DeiT models")
    impls = {"scan": scan_impls(opts["scan_spec"], device), "attn": attention_impls(opts["attn_spec"], device, dtype)}
    if opts["resume"] and not opts["out"]:
        raise InputError("--resume needs --out naming the CSV to continue")
    timing = {**CPU_TIMING, "repeats": opts["repeats"], "min_time": opts["min_time"]}
    configs = []
    for res in res_list:
        for model in models:
            geometry = asdict(model_geometry(model, res, opts["batch"]))
            for spec in OPS.values():
                if spec.family != model_entry(model).family:
                    continue
                configs += [dict(op=spec.name, impl=impl, model=model, res=res, batch=opts["batch"],
                                 dtype=opts["dtype"], device=str(device), geometry=geometry,
                                 threads=opts["threads"], timing=timing) for impl in impls[spec.backend]]
    out = opts["out"] or f"results/kernels-{device.type}-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"
    check_writable(out)
    log = CsvLog(out, COLUMNS, resume=opts["resume"])
    ceilings = run_isolated(measure_ceilings, (dict(device=str(device), dtype=opts["dtype"],
                                                    threads=opts["threads"], timing=timing),))
    if ceilings.pop("status") != "ok":
        click.echo(f"warning: measuring the device ceilings failed ({ceilings.pop('error')}); "
                   "frac_peak_* left empty", err=True)
    fixed = {**environment(device), **ceilings, "command": command_line(ctx)}
    rows = run_sweep(configs, log, KEY, lambda cfg: _measure_config(cfg, fixed),
                     lambda cfg: f"{cfg['op']}[{cfg['impl']}] {cfg['model']} L={cfg['geometry']['L']}")
    click.echo(format_table(rows, ["op", "impl", "kernel", "model", "L", "status", "time_ms", "mem_peak_gib",
                                   "gflops_s", "gbs", "frac_peak_flops", "frac_peak_bw"]))
    click.echo(f"wrote {len(rows)} rows to {out}")
    if not any(r.get("status") == "ok" for r in log.rows):
        click.echo("no ok rows: no exponents, crossovers or figure", err=True)
        return
    click.echo(summary(out))
    if opts["plot"]:
        _, df = load_results(out, kinds=("kernel",))
        for path in plot_results("kernel", df, Path(out).parent):
            click.echo(f"wrote {path}")
