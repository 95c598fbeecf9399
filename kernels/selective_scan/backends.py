"""Which selective-scan backends exist, whether one can run on a device, and what ``auto`` means.

Backends (``SCAN_BACKENDS``):
    ref        sequential loop (ref.py), the correctness oracle; any device
    cpu        chunked pure PyTorch (chunked.py); any device
    cpp        compiled C++ on ATen's vectorised types (compiled_cpu.py, csrc/); CPU tensors, fp32/bf16/fp16;
               built on first use with the machine's C++ compiler and cached
    triton     our fused Triton kernel and its backward (triton_kernel.py); CUDA tensors, or CPU tensors under
               TRITON_INTERPRET=1
    triton_pipelined
               the same kernel in its second launch design (4 warps per program, pipelined token loop;
               ``triton_kernel.DESIGNS``); same devices
    mamba_ssm  mamba_ssm's CUDA kernel, when that package imports; CUDA tensors
    auto       resolved per device by ``resolve_scan_backend``; callers record the resolved name
Other packages add backends with ``register_scan_backend`` (``PLUGINS``), directly or through the
``vimbench.scan_backends`` entry point (``vimbench.kernels.plugins``); ``scan_backends()`` lists them all.
``auto`` never resolves to a plug-in.
No backend ever falls back to another: an unavailable one raises ``BackendUnavailable`` naming why.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch

from vimbench.errors import BackendUnavailable
from vimbench.kernels import peers
from vimbench.kernels.plugins import Plugin, check_returned, load_group, make_plugin, owners
from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.kernels.selective_scan.chunked import selective_scan_cpu, selective_scan_cpu_backward
from vimbench.kernels.selective_scan.ref import selective_scan_ref, selective_scan_ref_backward

SCAN_BACKENDS = ("ref", "cpu", "cpp", "triton", "triton_pipelined", "mamba_ssm")
TRITON_DESIGNS = ("triton", "triton_pipelined")
"""The backends that are launch designs of the Triton kernel (``triton_kernel.DESIGNS``)."""
SCAN_CHOICES = SCAN_BACKENDS + ("auto",)
STRIDED = ("cpp",)
"""Backends that read inputs of any strides (Vim's time-major views of in_proj's output as they are); the
entry points make every input contiguous for the others."""


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # a broken install (ImportError, ValueError, or whatever a parent package raises) = absent
        return False


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


CPU_ONLY = ("cpp",)
"""Built-in backends with no CUDA implementation at all (so no GPU run to predict memory for)."""


def check_scan_backend(backend: str, device: torch.device | str) -> None:
    """Raises ``BackendUnavailable`` (or ValueError for an unknown name) if ``backend`` can't run on ``device``."""
    device = torch.device(device)
    if backend not in scan_backends():
        if peers.why_absent(backend):
            raise BackendUnavailable(peers.why_absent(backend))
        raise ValueError(f"unknown scan backend {backend!r}; choose from {', '.join(scan_choices())}")
    plugin = PLUGINS.get(backend)
    if plugin is not None and device.type not in plugin.devices + ("meta",):
        raise BackendUnavailable(f"scan backend {backend!r} (package {plugin.package!r}) runs on "
                                 f"{', '.join(plugin.devices)}, not {device.type}")
    if backend in TRITON_DESIGNS:
        if not _importable("triton"):
            raise BackendUnavailable(f"scan backend {backend!r} needs the triton package, which is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpret()):
            raise BackendUnavailable(
                f"scan backend {backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}")
    if backend in CPU_ONLY and device.type not in ("cpu", "meta"):
        raise BackendUnavailable(f"scan backend {backend!r} needs CPU tensors, got {device.type}")
    if backend == "cpp" and device.type in ("cpu", "meta"):  # on meta too: the model runs its compiled ops' fakes
        ok, why = compiled_cpu.available()
        if not ok:
            raise BackendUnavailable(f"scan backend 'cpp' is unavailable: {why}")
    if backend == "mamba_ssm":
        if not _importable("mamba_ssm"):
            raise BackendUnavailable("scan backend 'mamba_ssm' needs the mamba_ssm package, which is not installed")
        if device.type != "cuda":
            raise BackendUnavailable(f"scan backend 'mamba_ssm' needs CUDA tensors, got {device.type}")


WITH_BACKWARD = ("ref", "cpu", "cpp", "triton", "triton_pipelined", "mamba_ssm")
"""Built-in backends with a backward (``--mode train``): all of them."""


def has_backward(backend: str) -> bool:
    """Whether ``backend`` has a backward, so that a train step can run through it: a built-in in
    ``WITH_BACKWARD``, or a plug-in that registered one."""
    plugin = PLUGINS.get(backend)
    return plugin.backward is not None if plugin is not None else backend in WITH_BACKWARD


def runs_on_cuda(backend: str) -> bool:
    """Whether ``backend`` has a CUDA implementation (installed here or not): not the CPU-only built-ins, and
    for a plug-in whether it registered the cuda device."""
    plugin = PLUGINS.get(backend)
    return "cuda" in plugin.devices if plugin is not None else backend not in CPU_ONLY


# Under torch.compile the answer is taken as a constant at trace time: tracing the checks (a lock around the
# cpp build, importlib look-ups) would break the graph at every scan call.
@torch.compiler.assume_constant_result
def resolve_scan_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend that ``backend`` means on ``device``: 'auto' picks the fastest available
    (CUDA: mamba_ssm, else triton, else cpu; CPU: cpp when it builds here, else cpu; elsewhere, e.g. the meta
    device: cpu). Checks availability either way; the caller records the name it returns."""
    device = torch.device(device)
    if backend == "auto":
        backend = "cpu"
        if device.type == "cuda":
            backend = next((name for name in ("mamba_ssm", "triton") if _importable(name)), "cpu")
        elif device.type == "cpu" and compiled_cpu.available()[0]:
            backend = "cpp"
    check_scan_backend(backend, device)
    return backend


def _mamba_ssm_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _triton_scan(*args, **kwargs):
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton
    return selective_scan_triton(*args, **kwargs)


def _triton_pipelined_scan(*args, **kwargs):
    return _triton_scan(*args, **kwargs, design="triton_pipelined")


def _triton_backward(*args, **kwargs):
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton_backward
    return selective_scan_triton_backward(*args, **kwargs)


def _triton_pipelined_backward(*args, **kwargs):
    return _triton_backward(*args, **kwargs, design="triton_pipelined")


def _cpp_scan(*args, **kwargs):
    return compiled_cpu.selective_scan_compiled(*args, **kwargs)


IMPLS = {"ref": selective_scan_ref, "cpu": selective_scan_cpu, "cpp": _cpp_scan, "triton": _triton_scan,
         "triton_pipelined": _triton_pipelined_scan, "mamba_ssm": _mamba_ssm_scan}
"""Backend name -> one-direction scan with ``ref.selective_scan_ref``'s signature."""


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


BACKWARDS = {"ref": selective_scan_ref_backward, "cpu": selective_scan_cpu_backward, "triton": _triton_backward,
             "triton_pipelined": _triton_pipelined_backward, "mamba_ssm": _mamba_ssm_backward}
"""Backend name -> the backward of its one-direction scan, with the signature of ``register_scan_backend``'s
``backward``. ``cpp`` is not here: its compiled ops carry their own autograd (``compiled_cpu``)."""


def describe(backend: str) -> str:
    """"scan backend 'NAME'", and for a plug-in the package that registered it: for messages."""
    if backend not in SCAN_CHOICES:
        load_group("vimbench.scan_backends")
    plugin = PLUGINS.get(backend)
    return f"scan backend {backend!r}" + ("" if plugin is None else f" (package {plugin.package or '(direct call)'!r})")


def forward_only(backend: str) -> str:
    """Why ``backend`` cannot train, in one line ("" when it has a backward: ``has_backward``)."""
    if has_backward(backend):
        return ""
    return f"{describe(backend)} is forward-only: it registered no backward, so it cannot train"


def scan_backward(backend: str) -> Callable:
    """``backend``'s backward (``BACKWARDS``, or a plug-in's); ``BackendUnavailable`` naming why for a
    forward-only backend (a plug-in that registered none) and for ``cpp``, whose compiled
    ops are not behind the ops that call this."""
    if backend in BACKWARDS:
        return BACKWARDS[backend]
    raise BackendUnavailable(forward_only(backend) or f"scan backend {backend!r} has its own autograd, not "
                                                      f"through vimbench::selective_scan")


PLUGINS: dict[str, Plugin] = {}


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
    plugin = make_plugin("scan", name, fn, devices, fake, description, owners(SCAN_CHOICES, PLUGINS),
                         backward=backward, backward_fake=backward_fake)
    PLUGINS[name] = plugin
    IMPLS[name] = _checked_scan(plugin)
    if backward is not None:
        BACKWARDS[name] = _checked_backward(plugin)


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
    return SCAN_BACKENDS + tuple(PLUGINS)


def scan_choices() -> tuple[str, ...]:
    """``scan_backends()`` and ``auto``: every value a --scan option takes."""
    return scan_backends() + ("auto",)
