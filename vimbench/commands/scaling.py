"""`vimbench scaling`: the resolution sweep (throughput, memory, FLOPs) of Vim vs DeiT to CSV."""
from __future__ import annotations

import math

import click
import torch

from vimbench.commands import options as o
from vimbench.config import DEFAULT_TIMING, ScalingConfig
from vimbench.errors import InputError
from vimbench.kernels.selective_scan.backends import forward_only
from vimbench.measure.core import memory_available_gib
from vimbench.measure.train import GradCheckpointingUnsupported, enable_grad_checkpointing
from vimbench.measure.verify import check_scans
from vimbench.rows.scaling import MEM_LIMIT_FRACTION, scaling_row
from vimbench.models.registry import create_model
from vimbench.present.tables import format_table
from vimbench.rows.schema import SCALING
from vimbench.rows.sweep import run_sweep
from vimbench.rows.writer import CsvLog


@click.command("scaling")
@o.model_options
@o.batch_option
@o.dtype_option
@o.compile_option
@o.amp_option
@o.mode_option
@o.device_option
@click.option("--warmup", type=int, default=None, help="Untimed forwards first [5 on GPU, 1 on CPU].")
@click.option("--repeats", type=int, default=None, help="At least this many timed forwards [20 GPU, 3 CPU].")
@click.option("--min-time", type=float, default=None, help="...and at least this many seconds of them [1.0].")
@o.threads_option
@o.head_option
@o.out_options
@o.preset_option
@o.launcher_options
@click.option("--backoff", is_flag=True, help="On OOM retry with a smaller batch; the batch that ran is recorded.")
@click.option("--max-batch", is_flag=True,
              help="Find the largest batch that fits (doubling, then bisection; each try in its own worker) and "
                   "measure it; instead of --batch.")
@click.option("--mem-limit-gib", type=float, default=None,
              help=f"--max-batch on CPU: a batch fits while the resident memory its call adds stays under this "
                   f"[{MEM_LIMIT_FRACTION:g} x MemAvailable].")
@click.pass_context
def command(ctx, preset, **opts):
    """Sweep resolutions for each model and backend; one CSV row per configuration, written as it finishes.

    Each configuration runs in its own worker process: an OOM or crash is recorded as a row with status
    oom or error and the sweep goes on. --device cuda:0,cuda:1 (or cuda:all) runs one configuration per
    GPU at a time; --launcher local or slurm runs each as a submitit job (Slurm: one job array).
    """
    if opts["max_batch"] and opts["batch"] is not None:
        raise InputError("--max-batch finds the batch itself: drop --batch")
    sweep(o.command_line(ctx), **o.apply_preset(ctx, preset, opts))


def sweep(command: str, **opts) -> list[dict]:
    """The sweep of ``vimbench scaling``: ``opts`` are the command's options by parameter name (a preset
    applied, e.g. ``{**options.defaults(command), **PAPER_SETTING_OPTIONS}``), ``command`` the command line
    recorded in every row. Writes the CSV (``opts["out"]``, resumed with ``opts["resume"]``) and returns the
    rows of this run. InputError, before any row is written, for options that cannot run."""
    device, launcher = o.sweep_target(opts)
    configs = scaling_configs(device, **opts)
    with CsvLog.open(opts["out"] or o.default_out("scaling", device), SCALING, resume=opts["resume"],
                     given=opts["out"] is not None) as log:
        fixed, backoff = {"command": command}, opts["backoff"]
        # correctness gates training speed: each scan backend a Vim train row runs has its forward and its gradients
        # checked against float64 autograd of ref first (each in a worker); one that fails gets error rows, no timing
        trained_scans = sorted({c.impl for c in configs if c.mode == "train" and c.family == "vim"})
        failed = check_scans(trained_scans, device, click.echo, grads=True)

        def run_one(cfg: ScalingConfig) -> dict:
            why = failed.get(cfg.impl) if cfg.mode == "train" and cfg.family == "vim" else None
            return {**fixed, "status": "error", "error": why} if why else scaling_row(cfg, fixed, backoff)

        rows = run_sweep(configs, log, run_one,
                         lambda cfg: f"{cfg.model}[{cfg.impl}] {cfg.res}px b{cfg.batch or 'max'}"
                                     f"{o.regime_label(cfg.columns())}", launcher)
        click.echo(format_table(rows, ["model", "impl", "mode", "compile", "amp", "res", "batch", "status",
                                       "throughput_img_s", "time_ms", "compile_s", "graph_breaks", "mem_peak_gib",
                                       "flops_total"]))
        click.echo(f"wrote {len(rows)} rows to {log.path}")
        return rows


