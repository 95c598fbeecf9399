"""One registry and one factory for every model vimbench measures (timm style).

    create_model("vim_tiny", img_size=1248, scan="cpu")
    create_model("deit_tiny", img_size=1248, attn="eager")
    create_model("timm:vit_small_patch16_224", img_size=512, attn="sdpa")
    list_models() -> ["deit_base", ..., "vim_tiny_s8"]

Every model returned carries ``vimbench_name``, ``family`` ("vim" | "deit" | "timm") and
``num_tokens`` (the sequence length its token mixer sees, cls token included). Other packages add models
with ``register_model`` from a ``vimbench.models`` entry point (``vimbench.kernels.plugins``), loaded on
first use of the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from vimbench.errors import InputError
from vimbench.kernels.attention import attention_backends
from vimbench.kernels import peers
from vimbench.kernels.plugins import check_name, load_group
from vimbench.kernels.selective_scan import scan_choices

FAMILY_OPTIONS = {"vim": {"scan": scan_choices}, "deit": {"attn": attention_backends},
                  "timm": {"attn": attention_backends}}
"""Options each family takes, each with the function that lists its allowed values (plug-ins included)."""
DEFAULT_OPTIONS = {"vim": {"scan": "auto"}, "deit": {"attn": "sdpa"}, "timm": {}}
OWN_IMPL = "timm"
"""``impl`` of a model that takes no backend option (a timm CNN or hybrid): timm's own forward ran."""
BACKENDS = {"attn": ("attention backend", attention_backends), "scan": ("scan backend", scan_choices)}
"""Backend options: what each names, and a function giving its allowed values (plug-ins included)."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    builder: Callable[..., nn.Module]
    description: str
    options: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, family: str, description: str):
    """Decorator for a builder ``fn(img_size, **options) -> nn.Module``. ValueError for a name that is taken or
    breaks the plug-ins' name rule (``plugins.NAME_RULE``: ``timm:<name>`` is timm's model, never a plug-in's),
    or a family not in ``FAMILY_OPTIONS``."""
    def deco(fn):
        if isinstance(name, str) and name.startswith("timm:"):
            raise ValueError(f"model name {name!r}: the timm: prefix is reserved for timm's own models")
        check_name("model", name, dict.fromkeys(_REGISTRY, "a registered model"))
        if family not in FAMILY_OPTIONS:
            raise ValueError(f"model {name!r}: family {family!r} is not one of {', '.join(FAMILY_OPTIONS)}")
        _REGISTRY[name] = ModelEntry(name, family, fn, description, FAMILY_OPTIONS[family])
        return fn
    return deco


def list_models() -> list[str]:
    """Names of the registered models, plug-ins included, sorted (``timm:<name>`` works too but is not listed)."""
    load_group("vimbench.models")
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; ``timm:<model>`` gets an entry made on the fly."""
    if name not in _REGISTRY:
        load_group("vimbench.models")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        from vimbench.baselines.timm_models import create_timm_model, timm_options
        timm_name = name.removeprefix("timm:")
        return ModelEntry(name, "timm", lambda img_size, **kw: create_timm_model(timm_name, img_size, **kw),
                          f"timm model {timm_name}", timm_options(timm_name))
    raise InputError(f"unknown model {name!r}; known: {', '.join(list_models())} or timm:<name>")


def check_options(name: str, options: dict) -> dict:
    """The model's options completed with defaults; ``InputError`` for an unknown option or value."""
    entry = model_entry(name)
    for key, value in options.items():
        if key not in entry.options:
            raise InputError(f"model {name!r} takes no option {key!r} (it takes: {', '.join(entry.options) or 'none'})")
        if value not in entry.options[key]():
            raise InputError(f"unknown {key} {value!r} for {name}; choose from {', '.join(entry.options[key]())}")
    return {**DEFAULT_OPTIONS[entry.family], **options}


def create_model(name: str, img_size: int = 224, **options) -> nn.Module:
    """Builds model ``name`` for square ``img_size`` inputs with its options (``scan=`` for Vim models,
    ``attn=`` for DeiT/ViT ones). Weights are freshly initialised; nothing is downloaded."""
    entry = model_entry(name)
    options = check_options(name, options)
    model = entry.builder(img_size=img_size, **options)
    model.vimbench_name, model.family = name, entry.family
    if not hasattr(model, "num_tokens"):
        grid = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        model.num_tokens = None if grid is None else grid + getattr(model, "num_prefix_tokens", 0)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_backends(option: str, values: list[str]) -> None:
    """InputError for a value of backend option ``option`` ("attn" | "scan") that is not allowed."""
    what, allowed = BACKENDS[option]
    known = allowed()
    for v in values:
        if v not in known:
            raise InputError(peers.why_absent(v) if option == "scan" and peers.why_absent(v)
                             else f"unknown {what} {v!r}; choose from {', '.join(known)}")


def model_variants(models: list[str], attn: list[str], scan: list[str]) -> list[tuple[str, dict]]:
    """[(model, options)] with one entry per attention backend for DeiT/timm-ViT models, one per scan
    backend for Vim models and one (no options) for a model that takes neither, in the order given.
    Unknown names raise ``InputError``."""
    if not models:
        raise InputError("no models given")
    check_backends("attn", attn)
    check_backends("scan", scan)
    out = []
    for name in models:
        takes = model_entry(name).options
        if not takes:
            out.append((name, {}))
            continue
        option = "scan" if "scan" in takes else "attn"
        values = scan if option == "scan" else attn
        if not values:
            raise InputError(f"{name} needs at least one {BACKENDS[option][0]} (--{option})")
        out += [(name, {option: v}) for v in values]
    return out


def impl_of(options: dict) -> str:
    """The backend an options dict names (the value of scan= or attn=); ``OWN_IMPL`` if it names none."""
    return options.get("scan") or options.get("attn") or OWN_IMPL


def _register_builtin():
    from vimbench.baselines.deit import create_deit
    from vimbench.models.vim import VisionMamba

    vim_cfgs = {"vim_tiny": (192, 16), "vim_small": (384, 16), "vim_base": (768, 16),
                "vim_tiny_s8": (192, 8), "vim_small_s8": (384, 8)}
    for name, (dim, stride) in vim_cfgs.items():
        size = name.split("_")[1]
        desc = f"Vim-{size[0].upper()}{size[1:]} (D={dim}, depth 24, patch 16, stride {stride})"
        register_model(name, "vim", desc)(
            lambda img_size, scan="auto", _d=dim, _s=stride: VisionMamba(img_size, 16, _s, _d, scan=scan))
    for size, dim, heads in (("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12)):
        register_model(f"deit_{size}", "deit", f"timm deit_{size}_patch16_224 (D={dim}, depth 12, {heads} heads)")(
            lambda img_size, attn="sdpa", _s=size: create_deit(_s, img_size, attn))


_register_builtin()
