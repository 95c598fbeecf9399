"""`vimbench check-kernels`: compile vimbench's Triton kernels for sm_80 and sm_90 and report registers,
spills and shared memory. Needs no GPU."""
from __future__ import annotations

import dataclasses
import json

import click
import pandas as pd

from vimbench.rows.writer import check_new_file, write_new_file
from vimbench.errors import InputError
from vimbench.count.kernel_compile import ARCHS, CompileRow, compile_report
from vimbench.present.tables import format_table

COLUMNS = [f.name for f in dataclasses.fields(CompileRow)]


@click.command("check-kernels")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the rows as CSV here (must end in .csv).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def command(out, as_json):
    """Compile every configuration the Triton scan launcher uses, ahead of time for sm_80 and sm_90, and
    print registers per thread, spill bytes (cuobjdump STACK) and shared memory per program.

    Exits 1 if any configuration fails to compile or spills registers.
    """
    if out:
        if not out.endswith(".csv"):
            raise InputError(f"--out must name a .csv file, got {out}")
        check_new_file(out)
    rows = [dataclasses.asdict(r) for r in compile_report(ARCHS)]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        click.echo(format_table(rows, COLUMNS))
    if out:
        write_new_file(out, pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
        click.echo(f"wrote {len(rows)} rows to {out}", err=as_json)
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        click.echo(f"{len(bad)} of {len(rows)} kernel configurations failed or spilled", err=True)
        return 1
    return 0
