"""`vimbench flops`: FLOPs per model and resolution, counted on the meta device (nothing runs)."""
from __future__ import annotations

import click
import torch

from vimbench.commands import options as o
from vimbench.config import FlopsConfig
from vimbench.errors import InputError
from vimbench.kernels.selective_scan.backends import has_backward
from vimbench.measure.env import environment
from vimbench.present.tables import format_table
from vimbench.rows.schema import FLOPS
from vimbench.rows.flops import flops_row
from vimbench.rows.sweep import run_sweep
from vimbench.rows.writer import CsvLog


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
    count(o.command_line(ctx), **opts)


def flops_configs(**opts) -> list[FlopsConfig]:
    """The configurations of ``vimbench flops`` from its options by parameter name: every mode x (model, backend)
    x resolution. InputError for values that cannot be counted (a forward-only scan backend in train mode)."""
    batch = o.batch_for(opts["batch"], torch.device("meta"))
    res_list = o.parse_resolutions(opts["res_spec"])
    modes = o.modes(opts["mode_spec"], opts["grad_checkpointing"])
    pairs = o.variants(opts["models_spec"], opts["attn_spec"], opts["scan_spec"])
    for _, options in pairs:
        scan = options.get("scan")
        if "train" in modes and scan not in (None, "auto") and not has_backward(scan):
            raise InputError(f"--scan {scan}: forward-only (no backward), so no train step: drop train from --mode")
    return [FlopsConfig(m, options, res, batch, head=opts["head"], mode=mode,
                        grad_checkpointing=opts["grad_checkpointing"] and mode == "train")
            for mode in modes for m, options in pairs for res in res_list]


def count(command: str, **opts) -> list[dict]:
    """``vimbench flops``: ``opts`` are the command's options by parameter name (e.g.
    ``{**options.defaults(flops.command), "models_spec": "vim_tiny"}``), ``command`` the command line recorded
    in every row. Writes the CSV (``opts["out"]``, resumed with ``opts["resume"]``), prints its table and
    returns the rows of this run. InputError, before any row is written, for options that cannot be counted."""
    configs = flops_configs(**opts)
    with CsvLog.open(opts["out"] or o.default_out("flops", "meta"), FLOPS, resume=opts["resume"],
                     given=opts["out"] is not None) as log:
        fixed = {**environment(torch.device("cpu")), "command": command}
        rows = run_sweep(configs, log, lambda cfg: flops_row(cfg, fixed),
                         lambda cfg: f"{cfg.model}[{cfg.impl}] {cfg.res}px {cfg.mode}")
        click.echo(format_table(rows, ["model", "impl", "res", "tokens", "batch", "mode", "status", "params",
                                       "flops_total", "flops_scan", "flops_attention", "flops_linear", "flops_other"]))
        click.echo(f"wrote {len(rows)} rows to {log.path}")
        return rows
