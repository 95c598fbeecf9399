"""Click options shared by several commands: the resolution spec and comma-separated lists."""
from __future__ import annotations

import shlex
import sys

import click

from ..configs import model_variants
from ..errors import InputError
from ..resolution import parse_resolutions


def comma_list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def resolutions(value: str) -> list[int]:
    return parse_resolutions(value)


def checked_list(value: str, choices, what: str) -> list[str]:
    """Comma list whose items must all be in ``choices``; InputError naming the first bad one."""
    items = comma_list(value)
    if not items:
        raise InputError(f"empty {what} list")
    for item in items:
        if item not in choices:
            raise InputError(f"unknown {what} {item!r}; choose from {', '.join(choices)}")
    return items


def variants(models_spec: str, attn_spec: str, scan_spec: str) -> list[tuple[str, dict]]:
    """The (model, options) pairs named by --models, --attn and --scan (see ``configs.model_variants``)."""
    return model_variants(comma_list(models_spec), comma_list(attn_spec), comma_list(scan_spec))


res_option = click.option("--res", "res_spec", default="224..1248", show_default=True,
                          help="Resolutions: A..B (step 64), A..B:STEP, comma lists, or a mix.")
models_option = click.option("--models", "models_spec", default="vim_tiny,deit_tiny", show_default=True,
                             help="Comma-separated model names (see `vimbench models`).")


def command_line(ctx: click.Context) -> str:
    """The command line that invoked this command, as recorded in result rows ("vimbench scaling ...")."""
    obj = ctx.find_root().obj or {}
    argv = obj.get("argv", sys.argv[1:])
    return shlex.join(["vimbench", *argv])
