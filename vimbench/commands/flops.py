"""`vimbench flops`: FLOPs per model and resolution, counted on the meta device (nothing runs)."""
from __future__ import annotations

import click
import pandas as pd

from ..configs import impl_of
from ..csvlog import check_writable
from ..errors import InputError
from ..flops import count_flops
from ..table import format_table
from ._options import models_option, res_option, resolutions, variants

COLUMNS = ["model", "impl", "res", "tokens", "batch", "head", "params", "flops_total", "flops_scan",
           "flops_attention", "flops_linear", "flops_other"]


@click.command("flops")
@models_option
@res_option
@click.option("--batch", default=1, show_default=True, type=int, help="Images per forward.")
@click.option("--attn", "attn_spec", default="eager", show_default=True,
              help="Attention backend(s) for DeiT models (FLOPs do not depend on it).")
@click.option("--scan", "scan_spec", default="auto", show_default=True,
              help="Scan backend(s) for Vim models (FLOPs do not depend on it).")
@click.option("--head/--no-head", default=False, show_default=True,
              help="Count the classifier head too (default: backbone only, as the Vim paper timed).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the table as CSV here.")
def command(models_spec, res_spec, batch, attn_spec, scan_spec, head, out):
    """Count FLOPs (2 per multiply-add; scan formula in the README) of each model at each resolution,
    on the meta device: no real tensors are allocated, six models x 17 resolutions take seconds."""
    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    res_list = resolutions(res_spec)
    pairs = variants(models_spec, attn_spec, scan_spec)
    if out:
        check_writable(out)
    rows = []
    for model, options in pairs:
        for res in res_list:
            rows.append({"model": model, "impl": impl_of(options), "res": res, "batch": batch, "head": head,
                         **count_flops(model, res, batch, head, **options)})
    click.echo(format_table(rows, COLUMNS))
    if out:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(out, index=False)
        click.echo(f"wrote {len(rows)} rows to {out}")
