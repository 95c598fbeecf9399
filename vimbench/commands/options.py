"""The options shared by several commands, each meaning the same thing wherever it appears.

    --models  comma-separated registry names (`vimbench models`; any timm model as timm:<name>)
    --attn    attention backend(s) for DeiT/ViT models, one row each          [eager,sdpa]
    --scan    scan backend(s) for Vim models, one row each; auto is resolved   [auto]
    --res     resolutions (spec below)                                       [224..1248]
    --batch   images per forward                                [64 on a GPU, 1 on CPU]
    --dtype   weights and inputs: fp32, fp16 or bf16                         [fp32]
    --compile torch.compile mode(s), one row each: none, default, max-autotune [none]
    --amp     autocast dtype(s), one row each: none, fp16, bf16 (weights stay fp32) [none]
    --mode    infer and/or train, one row each; --grad-checkpointing for train rows [infer]
    --device  auto, cpu, cuda or cuda:N                                      [auto]
    --out     the CSV to write; an existing one is never overwritten: --resume appends to it
              [results/<command>-<device>-<time>.csv]
    --out-dir a folder for what a command writes besides CSVs (figures, reports), created if missing
              [beside the input CSV]

An error about an option's value names the option (``naming``): "--res: cannot read resolution 'abc' ...".
    --preset  a named setting (``PRESETS``); options given explicitly override it

The resolution spec, used by every command that takes ``--res``:

    parse_resolutions("224..1248")             -> [224, 288, ..., 1248]
    parse_resolutions("512,640,738,1024,1248") -> [512, 640, 738, 1024, 1248]
    parse_resolutions("224..480:128,738")      -> [224, 352, 480, 738]
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import math
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import click
import torch

from vimbench.analysis.paper import PAPER_SETTING_OPTIONS
from vimbench.errors import BackendUnavailable, InputError
from vimbench.kernels.attention import ATTENTION_BACKENDS, check_attention_backend
from vimbench.kernels.selective_scan import SCAN_CHOICES, resolve_scan_backend
from vimbench.measure.core import DTYPES
from vimbench.measure.launchers import SLURM_KEYS, Plain, Submitit, check_text, launcher_settings
from vimbench.measure.regime import AMP_DTYPES, COMPILE_MODES
from vimbench.models.registry import check_backends, model_variants
from vimbench.rows.schema import MODES


DEFAULT_STEP = 64
MAX_RES = 65536
"""The largest resolution accepted (px): 16.7 M tokens at patch 16, beyond any GPU's memory; much larger
values overflow tensor sizes while the model is built."""
MAX_RESOLUTIONS = 1000
"""The most resolutions one spec may name (a range with a tiny step would otherwise name millions)."""
_RANGE = re.compile(r"^(\d+)\.\.(\d+)(?::(\d+))?$")
_OPTION = re.compile(r"(?:^|[\s(])--[a-z]")


@contextlib.contextmanager
def naming(option: str):
    """Re-raises an ``InputError`` from the block with ``option`` in front ("--res: ..."), unless its
    message already names an option: every error about a value says which option it came from."""
    try:
        yield
    except InputError as e:
        if _OPTION.search(str(e)):
            raise
        raise InputError(f"{option}: {e}") from None


@naming("--res")
def check_resolution(res: int, min_res: int = 16) -> None:
    """InputError unless ``min_res`` (the patch size) <= ``res`` <= ``MAX_RES``."""
    if res < min_res:
        raise InputError(f"resolution {res} is smaller than the patch size {min_res}")
    if res > MAX_RES:
        raise InputError(f"resolution {res} is larger than {MAX_RES}")


@naming("--res")
def parse_resolutions(spec: str, min_res: int = 16) -> list[int]:
    """Sorted, de-duplicated resolutions (pixels, square images) named by ``spec``.

    A range ``A..B`` is inclusive and must have A <= B; its step defaults to 64. Every resolution must be
    at least ``min_res`` (the patch size) and at most ``MAX_RES``; a spec names at most ``MAX_RESOLUTIONS``.
    Raises ``InputError`` naming --res and the offending part.
    """
    out: set[int] = set()
    parts = [p.strip() for p in str(spec).split(",")]
    if not any(parts):
        raise InputError(f"empty resolution spec {spec!r}")
    for part in parts:
        m = _RANGE.match(part)
        if m:
            lo, hi, step = int(m[1]), int(m[2]), int(m[3] or DEFAULT_STEP)
            if lo > hi:
                raise InputError(f"resolution range {part!r} runs backwards; write {hi}..{lo}")
            if step <= 0:
                raise InputError(f"resolution step in {part!r} must be positive")
            if (hi - lo) // step + 1 > MAX_RESOLUTIONS:
                raise InputError(f"resolution range {part!r} names more than {MAX_RESOLUTIONS} resolutions")
            values = list(range(lo, hi + 1, step))
        elif part.isdigit():
            values = [int(part)]
        else:
            raise InputError(f"cannot read resolution {part!r}: use N, A..B or A..B:STEP, comma-separated")
        for r in values:
            check_resolution(r, min_res)
        out.update(values)
        if len(out) > MAX_RESOLUTIONS:
            raise InputError(f"resolution spec {spec!r} names more than {MAX_RESOLUTIONS} resolutions")
    return sorted(out)


def comma_list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def at_least(name: str, value, low) -> None:
    """InputError unless ``value`` is a finite number ``>= low``, naming the option."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if value < low:
        raise InputError(f"{name} must be >= {low}, got {value}")


