"""Configurations as types: one frozen dataclass per row kind of the model benchmarks.

    ModelVariant    what is built and run: model, its backend options, resolution, batch, dtype, head, mode
    FlopsConfig     a row of a FLOPs CSV (``vimbench flops``): a variant, counted on the meta device
    MemoryConfig    a row of a memory CSV (``vimbench memory``): a variant and the card it is predicted for
    ScalingConfig   a row of a scaling CSV (``vimbench scaling``): a variant, its regime, device and timing

A configuration's ``columns()`` are its values of the CSV's columns (every key column of its kind in
``rows/schema.py``, with ``family`` and ``impl`` derived from the model and its options). Each command builds
its list of configurations in one function from its options; the measuring and counting layers take a
configuration; ``rows/`` turns a configuration and its results into a row. Configurations hold plain values
only, so they pickle into worker processes and submitit jobs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vimbench.models.registry import impl_of, model_entry


@dataclass(frozen=True)
class ModelVariant:
    """One model variant. ``options``: the registry options naming its backend (``scan=`` for Vim, ``attn=``
    for DeiT/ViT; ``{}`` for a model that takes none); ``res``: square input side (px); ``batch``: images per
    call; ``dtype``: weights and input (fp32 | fp16 | bf16); ``head``: the classifier too, else
    ``forward_features``; ``mode``: infer (a forward) or train (a train step); ``grad_checkpointing``: per block
    recomputation in the backward (train only)."""
    model: str
    options: dict = field(default_factory=dict)
    res: int = 224
    batch: int = 1
    dtype: str = "fp32"
    head: bool = False
    mode: str = "infer"
    grad_checkpointing: bool = False

    @property
    def family(self) -> str:
        """The model's family in the registry (vim, deit, timm)."""
        return model_entry(self.model).family

    @property
    def impl(self) -> str:
        """The backend ``options`` name (``impl_of``)."""
        return impl_of(self.options)

    def columns(self) -> dict:
        """Its values by CSV column: every field but ``options``, plus ``family`` and ``impl``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**values, "family": self.family, "impl": self.impl}


@dataclass(frozen=True)
class FlopsConfig(ModelVariant):
    """A configuration of ``vimbench flops``: FLOPs do not depend on the backend or the dtype (fp32 by default,
    not a column of the FLOPs CSV)."""


@dataclass(frozen=True)
class MemoryConfig(ModelVariant):
    """A configuration of ``vimbench memory``: ``card`` (``count.memory.CARDS``) is the card whose memory the
    ``fits`` column compares with and whose compute capability decides what SDPA runs."""
    card: str = "h100-80gb"


DEFAULT_TIMING = {"cuda": dict(warmup=5, repeats=20, min_time=1.0), "cpu": dict(warmup=1, repeats=3, min_time=1.0)}
"""Per device type: untimed calls, then at least ``repeats`` timed ones and ``min_time`` seconds of them."""


@dataclass(frozen=True)
class ScalingConfig(ModelVariant):
    """A configuration of ``vimbench scaling``. ``batch`` is the batch requested (0: ``--max-batch`` searches it,
    bounded on CPU by ``mem_limit_gib`` GiB of added resident memory); ``compile`` (``regime.COMPILE_MODES``) and
    ``amp`` (none | fp16 | bf16) the regime; ``device`` "cpu" or "cuda:N"; ``threads`` torch CPU threads (0: torch's
    default); ``warmup`` untimed calls, then at least ``repeats`` timed calls and ``min_time`` seconds of them."""
    compile: str = "none"
    amp: str = "none"
    device: str = "cpu"
    threads: int = 0
    warmup: int = DEFAULT_TIMING["cpu"]["warmup"]
    repeats: int = DEFAULT_TIMING["cpu"]["repeats"]
    min_time: float = DEFAULT_TIMING["cpu"]["min_time"]
    mem_limit_gib: float | None = None

    def columns(self) -> dict:
        """As ``ModelVariant.columns``, the batch asked for under ``batch_requested`` (the batch that ran is the
        row's ``batch``)."""
        values = super().columns()
        values["batch_requested"] = values.pop("batch")
        return values


def columns(cfg) -> dict:
    """A configuration's values by column: a ``ModelVariant``'s ``columns()``; another dataclass's fields by name
    (``measure.ops.KernelConfig``, not recursed into); a dict as it is."""
    if isinstance(cfg, ModelVariant):
        return cfg.columns()
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return cfg
