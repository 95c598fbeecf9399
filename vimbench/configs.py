"""Expanding (models x backends) into the model variants a sweep measures."""
from __future__ import annotations

from .errors import InputError
from .kernels.attention import ATTENTION_BACKENDS
from .kernels.selective_scan import SCAN_CHOICES
from .registry import model_entry


def model_variants(models: list[str], attn: list[str], scan: list[str]) -> list[tuple[str, dict]]:
    """[(model, options)] with one entry per attention backend for DeiT/timm-ViT models and one per scan
    backend for Vim models, in the order given. Unknown names raise ``InputError``."""
    if not models:
        raise InputError("no models given")
    for a in attn:
        if a not in ATTENTION_BACKENDS:
            raise InputError(f"unknown attention backend {a!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    for s in scan:
        if s not in SCAN_CHOICES:
            raise InputError(f"unknown scan backend {s!r}; choose from {', '.join(SCAN_CHOICES)}")
    out = []
    for name in models:
        family = model_entry(name).family
        if not (scan if family == "vim" else attn):
            raise InputError(f"{name} needs at least one {'scan' if family == 'vim' else 'attention'} backend")
        if family == "vim":
            out += [(name, {"scan": s}) for s in scan]
        else:
            out += [(name, {"attn": a}) for a in attn]
    return out


def impl_of(options: dict) -> str:
    """The backend an options dict names (the value of scan= or attn=), '' if none."""
    return options.get("scan") or options.get("attn") or ""
