"""`vimbench scaling`: the resolution sweep (throughput, memory, FLOPs) of Vim vs DeiT to CSV."""
from __future__ import annotations

import click

from vimbench.commands import options as o
from vimbench.measure.model import DEFAULT_TIMING
from vimbench.rows.scaling import scaling_row
from vimbench.models.registry import impl_of, model_entry
from vimbench.present.tables import format_table
from vimbench.rows.schema import SCALING
from vimbench.rows.sweep import run_sweep
from vimbench.rows.writer import CsvLog


@click.command("scaling")
@o.model_options
@o.batch_option
@o.dtype_option
@o.compile_option
@o.amp_option
@o.device_option
@click.option("--warmup", type=int, default=None, help="Untimed forwards first [5 on GPU, 1 on CPU].")
@click.option("--repeats", type=int, default=None, help="At least this many timed forwards [20 GPU, 3 CPU].")
@click.option("--min-time", type=float, default=None, help="...and at least this many seconds of them [1.0].")
@o.threads_option
@o.head_option
@o.out_options
@o.preset_option
@o.launcher_options
@click.option("--backoff", is_flag=True, help="On OOM retry with a smaller batch; the batch that ran is recorded.")
@click.pass_context
def command(ctx, preset, **opts):
    """Sweep resolutions for each model and backend; one CSV row per configuration, written as it finishes.

    Each configuration runs in its own worker process: an OOM or crash is recorded as a row with status
    oom or error and the sweep goes on. --device cuda:0,cuda:1 (or cuda:all) runs one configuration per
    GPU at a time; --launcher local or slurm runs each as a submitit job (Slurm: one job array).
    """
    opts = o.apply_preset(ctx, preset, opts)
    device, launcher = o.sweep_target(opts)
    batch = o.batch_for(opts["batch"], device)
    timing = {k: opts[k] if opts[k] is not None else v for k, v in DEFAULT_TIMING[device.type].items()}
    for name, low in (("warmup", 0), ("repeats", 1), ("min_time", 0)):
        o.at_least(f"--{name.replace('_', '-')}", timing[name], low)
    o.at_least("--threads", opts["threads"], 0)
    res_list = o.parse_resolutions(opts["res_spec"])
    regimes = o.regimes(opts["compile_spec"], opts["amp_spec"], opts["dtype"])
    pairs = o.resolved_variants(opts["models_spec"], opts["attn_spec"], opts["scan_spec"], device, opts["dtype"])
    configs = [dict(model=model, family=model_entry(model).family, options=options, impl=impl_of(options),
                    res=res, batch_requested=batch, dtype=opts["dtype"], mode="infer", compile=compile_mode, amp=amp,
                    device=str(device), head=opts["head"], threads=opts["threads"], **timing)
               for compile_mode, amp in regimes for model, options in pairs for res in res_list]
    log = CsvLog.open(opts["out"] or o.default_out("scaling", device), SCALING, resume=opts["resume"],
                      given=opts["out"] is not None)
    fixed, backoff = {"command": o.command_line(ctx)}, opts["backoff"]
    rows = run_sweep(configs, log, lambda cfg: scaling_row(cfg, fixed, backoff),
                     lambda cfg: f"{cfg['model']}[{cfg['impl']}] {cfg['res']}px b{cfg['batch_requested']}"
                                 f"{o.regime_label(cfg)}", launcher)
    click.echo(format_table(rows, ["model", "impl", "compile", "amp", "res", "batch", "status", "throughput_img_s",
                                   "time_ms", "compile_s", "graph_breaks", "mem_peak_gib", "flops_total"]))
    click.echo(f"wrote {len(rows)} rows to {log.path}")
