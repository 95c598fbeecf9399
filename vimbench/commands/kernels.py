"""`vimbench kernels`: the token mixers alone, scan against attention at matched sequence lengths, to CSV."""
from __future__ import annotations

from pathlib import Path

import click

from vimbench.analysis.crossovers import kernel_crossovers, kernel_exponents, kernel_floors, matched_times
from vimbench.commands import options as o
from vimbench.errors import InputError
from vimbench.kernels.selective_scan.backends import forward_only
from vimbench.measure.ops import CPU_TIMING, KernelConfig
from vimbench.measure.verify import preamble, preamble_result
from vimbench.models.registry import model_entry
from vimbench.present.figures import plot_results
from vimbench.present.tables import format_table
from vimbench.rows.kernels import kernel_configs, kernel_row, key_columns
from vimbench.rows.reader import load_results, split_settings
from vimbench.rows.schema import KERNELS
from vimbench.rows.sweep import jobs_dir, run_sweep
from vimbench.rows.writer import CsvLog


def summary(path) -> str:
    """Exponents, crossovers and distances from the floor of every setting in the kernel CSV at ``path``."""
    _, df = load_results(path, kinds=("kernels",))
    blocks = []
    for s in split_settings("kernels", df):
        title = ", ".join(f"{k} {v}" for k, v in s.key.items())
        blocks += [f"\n{title}: fitted exponents in tokens (time, memory; whole sweep | upper half, 95% CI)",
                   format_table(kernel_exponents(s), ["op", "impl", "kernel", "n", "k_time", "k_mem"])]
        rows = kernel_crossovers(s)
        blocks += [f"{title}: crossovers (the length from which the Vim op stays faster / lighter)",
                   format_table(rows, ["vim", "attention", "faster_from", "lighter_from"]) if rows
                   else "no Vim op and attention op measured at common lengths"]
        floors = kernel_floors(s)
        if floors:
            capability = s.rows["cpu_capability"].dropna().unique() if "cpu_capability" in s.rows else []
            blocks += [f"{title}: each backend against its floor at its longest sequence (the largest lower bound "
                       f"from the measured matmul rate, copy bandwidth and exp rate"
                       + (f"; CPU capability {'/'.join(map(str, capability))}" if len(capability) else "") + ")",
                       format_table(floors, ["op", "impl", "tokens", "time_ms", "floor_ms", "floor_kind", "x_floor"])]
        matched = matched_times(s)
        if s.key.get("mode") == "train" and matched:
            blocks += [f"{title}: forward + backward at matched lengths (ms; ratio below 1: the Vim op is faster)",
                       format_table(matched, ["vim", "attention", "tokens", "vim_ms", "attention_ms", "ratio"])]
    return "\n".join(blocks)


@click.command("kernels")
@o.model_options
@o.batch_option
@o.dtype_option
@o.compile_option
@o.amp_option
@o.mode_option
@o.device_option
@click.option("--repeats", type=int, default=CPU_TIMING["repeats"], show_default=True,
              help="CPU: at least this many timed calls (GPU: do_bench decides).")
@click.option("--min-time", type=float, default=CPU_TIMING["min_time"], show_default=True,
              help="CPU: ...and at least this many seconds of them.")
@o.threads_option
@o.out_options
@o.launcher_options
@click.option("--plot", is_flag=True, help="Also draw the log-log time/memory figure next to the CSV.")
@click.pass_context
def command(ctx, **opts):
    """Time the token mixers alone at each resolution's sequence length: the selective scan (one
    direction and Vim's pair) against attention, and Vim's mixer layer against DeiT's attention block,
    for the widths of the --models given (Vim models run the scan ops, DeiT models the attention ops).
    --mode train times forward + backward of each op (gradients for every input, and for the layers' weights):
    its FLOPs add the backward (the scan's by its formula, attention's 2.5x its forward), and the scan
    backends' gradients are checked against float64 autograd of ref first (a forward-only backend or one with
    wrong gradients gets error rows for train and no timing).

    One CSV row per (op, backend, model, resolution), each measured in its own worker; prints a table,
    the fitted exponents in tokens, the crossovers and each backend against its floor (the largest lower
    bound on its time from the measured matmul rate, copy bandwidth and, on CPU, the compiled scan's exp
    rate; frac_floor in the CSV). The scan backends' correctness checks and the device's ceilings (on CPU with
    the exp rate) run first, as one job where the configurations run (--device and --launcher as for
    `vimbench scaling`). Peers (mambapy's scans, `pip install 'vimbench[peers]'`) are scan backends
    like ours: --scan cpp,mambapy_seq,mambapy_pscan.
    """
    return sweep(o.command_line(ctx), **opts)


