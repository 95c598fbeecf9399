"""The options shared by several commands, each meaning the same thing wherever it appears.

    --models  comma-separated registry names (`vimbench models`; any timm model as timm:<name>)
    --attn    attention backend(s) for DeiT/ViT models, one row each          [eager,sdpa]
    --scan    scan backend(s) for Vim models, one row each; auto is resolved   [auto]
    --res     resolutions (spec below)                                       [224..1248]
    --batch   images per forward                                [64 on a GPU, 1 on CPU]
    --dtype   weights and inputs: fp32, fp16 or bf16                         [fp32]
    --compile torch.compile mode(s), one row each: none, default, max-autotune [none]
    --amp     autocast dtype(s), one row each: none, fp16, bf16 (weights stay fp32) [none]
    --device  auto, cpu, cuda or cuda:N                                      [auto]
    --out     the CSV to write; an existing one is never overwritten: --resume appends to it
              [results/<command>-<device>-<time>.csv]
    --out-dir a folder for what a command writes besides CSVs (figures, reports)
    --preset  a named setting (``PRESETS``); options given explicitly override it

The resolution spec, used by every command that takes ``--res``:

    parse_resolutions("224..1248")             -> [224, 288, ..., 1248]
    parse_resolutions("512,640,738,1024,1248") -> [512, 640, 738, 1024, 1248]
    parse_resolutions("224..480:128,738")      -> [224, 352, 480, 738]
"""
from __future__ import annotations

import datetime
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
from vimbench.measure.regime import AMP_DTYPES, COMPILE_MODES
from vimbench.models.registry import model_variants


DEFAULT_STEP = 64
_RANGE = re.compile(r"^(\d+)\.\.(\d+)(?::(\d+))?$")


def parse_resolutions(spec: str, min_res: int = 16) -> list[int]:
    """Sorted, de-duplicated resolutions (pixels, square images) named by ``spec``.

    A range ``A..B`` is inclusive and must have A <= B; its step defaults to 64. Every resolution must be
    at least ``min_res`` (the patch size). Raises ``InputError`` naming the offending part.
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
            values = list(range(lo, hi + 1, step))
        elif part.isdigit():
            values = [int(part)]
        else:
            raise InputError(f"cannot read resolution {part!r}: use N, A..B or A..B:STEP, comma-separated")
        for r in values:
            if r < min_res:
                raise InputError(f"resolution {r} is smaller than the patch size {min_res}")
        out.update(values)
    return sorted(out)


def comma_list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def at_least(name: str, value, low) -> None:
    """InputError unless ``value >= low``, naming the option."""
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
    return model_variants(comma_list(models_spec), comma_list(attn_spec), comma_list(scan_spec))


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
            elif device.type == "cpu" and options["attn"] not in ("eager", "sdpa"):
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


def regime_label(cfg: dict) -> str:
    """" compile=<mode> amp=<dtype>" for the progress bar, the parts that are not none."""
    return "".join(f" {k}={cfg[k]}" for k in ("compile", "amp") if cfg[k] != "none")


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
    """InputError unless ``out_dir`` (an --out-dir) is a directory or can become one."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out-dir {out_dir} exists and is not a directory")


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
compile_option = click.option("--compile", "compile_spec", default="none", show_default=True,
                              help="torch.compile mode(s) (inductor), one row each: "
                                   f"{', '.join(COMPILE_MODES)}. Compiled once before the warm-up.")
amp_option = click.option("--amp", "amp_spec", default="none", show_default=True,
                          help=f"Autocast dtype(s), one row each: {', '.join(AMP_DTYPES)} "
                               "(weights stay fp32, unlike --dtype).")
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
