"""`vimbench report`: a Markdown report (exponents, crossovers, the paper's claim checked) of scaling CSVs."""
from __future__ import annotations

from pathlib import Path

import click
import pandas as pd

from vimbench.commands.options import check_out_dir
from vimbench.errors import InputError
from vimbench.present.report import write_report
from vimbench.rows.reader import load_results
from vimbench.rows.validate import plottable


@click.command("report")
@click.argument("results", nargs=-1, required=True, metavar="RESULTS.csv...")
@click.option("--out-dir", default=None, metavar="DIR",
              help="Directory for report.md and its figures [beside the first CSV: <name>-report/].")
def command(results, out_dir):
    """Write DIR/report.md for the scaling CSVs RESULTS.csv (several are read as one, e.g. runs from
    several machines), with its figures: scaling exponents of time, memory and FLOPs in tokens (95% CI),
    DeiT's attention share of FLOPs, Vim/DeiT crossovers, and the paper's Fig. 1 claims checked against
    eager and fused-attention DeiT. A memory CSV among them (`vimbench memory --preset paper`) adds the
    predicted memory of the paper's setting beside Fig. 1 (c). Rows that cannot be drawn or fitted are left
    out, and the report lists them (see vimbench/rows/validate.py)."""
    click.echo(f"wrote {write(results, out_dir)}")


def write(results: list[str], out_dir: str | None = None) -> Path:
    """Writes the report of the CSVs ``results`` (scaling, and optionally memory) into ``out_dir`` (default:
    <first CSV without suffix>-report) and returns the path of its report.md. InputError for a CSV that
    cannot be read or no scaling CSV."""
    scaling, memory, notes = [], [], []
    for path in results:
        kind, df = load_results(path, kinds=("scaling", "memory"))
        df, left_out = plottable(kind, df, Path(path).name)
        (scaling if kind == "scaling" else memory).append(df)
        notes += left_out
    if not scaling:
        raise InputError("RESULTS: no scaling CSV given (a memory CSV only adds to a scaling report)")
    out_dir = out_dir or str(Path(results[0]).with_suffix("")) + "-report"
    check_out_dir(out_dir)
    df = pd.concat(scaling, ignore_index=True)
    mem = pd.concat(memory, ignore_index=True) if memory else None
    return write_report(df, ', '.join(Path(p).name for p in results), out_dir, mem, notes)
