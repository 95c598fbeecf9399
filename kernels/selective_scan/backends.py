"""Which selective-scan backends exist, what each one is, whether it can run on a device, and what ``auto`` means.

Every backend, built-in or plug-in, is one ``ScanBackend`` record in ``REGISTRY``: its forward, its
bidirectional pair (or the generic two launches), its fakes, the layouts it reads, its devices and
availability check, its backward, and the package it comes from. The entry points (``selective_scan``,
``bidirectional_scan``, the custom ops of ``ops.py``, ``check.py``) read the record; none names a backend.

Built-in backends (``BUILT_INS``, the only place that declares them; ``SCAN_BACKENDS`` their names):
    ref        sequential loop (ref.py), the correctness oracle; any device
    cpu        chunked pure PyTorch (chunked.py); any device
    cpp        compiled C++ on ATen's vectorised types (compiled_cpu.py, csrc/); CPU tensors, fp32/bf16/fp16;
               built on first use with the machine's C++ compiler and cached; reads any strides, and its
               compiled ops carry their own fakes, FLOP formulas and autograd
    triton     our fused Triton kernel and its backward (triton_kernel.py); CUDA tensors, or CPU tensors under
               TRITON_INTERPRET=1
    triton_pipelined
               the same kernel in its second launch design (4 warps per program, pipelined token loop;
               ``triton_kernel.DESIGNS``); same devices
    mamba_ssm  mamba_ssm's CUDA kernel, when that package imports; CUDA tensors
    auto       resolved per device by ``resolve_scan_backend`` (``AUTO_ORDER``); callers record the resolved name
Other packages add records with ``register_scan_backend``, directly or through the ``vimbench.scan_backends``
entry point (``vimbench.kernels.plugins``); ``scan_backends()`` lists them all. ``auto`` never resolves to a
plug-in.
No backend ever falls back to another: an unavailable one raises ``BackendUnavailable`` naming why.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from vimbench.errors import BackendUnavailable
from vimbench.kernels import peers
from vimbench.kernels.plugins import DEVICE_TYPES, Plugin, check_returned, load_group, make_plugin, owners
from vimbench.kernels.selective_scan import compiled_cpu, fakes
from vimbench.kernels.selective_scan.chunked import selective_scan_cpu, selective_scan_cpu_backward
from vimbench.kernels.selective_scan.ref import selective_scan_ref, selective_scan_ref_backward


@dataclass(frozen=True)
class ScanBackend:
    """One scan backend. Signatures: a forward has ``ref.selective_scan_ref``'s, a pair
    ``ref.bidirectional_scan_ref``'s (without ``scan``), a backward that of ``register_scan_backend``'s
    ``backward``; each fake the signature of what it fakes, run on fake tensors, allocating what that allocates
    on a GPU (memory prediction).

    name             the value of --scan / ``backend=``
    forward          one direction
    devices          the device types it runs on, of ``plugins.DEVICE_TYPES`` (the meta device, for FLOP
                     counting, works for every backend); ``runs_on_cuda`` reads it
    why_unavailable  device -> why the backend cannot run on that device here, in one line naming it ("" when it
                     can); ``check_scan_backend`` raises ``BackendUnavailable`` with it
    description      one line for listings
    package          None for a built-in; for a plug-in the distribution whose entry point registered it, ""
                     for a direct call
    pair             both directions of a Vim layer in one call; None: the generic pair, two launches of
                     ``forward`` (``ref.bidirectional_scan_ref`` with ``scan=forward``)
    strided          reads inputs of any strides (Vim's time-major views of in_proj's output as they are); the
                     entry points make every input contiguous for the others
    own_ops          ``forward`` and ``pair`` are torch ops with their own fakes, FLOP formulas and autograd
                     (the cpp scan's compiled ops, described in ``ops.py``): the entry points call them directly,
                     not through vimbench's custom ops, which run every other backend (with ``fake``,
                     ``pair_fake``, ``backward``, ``backward_fake`` below)
    fake, pair_fake  the fakes of ``forward`` and ``pair`` (None: no memory prediction; the generic pair's)
    backward         the gradients of ``forward``'s out; None: forward-only (unless ``own_ops``)
    backward_fake    ``backward``'s fake (None: no memory prediction of training)
    companion_impl   the implementation of the causal convs and of the add + RMSNorm that the Vim model runs
                     with this scan (``causal_conv.CONV_IMPLS``, ``rms_norm.NORM_IMPLS``)
    """
    name: str
    forward: Callable
    devices: tuple[str, ...]
    why_unavailable: Callable[[torch.device], str]
    description: str = ""
    package: str | None = None
    pair: Callable | None = None
    strided: bool = False
    own_ops: bool = False
    fake: Callable | None = None
    pair_fake: Callable | None = None
    backward: Callable | None = None
    backward_fake: Callable | None = None
    companion_impl: str = "torch"


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # a broken install (ImportError, ValueError, or whatever a parent package raises) = absent
        return False


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _anywhere(device: torch.device) -> str:
    return ""


def _cpp_why(device: torch.device) -> str:
    """On meta too the compiled ops must load: the model runs their fakes there."""
    if device.type not in ("cpu", "meta"):
        return f"scan backend 'cpp' needs CPU tensors, got {device.type}"
    ok, why = compiled_cpu.available()
    return "" if ok else f"scan backend 'cpp' is unavailable: {why}"


def _triton_why(design: str, device: torch.device) -> str:
    if not _importable("triton"):
        return f"scan backend {design!r} needs the triton package, which is not installed"
    if device.type != "cuda" and not (device.type == "cpu" and _triton_interpret()):
        return f"scan backend {design!r} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}"
    return ""


def _mamba_ssm_why(device: torch.device) -> str:
    if not _importable("mamba_ssm"):
        return "scan backend 'mamba_ssm' needs the mamba_ssm package, which is not installed"
    if device.type != "cuda":
        return f"scan backend 'mamba_ssm' needs CUDA tensors, got {device.type}"
    return ""


def _plugin_why(plugin: Plugin, device: torch.device) -> str:
    if device.type in plugin.devices + ("meta",):
        return ""
    return (f"scan backend {plugin.name!r} (package {plugin.package!r}) runs on {', '.join(plugin.devices)}, "
            f"not {device.type}")


def _mamba_ssm_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _mamba_ssm_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
    """mamba_ssm's own CUDA backward (its ``selective_scan_cuda`` fwd for the chunk states x, then bwd), with
    B and C in its (b, G, N, L) form. Untested here (no CUDA on the development machine); ``gpu-check``'s
    gradient check covers it."""
    import selective_scan_cuda
    squeeze = B.dim() == 3
    B4, C4 = (M.unsqueeze(1) if squeeze else M for M in (B, C))
    out, x, *rest = selective_scan_cuda.fwd(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus)
    du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = selective_scan_cuda.bwd(
        u, delta, A, B4, C4, D, z, delta_bias, dout, x, out, None, delta_softplus, False)
    dB, dC = (M.squeeze(1) if squeeze else M for M in (dB, dC))
    return (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), None if D is None else dD,
            rest[0] if z is not None else None, None if delta_bias is None else ddelta_bias)


def _cpp_scan(*args, **kwargs):
    return compiled_cpu.selective_scan_compiled(*args, **kwargs)


def _cpp_pair(*args, **kwargs):
    """Both directions in one compiled op, the output in time-major memory (for out_proj)."""
    return compiled_cpu.bidirectional_scan_compiled(*args, **kwargs, time_major_out=True)


def _triton_scan(*args, design, **kwargs):
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton
    return selective_scan_triton(*args, **kwargs, design=design)


def _triton_pair(*args, design, **kwargs):
    from vimbench.kernels.selective_scan.triton_kernel import bidirectional_scan_triton
    return bidirectional_scan_triton(*args, **kwargs, design=design)


def _triton_backward(*args, design, **kwargs):
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton_backward
    return selective_scan_triton_backward(*args, **kwargs, design=design)


TRITON_DESIGNS = ("triton", "triton_pipelined")
"""The backends that are launch designs of the Triton kernel (``triton_kernel.DESIGNS``)."""

BUILT_INS = (
    ScanBackend("ref", selective_scan_ref, DEVICE_TYPES, _anywhere,
                "sequential loop (ref.py), the correctness oracle", fake=fakes.ref_fake,
                backward=selective_scan_ref_backward, backward_fake=fakes.ref_bwd_fake),
    # selective_scan_cpu (and its backward) on fake tensors allocates exactly what it allocates for real, skipping
    # only its step loops, which allocate nothing
    ScanBackend("cpu", selective_scan_cpu, DEVICE_TYPES, _anywhere, "chunked pure PyTorch (chunked.py)",
                fake=fakes.cpu_fake, backward=selective_scan_cpu_backward, backward_fake=selective_scan_cpu_backward),
    ScanBackend("cpp", _cpp_scan, ("cpu",), _cpp_why, "compiled C++ on ATen's vector types (compiled_cpu.py)",
                pair=_cpp_pair, strided=True, own_ops=True, companion_impl="cpp"),
    *(ScanBackend(design, functools.partial(_triton_scan, design=design), ("cuda",),
                  functools.partial(_triton_why, design), f"fused Triton kernel, {design} launch design",
                  pair=functools.partial(_triton_pair, design=design), fake=fakes.triton_fake,
                  pair_fake=fakes.triton_pair_fake, backward=functools.partial(_triton_backward, design=design),
                  backward_fake=fakes.triton_bwd_fake(design))
      for design in TRITON_DESIGNS),
    ScanBackend("mamba_ssm", _mamba_ssm_scan, ("cuda",), _mamba_ssm_why, "mamba_ssm's CUDA kernel",
                fake=fakes.mamba_ssm_fake, backward=_mamba_ssm_backward, backward_fake=fakes.mamba_ssm_bwd_fake),
)
"""The built-in backends, in the order listings show them (see the module docstring)."""
SCAN_BACKENDS = tuple(record.name for record in BUILT_INS)
SCAN_CHOICES = SCAN_BACKENDS + ("auto",)
AUTO_ORDER = {"cuda": ("mamba_ssm", "triton"), "cpu": ("cpp",)}
"""Device type -> the built-ins ``auto`` tries there, fastest first; the first available one wins, else ``cpu``."""

REGISTRY: dict[str, ScanBackend] = {record.name: record for record in BUILT_INS}
"""Every scan backend by name: the built-ins, then the plug-ins as they register."""


def check_scan_backend(backend: str, device: torch.device | str) -> None:
    """Raises ``BackendUnavailable`` (or ValueError for an unknown name) if ``backend`` can't run on ``device``."""
    device = torch.device(device)
    if backend not in scan_backends() and peers.why_absent(backend):
        raise BackendUnavailable(peers.why_absent(backend))
    why = record(backend).why_unavailable(device)
    if why:
        raise BackendUnavailable(why)


def has_backward(backend: str) -> bool:
    """Whether ``backend`` has a backward, so that a train step can run through it: a record with a ``backward``
    or with ``own_ops`` (which carry their autograd)."""
    record = REGISTRY.get(backend)
    return record is not None and (record.own_ops or record.backward is not None)


def runs_on_cuda(backend: str) -> bool:
    """Whether ``backend`` has a CUDA implementation (installed here or not): its record lists the cuda device."""
    return "cuda" in record(backend).devices


# Under torch.compile the answer is taken as a constant at trace time: tracing the checks (a lock around the
# cpp build, importlib look-ups) would break the graph at every scan call.
@torch.compiler.assume_constant_result
def resolve_scan_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend that ``backend`` means on ``device``: 'auto' picks the first available of
    ``AUTO_ORDER`` (CUDA: mamba_ssm, else triton, else cpu; CPU: cpp when it builds here, else cpu; elsewhere,
    e.g. the meta device: cpu). Checks availability either way; the caller records the name it returns."""
    device = torch.device(device)
    if backend == "auto":
        backend = next((name for name in AUTO_ORDER.get(device.type, ())
                        if not REGISTRY[name].why_unavailable(device)), "cpu")
    check_scan_backend(backend, device)
    return backend


def describe(backend: str) -> str:
    """"scan backend 'NAME'", and for a plug-in the package that registered it: for messages."""
    if backend not in SCAN_CHOICES:
        load_group("vimbench.scan_backends")
    record = REGISTRY.get(backend)
    return f"scan backend {backend!r}" + ("" if record is None or record.package is None
                                          else f" (package {record.package or '(direct call)'!r})")


def forward_only(backend: str) -> str:
    """Why ``backend`` cannot train, in one line ("" when it has a backward: ``has_backward``)."""
    if has_backward(backend):
        return ""
    return f"{describe(backend)} is forward-only: it registered no backward, so it cannot train"


def scan_backward(backend: str) -> Callable:
    """``backend``'s backward (its record's); ``BackendUnavailable`` naming why for a forward-only backend (a
    plug-in that registered none) and for one with ``own_ops``, whose ops are not behind the ops that call this."""
    record = REGISTRY.get(backend)
    if record is not None and record.backward is not None:
        return record.backward
    raise BackendUnavailable(forward_only(backend) or f"scan backend {backend!r} has its own autograd, not "
                                                      f"through vimbench::selective_scan")


def scan_plugins() -> dict[str, ScanBackend]:
    """The records that plug-ins registered so far, by name."""
    return {name: record for name, record in REGISTRY.items() if record.package is not None}


def register_scan_backend(name: str, fn: Callable, *, devices, fake: Callable | None = None,
                          backward: Callable | None = None, backward_fake: Callable | None = None,
                          description: str = "") -> None:
    """Adds scan backend ``name``: usable as ``--scan NAME`` / ``scan=NAME`` everywhere, checked against
    ``ref`` before any timing (``check.py``), its FLOPs from ``scan_flops``.

    fn       a function with ``selective_scan_ref``'s signature and semantics: (u, delta, A, B, C, D=None,
             z=None, delta_bias=None, delta_softplus=False, return_last_state=False) -> out (b, E, L) in u's
             dtype, or (out, last state (b, E, N) float32) with ``return_last_state``; inputs contiguous
    devices  the device types it runs on, e.g. ("cuda",) or ("cpu", "cuda") (the meta device, for FLOP
             counting, works for every backend)
    fake     the same signature, run on fake tensors: allocates what ``fn`` allocates on a GPU, for memory
             prediction; without it predictions for this backend say they are unavailable
    backward the gradients of ``fn``'s out, so that the backend can train (without it the backend is
             forward-only: ``--mode train`` refuses it): (u, delta, A, B, C, D, z, delta_bias, delta_softplus,
             dout) -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); the inputs as ``fn`` gets them (contiguous,
             None for an absent one), dout (b, E, L) contiguous in u's dtype; each gradient in its input's
             shape and dtype, None for an absent input; ddelta is the gradient of the raw delta (before bias
             and softplus); a grouped B's and C's gradients are summed over each group's channels; the last
             state gets no gradient (as in mamba_ssm). Checked against float64 autograd of ``ref`` before any
             train timing (``check.check_backward``)
    backward_fake  ``backward``'s signature, run on fake tensors: allocates what ``backward`` allocates on a
             GPU, for memory prediction of training
    ValueError for a name that is not a plain identifier or is taken (a built-in's or already registered).
    """
    plugin = make_plugin("scan", name, fn, devices, fake, description, owners(SCAN_CHOICES, scan_plugins()),
                         backward=backward, backward_fake=backward_fake)
    REGISTRY[name] = ScanBackend(name, _checked_scan(plugin), plugin.devices, functools.partial(_plugin_why, plugin),
                                 description, plugin.package, fake=fake,
                                 backward=None if backward is None else _checked_backward(plugin),
                                 backward_fake=backward_fake)


def _tensor(x: torch.Tensor | None) -> tuple | None:
    """(shape, dtype, device type) of ``x`` (None for None): an item of ``plugins.check_returned``'s want."""
    return None if x is None else (tuple(x.shape), x.dtype, x.device.type)


def _checked_scan(plugin: Plugin) -> Callable:
    """The plug-in's forward ``fn``, its result checked on every call (``plugins.check_returned``; a TypeError
    naming the plug-in and what it returned): out (b, E, L) in u's dtype on u's device, and with
    ``return_last_state`` the last state (b, E, N) float32 beside it."""
    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        got = plugin.fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=return_last_state)
        want = [_tensor(u)]
        if return_last_state:
            want.append(((u.shape[0], u.shape[1], A.shape[1]), torch.float32, u.device.type))
        check_returned("scan", plugin, "scan", got, want)
        return got
    return scan


