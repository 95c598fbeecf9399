"""`vimbench plot`: paper-style figures (PNG at 300 dpi and PDF) from a scaling or kernel CSV."""
from __future__ import annotations

from pathlib import Path

import click

from vimbench.commands.options import check_out_dir
from vimbench.present.figures import plot_results
from vimbench.rows.reader import load_results
from vimbench.rows.validate import plottable


@click.command("plot")
@click.argument("results", metavar="RESULTS.csv")
@click.option("--out-dir", default=None, metavar="DIR", help="Directory for the figures [beside the CSV].")
def command(results, out_dir):
    """Draw the figures of RESULTS.csv into DIR. A scaling CSV (vimbench scaling) gives
    throughput_memory (Fig. 1 style), flops and loglog; a kernel CSV (vimbench kernels) gives kernels.
    A CSV with several settings (device, dtype, batch, head or width) gets one set per setting, named
    <figure>-<setting>. Rows that cannot be drawn (an infinite, zero or negative time, a setting value that is
    not a plain name, ...) are left out with a note (see vimbench/rows/validate.py)."""
    paths, notes = draw(results, out_dir)
    for p in paths:
        click.echo(f"wrote {p}")
    for note in notes:
        click.echo(f"note: {note}")


def draw(results: str, out_dir: str | None = None) -> tuple[list[Path], list[str]]:
    """Draws the figures of the scaling or kernel CSV ``results`` into ``out_dir`` (default: beside the CSV):
    (their paths, notes on the rows left out). InputError for a CSV that cannot be read or an unusable folder."""
    kind, df = load_results(results, kinds=("scaling", "kernels"))
    df, notes = plottable(kind, df, results)
    out_dir = out_dir or str(Path(results).parent)
    check_out_dir(out_dir)
    return plot_results(kind, df, out_dir), notes
