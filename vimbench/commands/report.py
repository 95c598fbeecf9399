"""`vimbench report`: a Markdown report (exponents, crossovers, the paper's claim checked) of a scaling CSV."""
from __future__ import annotations

import click

from ..report import write_report
from ..results import load_results
from .plot import check_out_dir


@click.command("report")
@click.argument("results", metavar="RESULTS.csv")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Directory for report.md and the figures it embeds (created if needed).")
def command(results, out_dir):
    """Write DIR/report.md for the scaling CSV RESULTS.csv, with its figures: scaling exponents of
    latency, memory and FLOPs in tokens (95% CI), DeiT's attention share of FLOPs, Vim/DeiT crossovers,
    and the paper's Fig. 1 claims checked against eager and fused-attention DeiT."""
    check_out_dir(out_dir)
    _, df = load_results(results, kinds=("scaling",))
    click.echo(f"wrote {write_report(df, results, out_dir)}")