def _checked_backward(plugin: Plugin) -> Callable:
    """The plug-in's ``backward``, its result checked on every call: the 8 gradients, each in its input's shape,
    dtype and device, None for an absent input (``register_scan_backend``)."""
    def backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout):
        got = plugin.backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout)
        check_returned("scan", plugin, "backward", got, [_tensor(x) for x in (u, delta, A, B, C, D, z, delta_bias)])
        return got
    return backward


def scan_backends() -> tuple[str, ...]:
    """Every scan backend name: the built-ins (``SCAN_BACKENDS``), then the plug-ins (loading the entry points
    on first use)."""
    load_group("vimbench.scan_backends")
    return tuple(REGISTRY)


def record(backend: str) -> ScanBackend:
    """``backend``'s record, loading the plug-ins' entry points first when it is not registered yet (a worker
    process meets a plug-in's name before anything there listed the backends); ValueError for an unknown name."""
    if backend not in REGISTRY:
        load_group("vimbench.scan_backends")
    if backend not in REGISTRY:
        raise ValueError(f"unknown scan backend {backend!r}; choose from {', '.join(scan_choices())}")
    return REGISTRY[backend]


def scan_choices() -> tuple[str, ...]:
    """``scan_backends()`` and ``auto``: every value a --scan option takes."""
    return scan_backends() + ("auto",)
