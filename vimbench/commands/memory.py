"""`vimbench memory`: predicted peak GPU memory of an inference forward or a train step, computed without a GPU."""
from __future__ import annotations

import click
import torch

from vimbench.analysis.paper import paper_gib
from vimbench.commands import options as o
from vimbench.config import MemoryConfig
from vimbench.count.memory import CARDS
from vimbench.errors import BackendUnavailable, InputError
from vimbench.kernels.selective_scan import check_scan_backend
from vimbench.kernels.selective_scan.backends import has_backward
from vimbench.measure.env import environment
from vimbench.present.report import paper_memory_table
from vimbench.present.tables import format_table
from vimbench.rows.reader import load_results
from vimbench.rows.schema import MEMORY
from vimbench.rows.memory import memory_row
from vimbench.rows.sweep import run_sweep
from vimbench.rows.writer import CsvLog


def _check_variant(options: dict, dtype: str, modes: list[str]) -> None:
    """InputError for a scan backend that cannot run on CUDA here, or that has no backward with train in
    ``modes``, or flash/cudnn attention in fp32."""
    scan, attn = options.get("scan"), options.get("attn")
    if scan and scan != "auto":
        try:
            check_scan_backend(scan, "cuda")
        except BackendUnavailable as e:
            raise InputError(f"--scan {scan}: cannot predict it: {e}") from None
        if "train" in modes and not has_backward(scan):
            raise InputError(f"--scan {scan}: forward-only (no backward), so no train step: drop train from --mode")
    if attn in ("flash", "cudnn") and dtype == "fp32":
        raise InputError(f"--attn {attn} needs --dtype fp16 or bf16 (use efficient or sdpa for fp32)")


@click.command("memory")
@o.model_options
@o.batch_option
@o.dtype_option
@o.head_option
@o.mode_option
@click.option("--card", default="h100-80gb", show_default=True, help=f"Card for the fits column: {', '.join(CARDS)}.")
@o.out_options
@o.preset_option
@click.pass_context
def command(ctx, preset, **opts):
    """Predict the peak CUDA memory of one inference forward (torch.inference_mode) per model, kernel and
    resolution, without a GPU: the forward runs on fake CUDA tensors while every allocation is recorded,
    and the trace is replayed through a model of PyTorch's caching allocator. Columns (GiB = 2^30 B):
    weights; activations (input included); peak = torch.cuda.max_memory_allocated; reserved =
    max_memory_reserved; used = reserved + a CUDA context of 0.5 GiB; fits: used <= the card's memory.
    Rows of the paper's setting carry its Fig. 1 (c) value (--preset paper gives exactly those).
    --mode train predicts a train step in steady state (its second): weights, gradients, SGD momentum
    buffers and what autograd saves, per block recomputed with --grad-checkpointing (vimbench.count.memory)."""
    predict(o.command_line(ctx), paper_table=preset == "paper", **o.apply_preset(ctx, preset, opts))


def memory_configs(**opts) -> list[MemoryConfig]:
    """The configurations of ``vimbench memory`` from its options by parameter name (a preset applied): every
    mode x (model, backend) x resolution, for one card. InputError for an unknown card or a backend that
    cannot be predicted."""
    if opts["card"] not in CARDS:
        raise InputError(f"--card {opts['card']!r}: unknown; known: {', '.join(CARDS)}")
    batch = o.batch_for(opts["batch"], torch.device("cuda"))
    res_list = o.parse_resolutions(opts["res_spec"])
    modes = o.modes(opts["mode_spec"], opts["grad_checkpointing"])
    pairs = o.variants(opts["models_spec"], opts["attn_spec"], opts["scan_spec"])
    for _, options in pairs:
        _check_variant(options, opts["dtype"], modes)
    return [MemoryConfig(m, options, res, batch, opts["dtype"], opts["head"], mode,
                         opts["grad_checkpointing"] and mode == "train", card=opts["card"])
            for mode in modes for m, options in pairs for res in res_list]


def predict(command: str, paper_table: bool = False, **opts) -> list[dict]:
    """``vimbench memory``: ``opts`` are the command's options by parameter name (a preset applied, e.g.
    ``{**options.defaults(memory.command), **PAPER_SETTING_OPTIONS}``), ``command`` the command line recorded in
    every row. Writes the CSV (``opts["out"]``, resumed with ``opts["resume"]``), prints its table, and with
    ``paper_table`` (``--preset paper``) the comparison with the paper when a row is ok; returns the rows of this
    run. InputError, before any row is written, for options that cannot be predicted."""
    configs = memory_configs(**opts)
    with CsvLog.open(opts["out"] or o.default_out("memory", "cuda"), MEMORY, resume=opts["resume"],
                     given=opts["out"] is not None) as log:
        fixed = {**environment(torch.device("cpu")), "command": command}
        rows = run_sweep(configs, log, lambda cfg: memory_row(cfg, fixed, paper_gib),
                         lambda cfg: f"{cfg.model}[{cfg.impl}] {cfg.res}px b{cfg.batch} {cfg.mode}")
        click.echo(format_table(rows, ["model", "impl", "kernel", "res", "tokens", "batch", "dtype", "mode", "status",
                                       "mem_pred_weights_gib", "mem_pred_peak_gib", "mem_pred_reserved_gib",
                                       "mem_pred_used_gib", "fits", "paper_gib"]))
        click.echo(f"wrote {len(rows)} rows to {log.path}")
        if paper_table and any(r.get("status") == "ok" for r in rows):
            _, df = load_results(log.path, kinds=("memory",))
            click.echo("\n".join(paper_memory_table(df)))
        return rows
