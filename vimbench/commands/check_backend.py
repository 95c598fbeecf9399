"""`vimbench check-backend`: a scan backend against the sequential reference, the check every timing runs first."""
from __future__ import annotations

import click
import torch

from vimbench.commands import options as o
from vimbench.errors import BackendUnavailable, InputError
from vimbench.kernels.selective_scan import check_scan_backend
from vimbench.kernels.selective_scan.check import CASES, TOLERANCES, check_named_backend


@click.command("check-backend")
@click.argument("name")
@o.device_option
def command(name, device_spec):
    """Check scan backend NAME (a built-in or a plug-in's) against the sequential reference `ref`, computed
    in float64 from the same inputs, on the awkward shapes vimbench checks before any timing: L = 1, odd L,
    several chunks, E not a multiple of 32, groups G = 2 and 4, N not a power of two, with and without D, z,
    delta_bias and softplus, the last state too; fp32 and bf16, with the project's tolerance table.

    Exit 0 when every case is within tolerance; 1 with the first failing case (shape, dtype, worst error).
    """
    device = o.resolve_device(device_spec)
    try:
        check_scan_backend(name, device)
    except (ValueError, BackendUnavailable) as e:
        raise InputError(f"NAME {name}: {e}") from None
    result = check_named_backend(name, str(device))
    if not result["check_ok"]:
        click.echo(f"check-backend: {name} FAILED on {device}: {result['check_failure']}", err=True)
        return 1
    tolerances = ", ".join(f"{str(d).removeprefix('torch.')} rtol {t['rtol']:g} atol {t['atol']:g}"
                           for d, t in TOLERANCES.items() if d in (torch.float32, torch.bfloat16))
    click.echo(f"check-backend: {name} is correct on {device}: {result['checked']} cases "
               f"({len(CASES)} shapes x fp32, bf16 x with/without extras) within {tolerances}")
    return 0
