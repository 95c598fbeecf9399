"""The options shared by several commands, each meaning the same thing wherever it appears.

    --models  comma-separated registry names (`vimbench models`; any timm model as timm:<name>)
    --attn    attention backend(s) for DeiT/ViT models, one row each          [eager,sdpa]
    --scan    scan backend(s) for Vim models, one row each; auto is resolved   [auto]
    --res     resolutions (spec below)                                       [224..1248]
    --batch   images per forward                                [64 on a GPU, 1 on CPU]
    --dtype   weights and inputs: fp32, fp16 or bf16                         [fp32]
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
import math
import re
import shlex
import sys
from pathlib import Path

import click
import torch

from vimbench.analysis.paper import PAPER_SETTING_OPTIONS
from vimbench.errors import BackendUnavailable, InputError
from vimbench.kernels.attention import ATTENTION_BACKENDS, check_attention_backend
from vimbench.kernels.selective_scan import SCAN_CHOICES, resolve_scan_backend
from vimbench.measure.core import DTYPES
from vimbench.models.registry import check_backends, model_variants


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
    naming --out-dir if it is not a directory or cannot be created."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out-dir {out_dir} exists and is not a directory")
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out-dir {out_dir}: cannot create it ({e.strerror or e}); pass another --out-dir") from None


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
                                f"{', '.join(ATTENTION_BACKENDS)}.")
scan_option = click.option("--scan", "scan_spec", default="auto", show_default=True,
                           help=f"Scan backend(s) for Vim models, one row each: {', '.join(SCAN_CHOICES)}.")
res_option = click.option("--res", "res_spec", default="224..1248", show_default=True,
                          help="Resolutions: A..B (step 64), A..B:STEP, comma lists, or a mix.")
batch_option = click.option("--batch", type=int, default=None, help="Images per forward [64 on a GPU, 1 on CPU].")
dtype_option = click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
                            help="Weights and inputs.")
device_option = click.option("--device", "device_spec", default="auto", show_default=True,
                             help="auto, cpu, cuda or cuda:N.")
head_option = click.option("--head/--no-head", default=False, show_default=True,
                           help="Include the classifier head (default: backbone only, as the Vim paper measured).")
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
