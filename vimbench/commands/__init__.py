"""The ``vimbench`` command line: a thin Click group; each command lives in its own module here.

Bad input anywhere (an ``InputError`` or a Click usage error) is reported on one line on stderr with
exit code 2, never as a traceback.
"""
from __future__ import annotations

import sys

import click

from ..errors import InputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vimbench")
def cli():
    """vimbench: Vision Mamba vs DeiT, throughput, memory, FLOPs and scan-vs-attention scaling."""


def main(argv=None) -> int:
    """Console entry point: runs ``cli`` and turns bad input into one line and exit code 2."""
    try:
        rv = cli.main(args=argv, prog_name="vimbench", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Abort:
        click.echo("vimbench: aborted", err=True)
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    except (click.UsageError, InputError) as e:
        cmd = f" {e.ctx.command.name}" if getattr(e, "ctx", None) and e.ctx.command.name != "cli" else ""
        click.echo(f"vimbench{cmd}: error: {e.format_message() if isinstance(e, click.ClickException) else e}",
                   err=True)
        return 2


def _register():
    # One line per command module; each defines a Click command named after its module.
    from . import check_kernels, flops, models
    for module in (models, flops, check_kernels):
        cli.add_command(module.command)


_register()
