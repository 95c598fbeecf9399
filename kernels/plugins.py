"""Backends and models from other packages, through entry points, loaded lazily and without breaking the CLI.

A package adds scan backends, attention backends or models by declaring an entry point in one of ``GROUPS``
whose object is a function of no arguments that registers them (``vimbench.register_scan_backend``,
``vimbench.register_attention_backend``, ``vimbench.models.registry.register_model``)::

    [project.entry-points."vimbench.scan_backends"]
    my_scan = "my_package.vimbench_plugin:register"

A group is loaded the first time its registry is asked for a name it does not hold or for its list (never
at ``import vimbench``). An entry point that fails to import, raises, or registers a name that is taken
(a built-in's or another package's) is skipped with one line on stderr naming the package and why (from
the main process only, not from each measuring worker); the other backends and every command keep
working. ``problems`` keeps those lines.
"""
from __future__ import annotations

import importlib.metadata
import multiprocessing
import re
import sys
from dataclasses import dataclass
from typing import Callable

GROUPS = ("vimbench.scan_backends", "vimbench.attention_backends", "vimbench.models")

_loaded: set[str] = set()
_loading: list[str] = []
problems: list[str] = []


def current_package() -> str:
    """The distribution whose entry point is being loaded, or "" for a registration made by direct call."""
    return _loading[-1] if _loading else ""


@dataclass(frozen=True)
class Plugin:
    """A backend registered by another package: its function, the device types it runs on, its fake (the
    same signature on fake tensors, allocating what ``fn`` allocates on a GPU; None: no memory prediction),
    ``package``, the distribution whose entry point registered it ("" for a direct call), and for a scan
    backend its backward and the backward's fake (None: forward-only, or no memory prediction of training;
    see ``register_scan_backend``)."""
    name: str
    fn: Callable
    devices: tuple[str, ...]
    fake: Callable | None
    description: str
    package: str
    backward: Callable | None = None
    backward_fake: Callable | None = None


DEVICE_TYPES = ("cpu", "cuda")
"""The device types vimbench measures on."""


def make_plugin(kind: str, name: str, fn: Callable, devices, fake: Callable | None, description: str,
                taken: dict[str, str], backward: Callable | None = None,
                backward_fake: Callable | None = None) -> Plugin:
    """A validated ``Plugin`` for a ``kind`` ("scan" or "attention") backend; ``taken`` maps each name in use
    to its owner. ValueError naming the problem: a name that is not a plain identifier (it goes in CSVs and
    pytest -k expressions) or is taken, a callable missing, devices empty or unknown."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"{kind} backend name {name!r}: use letters, digits and _, starting with a letter")
    if name in taken:
        raise ValueError(f"{kind} backend name {name!r} clashes with {taken[name]}")
    devices = (devices,) if isinstance(devices, str) else tuple(devices)
    optional = (fake, backward, backward_fake)
    if not devices or any(d not in DEVICE_TYPES for d in devices) or not callable(fn) \
            or any(f is not None and not callable(f) for f in optional):
        raise ValueError(f"{kind} backend {name!r}: fn, fake, backward and backward_fake must be callables, "
                         f"devices a non-empty list of {', '.join(DEVICE_TYPES)} (got {devices!r})")
    if backward is None and backward_fake is not None:
        raise ValueError(f"{kind} backend {name!r}: a backward_fake without a backward")
    return Plugin(name, fn, devices, fake, description, current_package(), backward, backward_fake)


def owners(builtins, plugins: dict[str, Plugin]) -> dict[str, str]:
    """Who holds each name: "a built-in backend" or "package '<name>'" (``make_plugin``'s ``taken``)."""
    return {**{b: "a built-in backend" for b in builtins},
            **{n: f"package {p.package or '(direct call)'!r}" for n, p in plugins.items()}}


def load_group(group: str) -> None:
    """Loads every entry point of ``group`` (one of ``GROUPS``) once per process; see the module docstring."""
    if group in _loaded:
        return
    _loaded.add(group)
    for ep in importlib.metadata.entry_points(group=group):
        package = ep.dist.name if ep.dist is not None else ep.value.split(":")[0]
        _loading.append(package)
        try:
            ep.load()()
        except Exception as e:  # a broken plug-in costs its own backends only
            line = (f"vimbench: skipped plug-in {ep.name!r} of package {package!r} ({group}): "
                    f"{type(e).__name__}: {' '.join(str(e).split())}")
            problems.append(line)
            if multiprocessing.parent_process() is None:  # said once, by the command, not by each worker
                print(line, file=sys.stderr)
        finally:
            _loading.pop()
