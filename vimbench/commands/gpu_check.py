"""`vimbench gpu-check`: the GPU checks by priority within a time budget, packed into one archive."""
from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import click
import torch

from vimbench.gpucheck import archive as gpucheck_archive, steps as gpucheck_steps, summary as gpucheck
from vimbench.commands.options import command_line
from vimbench.errors import InputError
from vimbench.measure import preflight
from vimbench.measure.env import environment


def _finite(budget):
    if budget is not None and not math.isfinite(budget):
        raise click.BadParameter(f"{budget} is not a finite number of seconds", param_hint="'--budget'")
    return budget


@click.command("gpu-check")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              callback=lambda ctx, param, v: _finite(v),
              help="Stop starting steps whose estimate would overrun this many seconds [no limit].")
@click.option("--archive", default=None, metavar="PATH",
              help="Also pack every output into PATH (.tar.gz), at the end, when the budget is spent or "
                   "when interrupted.")
@click.option("--unpack", "unpack_archive", default=None, metavar="ARCHIVE",
              help="Instead: put an archive's results under results/gpu/<card>-<date>/ of this checkout.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [results/gpu/<card>-<date>].")
@click.pass_context
def command(ctx, budget, archive, unpack_archive, out_dir):
    """Check a CUDA GPU, most important answers first: the scan kernels' correctness on the card, the
    paper's Vim-Ti vs DeiT-Ti setting with its claim check, the Triton scan against its floor, the wider
    kernel sweeps, figures. With --budget, a step starts only if its time estimate fits what is left; the
    summary records each step's estimate and actual time. If a correctness check fails, no timing follows.
    Steps cut short are resumed when run again into the same folder (see vimbench/gpucheck_steps.py).

    \b
    On a rented GPU, 7 minutes:  vimbench gpu-check --budget 420 --archive gpu.tar.gz
    Back home, in a checkout:    vimbench gpu-check --unpack gpu.tar.gz
    """
    if unpack_archive:
        if budget is not None or archive or out_dir:
            raise click.UsageError("--unpack takes no other option")
        click.echo(f"unpacked into {gpucheck_archive.unpack(unpack_archive)}; indexed in results/README.md")
        return 0
    started = time.monotonic()  # the budget counts from here: planning and the summary spend it too
    archive_path = gpucheck_archive.check_archive_path(archive) if archive else None
    if not torch.cuda.is_available():
        raise InputError("gpu-check needs a CUDA GPU; none is available on this machine")
    checks = preflight.run_preflight(torch.device("cuda"))  # within seconds, what is missing, before measuring
    click.echo("\n".join(preflight.report_lines(checks)))
    if preflight.failed(checks):
        click.echo(f"gpu-check: preflight failed ({', '.join(c.name for c in preflight.failed(checks))}); "
                   "nothing measured", err=True)
        return 1
    card, today = torch.cuda.get_device_name(0), datetime.date.today()
    out = Path(out_dir) if out_dir else gpucheck.default_out(card, today)
    out.mkdir(parents=True, exist_ok=True)
    from vimbench.commands import main  # each step's command line runs through the CLI entry point
    code = 1
    try:
        with gpucheck_steps.sigterm_raises():
            gpucheck_archive.write_environment(out, {**environment(torch.device("cuda:0")),
                                                     "command": command_line(ctx), "budget_s": budget}, "start")
            steps = gpucheck_steps.build_steps(out)
            chosen, left_out = gpucheck_steps.plan(steps, budget)
            click.echo(f"plan: {', '.join(f'{s.name} ~{s.estimate_s:.0f} s' for s in chosen) or 'nothing fits'}"
                       + (f"; no budget for: {', '.join(s.name for s in left_out)}" if left_out else ""))
            records = gpucheck_steps.run_steps(steps, budget, main, out / "steps.jsonl", echo=click.echo,
                                               start=started)
        code = 1 if any(r["status"] in ("failed", "skipped") for r in records) else 0
    except KeyboardInterrupt:
        code = 130
    except gpucheck_steps.Terminated:
        code = 143
    finally:
        _wrap_up(out, archive_path, gpucheck_archive.archive_name(card, today))
    if code in (130, 143):
        click.echo(f"gpu-check: interrupted; summary{' and archive' if archive_path else ''} written", err=True)
    return code


def _wrap_up(out: Path, archive_path: Path | None, top: str) -> None:
    """The summary, then the archive: a summary that fails to write is reported and the archive still made."""
    try:
        gpucheck_archive.write_environment(out, {}, "end")
        click.echo(f"wrote {gpucheck.write_summary(out)}")
    except Exception as e:  # the archive of the results matters more than their summary
        click.echo(f"gpu-check: the summary failed: {type(e).__name__}: {e}", err=True)
    if archive_path:
        click.echo(f"wrote {gpucheck_archive.write_archive(out, archive_path, top)}; bring it home and run "
                   f"`vimbench gpu-check --unpack {archive_path.name}` in your checkout")
