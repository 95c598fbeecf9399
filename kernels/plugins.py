"""Backends and models from other packages, through entry points, loaded lazily and without breaking the CLI.

A package adds scan backends, attention backends or models by declaring an entry point in one of ``GROUPS``
whose object is a function of no arguments that registers them (``vimbench.register_scan_backend``,
``vimbench.register_attention_backend``, ``vimbench.models.registry.register_model``)::

    [project.entry-points."vimbench.scan_backends"]
    my_scan = "my_package.vimbench_plugin:register"

A group is loaded the first time its registry is asked for a name it does not hold or for its list (never
at ``import vimbench``). Each entry point of another package (vimbench's own, the peers, is trusted) is
first tried in a worker process (``isolation.run_isolated``),
bounded by ``time_limit("load")``: one whose import or function hangs, exits (``sys.exit``), raises
``KeyboardInterrupt`` or crashes the interpreter (``os.abort``, a segfault) is skipped there, never run in
the command's own process. One that passes is then loaded in the command's process. An entry point that
fails to import, raises anything (``SystemExit`` and ``KeyboardInterrupt`` included: reported, not obeyed),
or registers a name that is malformed or taken (a built-in's or another package's) is skipped with one line
on stderr naming the package and why (from the main process only, not from each measuring worker); the
other backends and every command keep working. ``problems`` keeps those lines. Measuring workers load
entry points without the trial, skipping those their command skipped (``SKIPPED_ENV``).

The trials cost a command with plug-ins installed one start of the workers' fork server (an import of
torch, 2-4 s on an idle machine) and a fork per entry point.

Time limits (``TIME_LIMITS_S``, seconds from when the worker starts the call; each overridable by its
environment variable, a positive number of seconds):
    load   trying one entry point (its import and its function), VIMBENCH_LOAD_TIMEOUT_S, default 120
    check  one backend's correctness check in its worker (check-backend, kernels, gate and scaling through
           ``measure.verify.run_check``; gpu-check), VIMBENCH_CHECK_TIMEOUT_S, default 1800 (the first call of a
           backend may build or compile it: the cpp extension, Triton kernels)
"""
from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

GROUPS = ("vimbench.scan_backends", "vimbench.attention_backends", "vimbench.models")
TIME_LIMITS_S = {"load": ("VIMBENCH_LOAD_TIMEOUT_S", 120.0), "check": ("VIMBENCH_CHECK_TIMEOUT_S", 1800.0)}
"""Kind of plug-in run -> (the environment variable that overrides its limit, the default limit in seconds);
see the module docstring."""
SKIPPED_ENV = "VIMBENCH_SKIPPED_PLUGINS"
"""Entry points a command skipped ("<group>:<package>:<name>" per line), for its workers (``run_isolated``
passes it on) to skip without trying them again."""
NAME_RULE = r"[A-Za-z][A-Za-z0-9_]*"
"""Every name a plug-in registers (backends, models): it goes in CSV cells, file names and pytest -k
expressions, so no ``:`` (``timm:`` names timm's models), ``/``, whitespace or spreadsheet-formula start."""

_loaded: set[str] = set()
_tried: set[str] = set()  # "group:package:name" of every entry point loaded (or skipped) in this process
_loading: list[str] = []
problems: list[str] = []


def current_package() -> str:
    """The distribution whose entry point is being loaded, or "" for a registration made by direct call."""
    return _loading[-1] if _loading else ""


@dataclass(frozen=True)
class Plugin:
    """A backend registered by another package, as validated by ``make_plugin`` (an attention backend's record; a
    scan backend's becomes a ``ScanBackend`` in ``backends.REGISTRY``): its function, the device types it runs on,
    its fake (the same signature on fake tensors, allocating what ``fn`` allocates on a GPU; None: no memory
    prediction), ``package``, the distribution whose entry point registered it ("" for a direct call), and for a scan
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
    to its owner. ValueError naming the problem: a name that breaks ``NAME_RULE`` or is taken, a callable
    missing, devices empty or unknown."""
    check_name(f"{kind} backend", name, taken)
    devices = (devices,) if isinstance(devices, str) else tuple(devices)
    optional = (fake, backward, backward_fake)
    if not devices or any(d not in DEVICE_TYPES for d in devices) or not callable(fn) \
            or any(f is not None and not callable(f) for f in optional):
        raise ValueError(f"{kind} backend {name!r}: fn, fake, backward and backward_fake must be callables, "
                         f"devices a non-empty list of {', '.join(DEVICE_TYPES)} (got {devices!r})")
    if backward is None and backward_fake is not None:
        raise ValueError(f"{kind} backend {name!r}: a backward_fake without a backward")
    return Plugin(name, fn, devices, fake, description, current_package(), backward, backward_fake)


def check_name(what: str, name, taken: dict[str, str]) -> None:
    """ValueError unless ``name`` (of a ``what``, e.g. "scan backend", "model") follows ``NAME_RULE`` and is not
    in ``taken`` (name -> its owner, named in the message)."""
    if not isinstance(name, str) or not re.fullmatch(NAME_RULE, name):
        raise ValueError(f"{what} name {name!r}: use letters, digits and _, starting with a letter")
    if name in taken:
        raise ValueError(f"{what} name {name!r} clashes with {taken[name]}")


