"""`vimbench gpu-check`: the checks every session with a lent GPU runs, written under results/gpu/."""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from vimbench import gpucheck
from vimbench.errors import InputError
from vimbench.measure.isolation import run_isolated


@click.command("gpu-check")
@click.option("--part", type=click.Choice(["all", *gpucheck.PARTS]), default="all", show_default=True,
              help="Run one part only (each takes a few minutes).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [results/gpu/<card>-<date>].")
def command(part, out_dir):
    """Run the GPU check: CUDA tests of the Triton scan, kernel timings against the card's ceilings,
    the paper-preset scaling sweep with its report, and a summary (see vimbench/gpucheck.py).
    Needs a CUDA GPU; parts already run are resumed, not repeated."""
    if not torch.cuda.is_available():
        raise InputError("gpu-check needs a CUDA GPU; none is available on this machine")
    from vimbench.measure import preflight
    checks = preflight.run_preflight(torch.device("cuda"))  # within seconds, what is missing, before measuring
    click.echo("\n".join(preflight.report_lines(checks)))
    if preflight.failed(checks):
        click.echo(f"gpu-check: preflight failed ({', '.join(c.name for c in preflight.failed(checks))}); "
                   "nothing measured", err=True)
        return 1
    out = Path(out_dir) if out_dir else gpucheck.default_out(torch.cuda.get_device_name(0))
    out.mkdir(parents=True, exist_ok=True)
    from vimbench.commands import main  # each step runs through the CLI entry point, as on the command line
    parts = gpucheck.PARTS if part == "all" else (part,)
    failed = []
    if "tests" in parts:
        result = gpucheck.run_tests(out)
        (out / "tests.json").write_text(json.dumps(result))
        click.echo(f"tests: {result}")
        failed += ["tests"] if result["returncode"] else []
    if "kernels" in parts and not (out / "facts.json").exists():
        facts = run_isolated(gpucheck.device_facts, ())
        if facts.pop("status") == "ok":
            (out / "facts.json").write_text(json.dumps(facts))
        else:
            failed.append(f"device facts ({facts['error']})")
    for p in ("kernels", "scaling"):
        if p in parts:
            for name, argv in gpucheck.plan(p, out):
                click.echo(f"== {name}: vimbench {' '.join(argv)}")
                if main(gpucheck.with_resume(argv)) != 0:
                    failed.append(name)
    if "summary" in parts:
        click.echo(f"wrote {gpucheck.write_summary(out)}")
    if failed:
        click.echo(f"gpu-check: failed: {', '.join(failed)}", err=True)
        return 1
    return 0
