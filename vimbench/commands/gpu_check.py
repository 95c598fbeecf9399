"""`vimbench gpu-check`: the GPU checks by priority within a time budget, packed into one archive (the work is
``vimbench.gpucheck.run.check_gpu``)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import click
import torch

from vimbench.commands import kernels, options as o, plot, report, scaling
from vimbench.errors import InputError
from vimbench.gpucheck import archive as gpu_archive, run
from vimbench.gpucheck.steps import started
from vimbench.measure import preflight


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
    Steps cut short are resumed when run again into the same folder (see vimbench/gpucheck/steps.py).

    \b
    On a rented GPU, 7 minutes:  vimbench gpu-check --budget 420 --archive gpu.tar.gz
    Back home, in a checkout:    vimbench gpu-check --unpack gpu.tar.gz
    """
    if unpack_archive:
        if budget is not None or archive or out_dir:
            raise click.UsageError("--unpack takes no other option")
        click.echo(f"unpacked into {gpu_archive.unpack(unpack_archive)}; indexed in results/README.md")
        return 0
    began = time.monotonic()  # the budget counts from here: planning and the summary spend it too
    archive_path = gpu_archive.check_archive_path(archive) if archive else None
    if not torch.cuda.is_available():
        raise InputError("gpu-check needs a CUDA GPU; none is available on this machine")
    checks = preflight.run_preflight(torch.device("cuda"))  # within seconds, what is missing, before measuring
    click.echo("\n".join(preflight.report_lines(checks)))
    if preflight.failed(checks):
        click.echo(f"gpu-check: preflight failed ({', '.join(c.name for c in preflight.failed(checks))}); "
                   "nothing measured", err=True)
        return 1
    card = torch.cuda.get_device_name(0)
    out = Path(out_dir) if out_dir else run.default_out(card)
    return run.check_gpu(out, budget, archive_path, o.command_line(ctx), echo=click.echo, start=began,
                         call=call_command)


def call_command(name: str, options: dict, command: str) -> int:
    """Runs the vimbench command ``name`` (scaling, kernels, report or plot) through the function under it, with
    ``options`` by parameter name: a gpu-check step's call (``vimbench.gpucheck.steps.Caller``). A sweep starts
    from the command's defaults, resumes its CSV when it has rows (``started``) and records ``command`` in its
    rows. Returns the exit code the command would give; 2, with the reason on stderr, for bad input."""
    sweeps = {"scaling": scaling, "kernels": kernels}
    try:
        if name in sweeps:
            module = sweeps[name]
            opts = {**o.defaults(module.command), **options, "resume": started(options["out"])}
            code = module.sweep(command, **opts)
            return code if name == "kernels" else 0  # scaling returns its rows; kernels 1 after a failed check
        {"report": report.write, "plot": plot.draw}[name](**options)
        return 0
    except InputError as e:
        click.echo(f"vimbench {name}: error: {e}", err=True)
        return 2
