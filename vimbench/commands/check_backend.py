"""`vimbench check-backend`: a scan backend against the sequential reference, the check every timing runs first."""
from __future__ import annotations

import click
import torch

from vimbench.commands import options as o
from vimbench.errors import BackendUnavailable, InputError
from vimbench.kernels.selective_scan import check_scan_backend
from vimbench.kernels.selective_scan.check import CASES, GRAD_TOLERANCES, TOLERANCES
from vimbench.measure.verify import run_check


@click.command("check-backend")
@click.argument("name")
@o.device_option
def command(name, device_spec):
    """Check scan backend NAME (a built-in or a plug-in's) against the sequential reference `ref`, computed
    in float64 from the same inputs, on the awkward shapes vimbench checks before any timing: L = 1, odd L,
    several chunks, E not a multiple of 32, groups G = 2 and 4, N not a power of two, with and without D, z,
    delta_bias and softplus, the last state too; fp32 and bf16, with the project's tolerance table. Then its
    gradients (every input's, of one direction and of the bidirectional pair) against float64 autograd of
    `ref` on the same cases, the check every train timing runs first; a backend without a backward is named
    forward-only.

    The check runs in a worker process, bounded by VIMBENCH_CHECK_TIMEOUT_S seconds (default 1800): a backend
    that hangs, exits, or crashes the interpreter fails the check with one line naming it and its package.

    Exit 0 when every case is within tolerance (or the backend is forward-only and its forward passed); 1 with
    the first failing case (shape, dtype, worst error) or what stopped the check (a wrong return type, a
    hang, an exit, a crash); 2 for an unknown or unavailable NAME.
    """
    device = o.resolve_device(device_spec)
    try:
        check_scan_backend(name, device)
    except InputError:  # not the name's fault (a time limit's variable)
        raise
    except (ValueError, BackendUnavailable) as e:
        raise InputError(f"NAME {name}: {e}") from None
    result = run_check(name, device, grads=True)
    if not result["check_ok"]:
        click.echo(f"check-backend: {name} FAILED on {device}: {result['check_failure']}", err=True)
        return 1
    tolerances = ", ".join(f"{str(d).removeprefix('torch.')} rtol {t['rtol']:g} atol {t['atol']:g}"
                           for d, t in TOLERANCES.items() if d in (torch.float32, torch.bfloat16))
    click.echo(f"check-backend: {name} is correct on {device}: {result['checked']} cases "
               f"({len(CASES)} shapes x fp32, bf16 x with/without extras: its scan, then the one direction, the "
               f"bidirectional pair and each layout it is timed with through the entry points) within {tolerances}")
    if result["forward_only"]:
        click.echo(f"check-backend: {result['forward_only']}")
        return 0
    if not result["grad_ok"]:
        click.echo(f"check-backend: {name} gradients FAILED on {device}: {result['grad_failure']}", err=True)
        return 1
    grad_tolerances = ", ".join(f"{str(d).removeprefix('torch.')} {GRAD_TOLERANCES[d]:g}"
                                for d in (torch.float32, torch.bfloat16))
    click.echo(f"check-backend: {name}'s gradients are correct on {device}: {result['grad_checked']} cases (the "
               f"same x one direction, the bidirectional pair) within {grad_tolerances} of each gradient's "
               f"largest value")
    return 0