def owners(builtins, plugins: dict) -> dict[str, str]:
    """Who holds each name: "a built-in backend" or "package '<name>'" (``make_plugin``'s ``taken``); ``plugins``
    maps each plug-in's name to its record (a ``Plugin``, or a scan backend's: anything with a ``package``)."""
    return {**{b: "a built-in backend" for b in builtins},
            **{n: f"package {p.package or '(direct call)'!r}" for n, p in plugins.items()}}


def time_limit(kind: str) -> float:
    """The time limit of a plug-in run of ``kind`` ("load" or "check"), in seconds: ``TIME_LIMITS_S``'s
    environment variable when set, else its default. InputError for a value that is not a positive number."""
    from vimbench.errors import InputError
    var, default = TIME_LIMITS_S[kind]
    text = os.environ.get(var)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise InputError(f"{var}={text!r}: give the time limit as a positive number of seconds")
    return value


def worker_failure(kind: str, error: str) -> str:
    """``error`` of a worker that ran a plug-in (``run_isolated``'s), naming the variable that sets the limit
    of ``kind`` when the worker ran past it."""
    return f"{error} (limit set by {TIME_LIMITS_S[kind][0]})" if error.startswith("timed out") else error


def try_entry_point(group: str, name: str) -> dict:
    """Loads entry point ``name`` of ``group`` and calls its function: ``load_group``'s trial, run in a worker
    (whatever it registers there stays there)."""
    ep = next(ep for ep in importlib.metadata.entry_points(group=group) if ep.name == name)
    ep.load()()
    return {}


def returned(value) -> str:
    """What a plug-in function returned, in a few words: a tensor's type, shape, dtype and device, a
    sequence's items (at most 4), else the type's name."""
    import torch
    if isinstance(value, torch.Tensor):
        return f"Tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} on {value.device.type}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(returned(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"{type(value).__name__} ({items})"
    return "None" if value is None else type(value).__name__


def check_returned(kind: str, plugin: Plugin, what: str, got, want: list) -> None:
    """TypeError naming ``plugin`` (a ``kind`` backend) and what its ``what`` ("scan", "backward") returned
    unless ``got`` matches ``want``: a list of expected items, each (shape, dtype, device type) of the tensor
    that must be returned there (dtype None: any), or None where None must be; a one-item ``want`` means one
    tensor, not a sequence."""
    import torch
    items = [got] if len(want) == 1 else list(got) if isinstance(got, (tuple, list)) else []
    if len(items) == len(want) and all(
            g is None if w is None else isinstance(g, torch.Tensor) and (tuple(g.shape), g.device.type) == w[::2]
            and w[1] in (None, g.dtype) for g, w in zip(items, want)):
        return

    def spec(w):
        if w is None:
            return "None"
        return f"Tensor {w[0]}{'' if w[1] is None else ' ' + str(w[1]).removeprefix('torch.')} on {w[2]}"
    expected = spec(want[0]) if len(want) == 1 else f"({', '.join(map(spec, want))})"
    raise TypeError(f"{kind} backend {plugin.name!r} (package {plugin.package or '(direct call)'!r}): its {what} "
                    f"returned {returned(got)}, expected {expected}")


def _skip(group: str, ep_name: str, package: str, why: str) -> None:
    line = f"vimbench: skipped plug-in {ep_name!r} of package {package!r} ({group}): {why}"
    problems.append(line)
    if multiprocessing.parent_process() is None:  # said once, by the command, not by each worker
        print(line, file=sys.stderr)
        skipped = os.environ.get(SKIPPED_ENV, "")
        os.environ[SKIPPED_ENV] = skipped + f"{group}:{package}:{ep_name}\n"


def load_group(group: str) -> None:
    """Loads every entry point of ``group`` (one of ``GROUPS``) once per process; see the module docstring."""
    if group in _loaded:
        return
    from vimbench.measure.isolation import run_isolated
    worker = multiprocessing.parent_process() is not None
    limit = None if worker else time_limit("load")
    _loaded.add(group)
    skipped = os.environ.get(SKIPPED_ENV, "").splitlines()
    for ep in importlib.metadata.entry_points(group=group):
        package = ep.dist.name if ep.dist is not None else ep.value.split(":")[0]
        key = f"{group}:{package}:{ep.name}"
        if key in skipped or key in _tried:
            continue
        _tried.add(key)
        if not worker and package != "vimbench":  # vimbench's own entry points (the peers) need no trial
            trial = run_isolated(try_entry_point, (group, ep.name), timeout=limit)
            if trial["status"] != "ok":
                _skip(group, ep.name, package, f"in a trial run: {worker_failure('load', trial['error'])}")
                continue
        _loading.append(package)
        try:
            ep.load()()
        except BaseException as e:  # a broken plug-in costs its own backends only; its exit is not obeyed
            _skip(group, ep.name, package, f"{type(e).__name__}: {' '.join(str(e).split())}")
        finally:
            _loading.pop()