def plan(opts: dict) -> tuple:
    """What ``sweep`` runs, from the command's options by parameter name: the launcher (``Plain`` or
    ``Submitit`` of ``vimbench.measure.launchers``), the preamble's job
    (``verify.preamble``: the scan backends to check, device, dtype, threads, timing, grads) and the
    configurations (``rows.kernels.kernel_configs``). InputError for options that cannot run."""
    device, launcher = o.sweep_target(opts)
    batch = o.batch_for(opts["batch"], device)
    o.at_least("--repeats", opts["repeats"], 1)
    o.at_least("--min-time", opts["min_time"], 0)
    o.at_least("--threads", opts["threads"], 0)
    res_list = o.parse_resolutions(opts["res_spec"])
    models = o.comma_list(opts["models_spec"])
    if not models:
        raise InputError("--models: no models given")
    pairs = o.resolved_variants(",".join(models), opts["attn_spec"], opts["scan_spec"], device, opts["dtype"])
    for model in models:
        if model_entry(model).family not in ("vim", "deit"):
            raise InputError(f"--models {model}: a {model_entry(model).family} model; "
                             "kernels takes Vim and DeiT models")
    impls = {"scan": list(dict.fromkeys(p["scan"] for _, p in pairs if "scan" in p)),
             "attn": list(dict.fromkeys(p["attn"] for _, p in pairs if "attn" in p))}
    timing = {**CPU_TIMING, "repeats": opts["repeats"], "min_time": opts["min_time"]}
    regimes = o.regimes(opts["compile_spec"], opts["amp_spec"], opts["dtype"])
    modes = o.modes(opts["mode_spec"], opts["grad_checkpointing"])
    if opts["grad_checkpointing"]:
        raise InputError("--grad-checkpointing applies to a model's train step (vimbench scaling), not to single ops")
    configs = kernel_configs(models, res_list, impls, batch, opts["dtype"], device, opts["threads"], timing, regimes,
                             modes)
    job = dict(scans=impls["scan"], device=str(device), dtype=opts["dtype"], threads=opts["threads"], timing=timing,
               grads="train" in modes)
    return launcher, job, configs


def sweep(command: str, **opts) -> int:
    """The sweep of ``vimbench kernels``: ``opts`` are the command's options by parameter name (e.g.
    ``{**options.defaults(command), "models_spec": ...}``), ``command`` the command line recorded in every
    row. Writes the CSV (``opts["out"]``, resumed with ``opts["resume"]``), prints the rows, exponents and
    crossovers. Returns 1 when a scan backend failed its check (its rows are errors), else 0. InputError,
    before any row is written, for options that cannot run."""
    launcher, job, configs = plan(opts)
    with CsvLog.open(opts["out"] or o.default_out("kernels", job["device"]), KERNELS, resume=opts["resume"],
                     given=opts["out"] is not None) as log:
        click.echo(f"{launcher.name}: checking the scan backends and measuring the device's ceilings first", err=True)
        pre = preamble_result(launcher.run_job(preamble, job, jobs_dir(log)), job["scans"])
        for line in pre["passed"]:
            click.echo(line, err=True)
        if pre["warning"]:
            click.echo(f"warning: {pre['warning']}", err=True)
        failed, fixed = pre["failed"], {**pre["ceilings"], "command": command}
        # decided here, not in the jobs (a job's process may not have a plug-in's registration)
        train_only = {impl for impl, why in failed.items()
                      if why.startswith("gradient check failed") or why == forward_only(impl)}

        def row(cfg: KernelConfig) -> dict:
            # correctness gates speed: no timing for a backend that failed its check (a forward-only backend or
            # wrong gradients fail its train rows only)
            why = failed.get(cfg.impl)
            if why and (cfg.mode == "train" or cfg.impl not in train_only):
                return {**key_columns(cfg), **fixed, "status": "error", "error": why}
            return kernel_row(cfg, fixed)

        rows = run_sweep(configs, log, row, lambda cfg: f"{cfg.op}[{cfg.impl}] {cfg.model} L={cfg.geometry.L}"
                                                        f"{o.regime_label(key_columns(cfg))}", launcher)
        return report(log, rows, failed, opts["plot"])


def report(log: CsvLog, rows: list[dict], failed: dict[str, str], plot: bool) -> int:
    """Prints the rows a sweep wrote to ``log``, then (with an ok row) its ``summary`` and, with ``plot``, its
    figure. Returns 1 when a scan backend failed its check (``failed``: {backend: why}), else 0."""
    click.echo(format_table(rows, ["op", "impl", "kernel", "mode", "compile", "amp", "model", "tokens", "status",
                                   "time_ms", "compile_s", "graph_breaks", "mem_peak_gib", "gflops_s", "gbs",
                                   "frac_peak_flops", "frac_peak_bw", "frac_floor"]))
    click.echo(f"wrote {len(rows)} rows to {log.path}")
    if failed:
        click.echo(f"kernels: no timing for {', '.join(failed)}: {'; '.join(failed.values())}", err=True)
    if not any(r.get("status") == "ok" for r in log.rows):
        click.echo("no ok rows: no exponents, crossovers or figure", err=True)
        return 1 if failed else 0
    click.echo(summary(log.path))
    if plot:
        _, df = load_results(log.path, kinds=("kernels",))
        for path in plot_results("kernels", df, Path(log.path).parent):
            click.echo(f"wrote {path}")
    return 1 if failed else 0
