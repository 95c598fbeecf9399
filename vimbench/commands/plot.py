"""`vimbench plot`: paper-style figures (PNG at 300 dpi and PDF) from a scaling or kernel CSV."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from ..plotting import plot_results
from ..results import load_results


def check_out_dir(out_dir: str) -> None:
    """InputError unless ``out_dir`` is a directory or can become one."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out {out_dir} exists and is not a directory")


@click.command("plot")
@click.argument("results", metavar="RESULTS.csv")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Directory for the figures (created if needed).")
def command(results, out_dir):
    """Draw the figures of RESULTS.csv into DIR. A scaling CSV (vimbench scaling) gives
    throughput_memory (Fig. 1 style), flops and loglog; a kernel CSV (vimbench kernels) gives kernels.
    A CSV with several settings (device, dtype, batch, head or width) gets one set per setting, named
    <figure>-<setting>."""
    check_out_dir(out_dir)
    kind, df = load_results(results)
    paths = plot_results(kind, df, out_dir)
    for p in paths:
        click.echo(f"wrote {p}")
