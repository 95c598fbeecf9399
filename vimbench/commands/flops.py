"""`vimbench flops`: FLOPs per model and resolution, counted on the meta device (nothing runs)."""
from __future__ import annotations

import click
import torch

from vimbench.commands import options as o
from vimbench.count.flops import count_flops
from vimbench.errors import InputError
from vimbench.kernels.selective_scan.backends import has_backward
from vimbench.measure.env import environment
from vimbench.models.registry import impl_of, model_entry
from vimbench.present.tables import format_table
from vimbench.rows.schema import FLOPS
from vimbench.rows.sweep import computed_row, run_sweep
from vimbench.rows.writer import CsvLog


def counted(cfg: dict) -> dict:
    """``count_flops`` of a configuration: the FLOP columns, params and tokens."""
    return count_flops(cfg["model"], cfg["res"], cfg["batch"], cfg["head"], cfg["mode"], cfg["grad_checkpointing"],
                       **cfg["options"])


@click.command("flops")
@o.model_options
@o.batch_option
@o.head_option
@o.mode_option
@o.out_options
@click.pass_context
def command(ctx, **opts):
    """Count FLOPs (2 per multiply-add; scan formula in docs/conventions.md) of each model at each resolution,
    on the meta device: no real tensors are allocated, six models x 17 resolutions take seconds. FLOPs do
    not depend on the backend; --attn and --scan only name the rows. --mode train counts a train step's
    forward and backward (with --grad-checkpointing, the blocks' recomputed forwards too); the loss and the
    optimizer step are elementwise and uncounted (vimbench.count.flops)."""
    device = torch.device("meta")
    batch = o.batch_for(opts["batch"], device)
    res_list = o.parse_resolutions(opts["res_spec"])
    modes = o.modes(opts["mode_spec"], opts["grad_checkpointing"])
    pairs = o.variants(opts["models_spec"], opts["attn_spec"], opts["scan_spec"])
    for _, options in pairs:
        scan = options.get("scan")
        if "train" in modes and scan not in (None, "auto") and not has_backward(scan):
            raise InputError(f"--scan {scan}: forward-only (no backward), so no train step: drop train from --mode")
    configs = [dict(model=m, family=model_entry(m).family, options=options, impl=impl_of(options), res=res,
                    batch=batch, head=opts["head"], mode=mode,
                    grad_checkpointing=opts["grad_checkpointing"] and mode == "train")
               for mode in modes for m, options in pairs for res in res_list]
    log = ctx.with_resource(CsvLog.open(opts["out"] or o.default_out("flops", device), FLOPS,
                                        resume=opts["resume"], given=opts["out"] is not None))
    fixed = {**environment(torch.device("cpu")), "command": o.command_line(ctx)}
    rows = run_sweep(configs, log, lambda cfg: computed_row(FLOPS, cfg, fixed, lambda: counted(cfg)),
                     lambda cfg: f"{cfg['model']}[{cfg['impl']}] {cfg['res']}px {cfg['mode']}")
    click.echo(format_table(rows, ["model", "impl", "res", "tokens", "batch", "mode", "status", "params", "flops_total",
                                   "flops_scan", "flops_attention", "flops_linear", "flops_other"]))
    click.echo(f"wrote {len(rows)} rows to {log.path}")