def scaling_configs(device: torch.device, **opts) -> list[ScalingConfig]:
    """The configurations of ``vimbench scaling`` on ``device`` (``options.sweep_target``) from its options by
    parameter name (a preset applied): every mode x regime x (model, backend) x resolution, with the batch,
    timing and memory bound defaulted for the device. InputError for values that cannot run."""
    batch = 0 if opts["max_batch"] else o.batch_for(opts["batch"], device)
    mem_limit = mem_limit_gib(opts["max_batch"], opts["mem_limit_gib"], device)
    modes = o.modes(opts["mode_spec"], opts["grad_checkpointing"])
    timing = {k: opts[k] if opts[k] is not None else v for k, v in DEFAULT_TIMING[device.type].items()}
    for name, low in (("warmup", 0), ("repeats", 1), ("min_time", 0)):
        o.at_least(f"--{name.replace('_', '-')}", timing[name], low)
    o.at_least("--threads", opts["threads"], 0)
    res_list = o.parse_resolutions(opts["res_spec"])
    regimes = o.regimes(opts["compile_spec"], opts["amp_spec"], opts["dtype"])
    pairs = o.resolved_variants(opts["models_spec"], opts["attn_spec"], opts["scan_spec"], device, opts["dtype"])
    if "train" in modes:
        check_trainable(pairs, res_list[0], opts["grad_checkpointing"])
    return [ScalingConfig(model, options, res, batch, opts["dtype"], opts["head"], mode,
                          opts["grad_checkpointing"] and mode == "train", compile_mode, amp, str(device),
                          opts["threads"], mem_limit_gib=mem_limit, **timing)
            for mode in modes for compile_mode, amp in regimes for model, options in pairs for res in res_list]


def mem_limit_gib(max_batch: bool, given: float | None, device: torch.device) -> float | None:
    """The CPU memory bound of --max-batch (GiB): --mem-limit-gib, else ``MEM_LIMIT_FRACTION`` of the memory
    available now; None on a GPU (its own memory bounds the search). InputError for --mem-limit-gib without
    --max-batch, on a GPU, or not positive."""
    if given is None:
        return memory_available_gib() * MEM_LIMIT_FRACTION if max_batch and device.type == "cpu" else None
    if not max_batch or device.type != "cpu":
        raise InputError("--mem-limit-gib bounds the --max-batch search on CPU: add --max-batch, --device cpu")
    if not (math.isfinite(given) and given > 0):
        raise InputError(f"--mem-limit-gib must be a positive number, got {given}")
    return given


def check_trainable(pairs: list[tuple[str, dict]], res: int, grad_checkpointing: bool) -> None:
    """InputError, before any work, for a --mode train variant that cannot train: a scan backend without a
    backward (``forward_only``: the Triton designs, a plug-in that registered none), or with
    --grad-checkpointing a model without activation checkpointing per block (checked on a copy built on the
    meta device)."""
    for model, options in pairs:
        why = forward_only(options["scan"]) if "scan" in options else ""
        if why:
            raise InputError(f"--mode train ({model}): {why}")
        if grad_checkpointing:
            with torch.device("meta"):
                built = create_model(model, img_size=res, **options)
            try:
                enable_grad_checkpointing(built)
            except GradCheckpointingUnsupported as e:
                raise InputError(f"--grad-checkpointing: {e}") from None
