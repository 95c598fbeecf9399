"""The ``vimbench`` command line: a thin Click group; each command lives in its own module here.

Bad input anywhere (an ``InputError`` or a Click usage error) is reported on one line on stderr with
exit code 2, never as a traceback; Ctrl-C on one line with exit code 130.
"""
from __future__ import annotations

import sys

import click

from vimbench.errors import InputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vimbench")
def cli():
    """vimbench: Vision Mamba vs DeiT, throughput, memory, FLOPs and scan-vs-attention scaling."""


def main(argv=None) -> int:
    """Console entry point: runs ``cli`` and turns bad input into one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if a in cli.commands), None)
    prefix = f"vimbench {name}" if name else "vimbench"
    try:
        with cli.make_context("vimbench", argv, obj={"argv": argv}) as ctx:
            rv = cli.invoke(ctx)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except click.exceptions.Abort:
        click.echo(f"{prefix}: aborted", err=True)
        return 130
    except KeyboardInterrupt as e:  # Ctrl-C; a sweep's ``Interrupted`` says where its rows are
        click.echo(f"{prefix}: {e or 'interrupted'}", err=True)
        return 130
    except (click.UsageError, click.BadParameter, InputError) as e:
        message = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"{prefix}: error: {' '.join(message.split())}", err=True)
        return 2


def _register():
    # One line per command module; each defines a Click command named after its module.
    from vimbench.commands import (check_backend, check_kernels, flops, gate, gpu_check, kernels, memory, models, plot,
                                   report, scaling)
    for module in (models, flops, scaling, check_kernels, check_backend, plot, report, memory, kernels, gate,
                   gpu_check):
        cli.add_command(module.command)


_register()
