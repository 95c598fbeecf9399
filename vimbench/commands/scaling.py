"""`vimbench scaling`: the resolution sweep (throughput, memory, FLOPs) of Vim vs DeiT to CSV."""
from __future__ import annotations

import datetime

import click
import torch

from ..csvlog import CsvLog, check_writable
from ..env import environment
from ..errors import InputError
from ..isolation import run_isolated
from ..kernels.attention import ATTENTION_BACKENDS, check_attention_backend
from ..kernels.selective_scan import SCAN_CHOICES, BackendUnavailable, resolve_scan_backend
from ..measure import DTYPES, config_flops, measure_model
from ..memory import predict_memory
from ..registry import model_entry
from ..sweep import run_sweep
from ..table import format_table
from ._options import command_line, models_option, res_option, resolutions, variants

COLUMNS = [
    # identity
    "model", "family", "impl", "kernel", "res", "tokens", "batch", "batch_requested", "dtype", "device", "head",
    "status", "error",
    # timing
    "latency_ms", "latency_ms_p10", "latency_ms_p90", "throughput_img_s", "repeats", "warmup",
    # memory
    "mem_peak_gib", "mem_reserved_gib", "mem_nvml_gib", "mem_pred_gib",
    # FLOPs
    "flops_total", "flops_scan", "flops_attention", "flops_linear", "flops_other", "params",
    # environment
    "device_name", "driver_version", "cuda_version", "torch_version", "triton_version", "timm_version",
    "vimbench_version", "git_commit", "cpu_model", "threads", "load_avg_1m", "tf32", "cudnn_benchmark", "sm_clock_mhz",
    "temperature_c", "power_w", "timestamp", "command",
]
KEY = ["model", "impl", "res", "batch_requested", "dtype", "device", "head"]

PRESETS = {"paper": dict(models_spec="vim_tiny,deit_tiny", attn_spec="eager,sdpa", dtype="fp32", batch=64,
                         res_spec="512,640,738,1024,1248", head=False)}
"""--preset paper: the setting of the Vim paper's Fig. 1 (backbone only, fp32, batch 64), plus deit_tiny
with sdpa, the comparison the paper did not make."""

DEFAULT_TIMING = {"cuda": dict(warmup=5, repeats=20, min_time=1.0), "cpu": dict(warmup=1, repeats=3, min_time=1.0)}
CONFIG_TIMEOUT_S = 3600


def decay_batch(batch: int) -> int:
    """The next smaller batch to try after an OOM: 64 -> 48 -> 32 -> 24 -> 16 -> 12 -> 8 -> 6 -> 4 -> 3 -> 2 -> 1
    (halving, with a 3/4 step in between), 0 when there is nothing smaller."""
    if batch <= 1:
        return 0
    p = 1 << (batch.bit_length() - 1)  # largest power of two <= batch
    if batch > p:
        return p
    return p * 3 // 4 if p >= 4 else p // 2


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown --device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported --device {spec!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA GPU is available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) present")
        device = torch.device("cuda", index)
    return device


def _check_backend(model: str, options: dict, device, dtype) -> str:
    """The backend that will run (scan resolved for the device); InputError if it cannot run there."""
    try:
        if "scan" in options:
            return resolve_scan_backend(options["scan"], device)
        # No probe on CUDA: it would create a CUDA context in this process, which the workers' NVML reading
        # (device memory minus the level before the worker touched CUDA) would then miss. A forced kernel
        # that cannot run there becomes an error row naming why.
        if device.type == "cuda" or options["attn"] in ("eager", "sdpa"):
            return options["attn"]
        check_attention_backend(options["attn"], device, dtype, head_dim=64)
        return options["attn"]
    except BackendUnavailable as e:
        raise InputError(f"{model}: {e}") from None


def _measure_config(cfg: dict, env: dict, command: str, backoff: bool) -> dict:
    batch = cfg["batch_requested"]
    while True:
        run_cfg = {**cfg, "batch": batch}
        result = run_isolated(measure_model, (run_cfg,), timeout=CONFIG_TIMEOUT_S)
        if result["status"] != "oom" or not backoff or decay_batch(batch) == 0:
            break
        batch = decay_batch(batch)
    row = {k: cfg[k] for k in ("model", "family", "impl", "res", "batch_requested", "dtype", "device", "head",
                               "warmup")}
    row.update(env, batch=batch, kernel=cfg["impl"], timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
               command=command, **config_flops(run_cfg))
    row.update(result)
    try:  # the GPU memory this configuration is predicted to need, on any device (vimbench.memory)
        row["mem_pred_gib"] = predict_memory(cfg["model"], cfg["res"], batch, cfg["dtype"], cfg["head"],
                                             **cfg["options"])["mem_pred_peak_gib"]
    except Exception as e:  # a failed prediction must not cost the measured row
        row["error"] = "; ".join(filter(None, [row.get("error"), f"mem_pred failed: {type(e).__name__}: {e}"]))
    return row