def resolve_device(spec: str) -> torch.device:
    """The device named by --device: auto (the first GPU if there is one, else cpu), cpu, cuda or cuda:N."""
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


DEFAULT_BATCH = {"cuda": 64, "cpu": 1, "meta": 1}
"""--batch when not given, per device type: the paper's batch on a GPU, one image on a CPU (and for FLOP
counts, which are per forward)."""


def batch_for(batch: int | None, device: torch.device) -> int:
    """--batch, or the device's default (``DEFAULT_BATCH``); InputError below 1."""
    batch = DEFAULT_BATCH[device.type] if batch is None else batch
    at_least("--batch", batch, 1)
    return batch


PRESETS = {"paper": PAPER_SETTING_OPTIONS}
"""--preset NAME: option values (by parameter name) applied where the option was not given explicitly."""


def apply_preset(ctx: click.Context, preset: str | None, opts: dict) -> dict:
    """``opts`` with the preset's values for every option the user did not give explicitly."""
    if not preset:
        return opts
    explicit = {name for name in opts if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    return {**opts, **{k: v for k, v in PRESETS[preset].items() if k not in explicit and k in opts}}


def variants(models_spec: str, attn_spec: str, scan_spec: str) -> list[tuple[str, dict]]:
    """The (model, options) pairs named by --models, --attn and --scan (see ``model_variants``)."""
    attn, scan = comma_list(attn_spec), comma_list(scan_spec)
    with naming("--attn"):
        check_backends("attn", attn)
    with naming("--scan"):
        check_backends("scan", scan)
    with naming("--models"):
        return model_variants(comma_list(models_spec), attn, scan)


def resolved_variants(models_spec, attn_spec, scan_spec, device: torch.device, dtype: str) -> list[tuple[str, dict]]:
    """``variants`` with each scan backend resolved for ``device`` (``auto`` -> the backend that will run)
    and each backend checked there; InputError naming the model and why for one that cannot run. Forced
    attention kernels are not probed on CUDA in this process (that would create a CUDA context here, which
    the workers' NVML readings would miss): one that cannot run becomes an error row naming why."""
    out = []
    for model, options in variants(models_spec, attn_spec, scan_spec):
        option = "--scan" if "scan" in options else "--attn"
        try:
            if "scan" in options:
                options = {**options, "scan": resolve_scan_backend(options["scan"], device)}
            elif device.type == "cpu" and options.get("attn", "eager") not in ("eager", "sdpa"):
                check_attention_backend(options["attn"], device, DTYPES[dtype], head_dim=64)
        except BackendUnavailable as e:
            raise InputError(f"{option} {options.get('scan') or options['attn']} ({model}): {e}") from None
        if (model, options) not in out:
            out.append((model, options))
    return out


def regimes(compile_spec: str, amp_spec: str, dtype: str) -> list[tuple[str, str]]:
    """The (compile, amp) pairs named by --compile and --amp, each list in the order given; InputError
    naming the option for an unknown or missing value, or autocast on weights that are not fp32."""
    lists = {}
    for option, spec, allowed in (("--compile", compile_spec, COMPILE_MODES), ("--amp", amp_spec, AMP_DTYPES)):
        values = list(dict.fromkeys(comma_list(spec)))
        if not values:
            raise InputError(f"{option}: no value given; choose from {', '.join(allowed)}")
        for v in values:
            if v not in allowed:
                raise InputError(f"{option} {v!r}: unknown; choose from {', '.join(allowed)}")
        lists[option] = values
    if dtype != "fp32" and lists["--amp"] != ["none"]:
        raise InputError(f"--amp needs --dtype fp32 (autocast runs fp32 weights in half precision), got {dtype}")
    return [(c, a) for c in lists["--compile"] for a in lists["--amp"]]


def modes(mode_spec: str, grad_checkpointing: bool) -> list[str]:
    """The modes named by --mode, in the order given (``schema.MODES``: infer, train); InputError naming the
    option for an unknown or missing value, or --grad-checkpointing without train (it applies to a backward
    only)."""
    values = list(dict.fromkeys(comma_list(mode_spec)))
    if not values:
        raise InputError(f"--mode: no value given; choose from {', '.join(MODES)}")
    for v in values:
        if v not in MODES:
            raise InputError(f"--mode {v!r}: unknown; choose from {', '.join(MODES)}")
    if grad_checkpointing and "train" not in values:
        raise InputError("--grad-checkpointing applies to a train step: add train to --mode")
    return values


def regime_label(cfg: dict) -> str:
    """" mode=train gc compile=<mode> amp=<dtype>" for the progress bar, the parts that are not the defaults."""
    return (" mode=train" if cfg.get("mode") == "train" else "") + (" gc" if cfg.get("grad_checkpointing") else "") + \
        "".join(f" {k}={cfg[k]}" for k in ("compile", "amp") if cfg[k] != "none")


def defaults(command: click.Command) -> dict:
    """Every option of ``command`` at its default value, by parameter name, as Click would pass it: what a
    Python caller (``vimbench.gpucheck``) starts from before setting its own values."""
    ctx = click.Context(command)
    return {p.name: p.process_value(ctx, p.get_default(ctx)) for p in command.params}


def command_line(ctx: click.Context) -> str:
    """The command line that invoked this command, as recorded in result rows ("vimbench scaling ...")."""
    obj = ctx.find_root().obj or {}
    argv = obj.get("argv", sys.argv[1:])
    return shlex.join(["vimbench", *argv])


def default_out(command: str, device: torch.device | str) -> str:
    """results/<command>-<device type>-<YYYYmmdd-HHMMSS>.csv"""
    kind = torch.device(device).type if str(device) != "meta" else "meta"
    return f"results/{command}-{kind}-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"


def check_out_dir(out_dir: str) -> None:
    """Creates ``out_dir`` (an --out-dir, given or the command's default) with its parents; InputError
    naming --out-dir if it is not a directory, cannot be created or cannot be written in."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out-dir {out_dir} exists and is not a directory")
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out-dir {out_dir}: cannot create it ({e.strerror or e}); pass another --out-dir") from None
    try:  # a probe, not os.access: root passes access() on read-only folders (/sys, /proc/...) it cannot write
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise InputError(f"--out-dir {out_dir}: cannot write in it ({e.strerror or e}); "
                         "pass another --out-dir") from None


def _decorator(*options):
    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return apply


models_option = click.option("--models", "models_spec", default="vim_tiny,deit_tiny", show_default=True,
                             help="Comma-separated model names (see `vimbench models`; any timm model as timm:<name>).")
attn_option = click.option("--attn", "attn_spec", default="eager,sdpa", show_default=True,
                           help="Attention backend(s) for DeiT/ViT models, one row each: "
                                f"{', '.join(ATTENTION_BACKENDS)}, or a plug-in's.")
scan_option = click.option("--scan", "scan_spec", default="auto", show_default=True,
                           help=f"Scan backend(s) for Vim models, one row each: {', '.join(SCAN_CHOICES)}, "
                                "or a plug-in's (`vimbench models` lists them).")
res_option = click.option("--res", "res_spec", default="224..1248", show_default=True,
                          help="Resolutions: A..B (step 64), A..B:STEP, comma lists, or a mix.")
batch_option = click.option("--batch", type=int, default=None, help="Images per forward [64 on a GPU, 1 on CPU].")
dtype_option = click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
                            help="Weights and inputs.")
device_option = click.option("--device", "device_spec", default="auto", show_default=True,
                             help="auto, cpu, cuda or cuda:N (scaling, kernels: also cuda:0,cuda:1,... or "
                                  "cuda:all, one configuration per GPU at a time).")
head_option = click.option("--head/--no-head", default=False, show_default=True,
                           help="Include the classifier head (default: backbone only, as the Vim paper measured).")
compile_option = click.option("--compile", "compile_spec", default="none", show_default=True,
                              help="torch.compile mode(s) (inductor), one row each: "
                                   f"{', '.join(COMPILE_MODES)}. Compiled once before the warm-up.")
amp_option = click.option("--amp", "amp_spec", default="none", show_default=True,
                          help=f"Autocast dtype(s), one row each: {', '.join(AMP_DTYPES)} "
                               "(weights stay fp32, unlike --dtype).")
mode_option = _decorator(
    click.option("--mode", "mode_spec", default="infer", show_default=True,
                 help="What is measured, one row each: infer (a forward under inference_mode), train (forward, "
                      "loss, backward and an SGD step; per-phase times beside the step's)."),
    click.option("--grad-checkpointing", is_flag=True,
                 help="Train rows: recompute each block's activations in the backward (activation "
                      "checkpointing per block, Vim and DeiT alike)."))
threads_option = click.option("--threads", type=int, default=0, help="CPU threads for torch [torch's default].")
out_options = _decorator(
    click.option("--out", type=click.Path(dir_okay=False), default=None,
                 help="CSV to write, never overwritten [results/<command>-<device>-<time>.csv]."),
    click.option("--resume", is_flag=True, help="Continue --out: skip configurations already ok, append the rest."))
preset_option = click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                             help="paper: vim_tiny vs deit_tiny (eager, sdpa), fp32, batch 64, "
                                  "res 512,640,738,1024,1248 "
                                  "as in the Vim paper's Fig. 1; explicit options override it.")
model_options = _decorator(models_option, attn_option, scan_option, res_option)


# Where a sweep runs (vimbench.measure.launchers): several local GPUs through --device, or submitit jobs.
LAUNCHERS = ("plain", "local", "slurm")


def gpu_slots(spec: str) -> tuple[str, ...]:
    """The GPU indices of --device cuda:all or cuda:I,cuda:J,... (two or more); () for any other spec.
    InputError for a GPU that is absent or named twice, or cuda:all without a GPU."""
    if spec != "cuda:all" and "," not in spec:
        return ()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "cuda:all":
        if count == 0:
            raise InputError("--device cuda:all: no CUDA GPU is available on this machine")
        return tuple(str(i) for i in range(count))
    slots = []
    for part in comma_list(spec):
        m = re.fullmatch(r"cuda:(\d+)", part)
        if not m:
            raise InputError(f"--device {spec}: {part!r} is not cuda:N (several devices must all be GPUs)")
        if int(m[1]) >= count:
            raise InputError(f"--device {spec}: no GPU {part} ({count} GPU(s) present)")
        slots.append(m[1])
    if len(set(slots)) < len(slots):
        raise InputError(f"--device {spec}: a GPU is named twice")
    return tuple(slots)


def local_target(spec: str):
    """(device, launcher) for --device on this machine: one device run plainly, or several GPUs (``gpu_slots``)
    one configuration per GPU, each worker seeing its GPU as cuda:0."""
    slots = gpu_slots(spec)
    return (torch.device("cuda:0"), Plain(slots)) if slots else (resolve_device(spec), Plain())


def sweep_target(opts: dict):
    """(the device every configuration runs on, the launcher that runs them) from --device and the launcher
    options. With --launcher slurm the GPU is checked on the cluster, not here: cuda (or auto) means each
    task's cuda:0. InputError, before any file is written, for a launcher that cannot run here, options it
    does not take, or a setting out of range."""
    launcher, spec = opts["launcher"], opts["device_spec"]
    settings = launcher_settings(opts["slurm_config"], {k: opts[k] for k in SLURM_KEYS if k != "sbatch"},
                                 opts["sbatch"])
    if launcher == "plain":
        if settings:
            raise InputError(f"--{sorted(settings)[0].replace('_', '-')} needs --launcher local or slurm")
        return local_target(spec)
    if importlib.util.find_spec("submitit") is None:
        raise InputError(f"--launcher {launcher} needs submitit: pip install 'vimbench[cluster]'")
    if spec == "cuda:all" or "," in spec:
        raise InputError(f"--device {spec} spreads over this machine's GPUs without --launcher; "
                         f"--launcher {launcher} takes one device")
    for name, low in (("workers", 1), ("time_limit", 1), ("gpus_per_task", 0)):
        if name in settings:
            at_least(f"--{name.replace('_', '-')}", settings[name], low)
    if launcher == "slurm":
        if not (shutil.which("sbatch") and shutil.which("srun")):
            raise InputError("--launcher slurm: sbatch and srun are not on PATH (not a Slurm login node)")
        if spec not in ("auto", "cpu", "cuda", "cuda:0"):
            raise InputError(f"--launcher slurm --device {spec}: use cpu or cuda (each task's first GPU)")
        if opts["out"]:  # its jobs folder lands in the sbatch script
            check_text("--out", opts["out"])
        device = torch.device("cpu" if spec == "cpu" else "cuda:0")
    else:
        extra = sorted({"partition", "sbatch"} & set(settings))
        if extra:
            raise InputError(f"--{extra[0]} is a Slurm option; --launcher local does not take it")
        device = resolve_device(spec)
        if device.type == "cuda" and settings.get("workers", 1) > 1:
            raise InputError("--launcher local --workers above 1 would run several configurations on one GPU "
                             "at once; use --device cuda:0,cuda:1,... (no --launcher) to spread them over GPUs")
    settings.setdefault("gpus_per_task", int(device.type == "cuda"))
    settings.setdefault("workers", 1 if launcher == "local" else None)
    return device, Submitit(launcher, **settings)


launcher_options = _decorator(
    click.option("--launcher", type=click.Choice(LAUNCHERS), default="plain", show_default=True,
                 help="plain: this process runs the configurations (one per GPU of --device cuda:0,cuda:1 or "
                      "cuda:all); local: submitit jobs on this machine; slurm: a submitit job array."),
    click.option("--workers", type=int, default=None,
                 help="local/slurm: configurations at once (Slurm: the array's parallelism) [local 1, slurm all]."),
    click.option("--slurm-config", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                 help=f"TOML or JSON file with any of {', '.join(SLURM_KEYS)}; options given win."),
    click.option("--partition", default=None, help="slurm: the partition."),
    click.option("--time-limit", type=int, default=None, help="local/slurm: minutes per configuration [60]."),
    click.option("--gpus-per-task", type=int, default=None, help="local/slurm: GPUs per job [1 on cuda, 0 on cpu]."),
    click.option("--sbatch", multiple=True, metavar="KEY=VALUE",
                 help="slurm: an extra sbatch parameter (repeatable), e.g. --sbatch account=abc --sbatch qos=high."))