@click.command("scaling")
@models_option
@res_option
@click.option("--attn", "attn_spec", default="eager,sdpa", show_default=True,
              help=f"Attention backend(s) for DeiT models, one row each: {', '.join(ATTENTION_BACKENDS)}.")
@click.option("--scan", "scan_spec", default="auto", show_default=True,
              help=f"Scan backend(s) for Vim models: {', '.join(SCAN_CHOICES)}.")
@click.option("--batch", type=int, default=None, help="Images per forward [64 on a GPU, 1 on CPU].")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--device", "device_spec", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--warmup", type=int, default=None, help="Untimed forwards first [5 on GPU, 1 on CPU].")
@click.option("--repeats", type=int, default=None, help="At least this many timed forwards [20 GPU, 3 CPU].")
@click.option("--min-time", type=float, default=None, help="...and at least this many seconds of them [1.0].")
@click.option("--threads", type=int, default=0, help="CPU threads for torch [torch's default].")
@click.option("--head/--no-head", default=False, help="Time the full classifier (default: backbone only).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="CSV to write [results/scaling-<device>-<time>.csv].")
@click.option("--resume", is_flag=True, help="Continue --out: skip configurations already ok, append the rest.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="paper: vim_tiny vs deit_tiny (eager, sdpa), fp32, batch 64, res 512..1248 as in Fig. 1; "
                   "explicit options override it.")
@click.option("--backoff", is_flag=True, help="On OOM retry with a smaller batch; the batch that ran is recorded.")
@click.pass_context
def command(ctx, preset, **opts):
    """Sweep resolutions for each model and backend; one CSV row per configuration, written as it finishes.

    Each configuration runs in its own worker process: an OOM or crash is recorded as a row with status
    oom or error and the sweep goes on.
    """
    if preset:
        for name, value in PRESETS[preset].items():
            if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
                opts[name] = value
    device = resolve_device(opts["device_spec"])
    dtype = DTYPES[opts["dtype"]]
    batch = opts["batch"] if opts["batch"] is not None else (64 if device.type == "cuda" else 1)
    timing = {k: opts[k] if opts[k] is not None else v for k, v in DEFAULT_TIMING[device.type].items()}
    for name, value, low in (("--batch", batch, 1), ("--warmup", timing["warmup"], 0),
                             ("--repeats", timing["repeats"], 1), ("--min-time", timing["min_time"], 0),
                             ("--threads", opts["threads"], 0)):
        if value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    res_list = resolutions(opts["res_spec"])
    pairs = variants(opts["models_spec"], opts["attn_spec"], opts["scan_spec"])
    if opts["resume"] and not opts["out"]:
        raise InputError("--resume needs --out naming the CSV to continue")
    configs = []
    for model, options in pairs:
        impl = _check_backend(model, options, device, dtype)
        options = {**options, "scan": impl} if "scan" in options else options
        for res in res_list:
            configs.append(dict(model=model, family=model_entry(model).family, options=options, impl=impl,
                                res=res, batch_requested=batch, dtype=opts["dtype"], device=str(device),
                                head=opts["head"], threads=opts["threads"], **timing))
    out = opts["out"] or f"results/scaling-{device.type}-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"
    check_writable(out)
    log = CsvLog(out, COLUMNS, resume=opts["resume"])
    env = environment(device)
    command = command_line(ctx)
    rows = run_sweep(configs, log, KEY, lambda cfg: _measure_config(cfg, env, command, opts["backoff"]),
                     lambda cfg: f"{cfg['model']}[{cfg['impl']}] {cfg['res']}px b{cfg['batch_requested']}")
    click.echo(format_table(rows, ["model", "impl", "res", "batch", "status", "throughput_img_s", "latency_ms",
                                   "mem_peak_gib", "flops_total"]))
    click.echo(f"wrote {len(rows)} rows to {out}")
