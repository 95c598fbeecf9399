"""Attention's token-mixer core, softmax(Q K^T / sqrt(d)) V, with an explicit backend.

Shapes: q, k, v (b, H, L, d) -> (b, H, L, d). Backends (``ATTENTION_BACKENDS``):
    eager      the scores (b, H, L, L) materialised with two matmuls and a softmax: what the Vim paper's
               DeiT ran (timm 0.4.12 had no fused attention). The reference for the others.
    sdpa       F.scaled_dot_product_attention with PyTorch's own kernel choice (``sdpa_kernel_used`` says
               which one it took)
    flash, efficient, math, cudnn
               SDPA forced to that kernel with torch.nn.attention.sdpa_kernel; a kernel that cannot run
               on the device/dtype/shape raises ``BackendUnavailable`` instead of falling back.
Other packages add backends with ``register_attention_backend`` (``ATTENTION_PLUGINS``), directly or through
the ``vimbench.attention_backends`` entry point; ``attention_backends()`` lists them all.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from vimbench.errors import BackendUnavailable
from vimbench.kernels.plugins import Plugin, check_returned, load_group, make_plugin, owners

_FORCED = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "math": SDPBackend.MATH}
if hasattr(SDPBackend, "CUDNN_ATTENTION"):
    _FORCED["cudnn"] = SDPBackend.CUDNN_ATTENTION
ATTENTION_BACKENDS = ("eager", "sdpa", "flash", "efficient", "math", "cudnn")


def attention_eager(q, k, v):
    """The materialised reference: softmax(q k^T * d^-0.5) v, scores (b, H, L, L) in q's dtype."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


DEFAULT_CAPABILITY = (9, 0)
"""The card modelled on a host without a GPU: an H100/H200 (sm_90), the memory command's default card."""
_CARD = contextvars.ContextVar("vimbench_sdpa_card", default=None)


@contextlib.contextmanager
def modelled_card(capability: tuple[int, int] | None):
    """Within it, fake CUDA tensors model SDPA's choice as on a card of compute ``capability`` (None: the
    default of ``sdpa_fused_kernel``)."""
    token = _CARD.set(capability)
    try:
        yield
    finally:
        _CARD.reset(token)


_CPU_AS_CUDA = contextvars.ContextVar("vimbench_fake_cpu_as_cuda", default=False)


@contextlib.contextmanager
def fake_cpu_as_cuda():
    """Within it, ``attention`` treats fake CPU tensors as fake CUDA tensors. A train step's memory is predicted
    on fake CPU tensors: on a host without a GPU, torch's autograd engine refuses to run a backward through
    CUDA tensors, fake or not (it queries the CUDA device's streams)."""
    token = _CPU_AS_CUDA.set(True)
    try:
        yield
    finally:
        _CPU_AS_CUDA.reset(token)


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def prefers_cudnn(capability: tuple[int, int], torch_version: str = torch.__version__,
                  cudnn_version: int | None = None, cuda_version: str | None = torch.version.cuda) -> bool:
    """Whether the installed torch tries cuDNN attention before flash on a card of ``capability``.

    torch >= 2.11: aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, ``check_prefer_cudnn_attention()``
    (read on pytorch main at commit 001f694a) puts cuDNN first unless TORCH_CUDNN_SDPA_DEPRIORITIZED=1, when
    the runtime cuDNN version is > 91500 (newer than 9.15.0) and the card is sm_9x/sm_10x with minor 0 or 3,
    the minor check dropped in builds for CUDA >= 13 (H100/H200/B200 have minor 0 either way). torch 2.5.0
    had cuDNN first on every card (``priority_order``'s default_order); other versions are modelled with
    flash first (some 2.8-2.10 builds may already prefer cuDNN on sm_90: on a GPU the tests compare this
    model with the kernel SDPA runs, ``sdpa_kernel_used``).
    ``cudnn_version``: torch.backends.cudnn.version() when None (readable without a GPU)."""
    tv = _version_tuple(torch_version)
    if tv == (2, 5):
        return True
    if tv < (2, 11) or os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED", "0") not in ("", "0"):
        return False
    cudnn_version = torch.backends.cudnn.version() if cudnn_version is None else cudnn_version
    major, minor = capability
    new_cuda = cuda_version is not None and _version_tuple(cuda_version) >= (13, 0)
    return bool(cudnn_version) and cudnn_version > 91500 and major in (9, 10) and (new_cuda or minor in (0, 3))


def sdpa_fused_kernel(dtype: torch.dtype, capability: tuple[int, int] | None = None) -> str:
    """The kernel SDPA picks for unmasked, dropout-free attention with head_dim 64 (DeiT's) on a card of
    compute ``capability``, by the installed torch's rules (torch's ``select_sdp_backend``: the first in
    priority order whose checks pass). ``capability`` None: the one set by ``modelled_card``, else the GPU
    here, else ``DEFAULT_CAPABILITY``. cuDNN and flash take only fp16/bf16 and need sm_80+ (flash up to
    sm_121); memory-efficient runs from sm_50 in any dtype; math otherwise. On real hardware the kernel a
    run used is recorded from the dispatcher (``sdpa_kernel_used``); the GPU tests check this model
    against it."""
    if capability is None:
        capability = _CARD.get() or (torch.cuda.get_device_capability() if torch.cuda.is_available()
                                     else DEFAULT_CAPABILITY)
    half = dtype in (torch.float16, torch.bfloat16)
    if half and capability >= (8, 0):
        if "cudnn" in _FORCED and prefers_cudnn(capability):
            return "cudnn"
        if capability <= (12, 1):
            return "flash"
    return "efficient" if capability >= (5, 0) else "math"


_FUSED = ("flash", "efficient", "cudnn")


def _fused_attention_fake(q, k, v, kernel: str):
    """What a fused kernel allocates on fake tensors (memory prediction). In an inference forward: the
    output, written as (b, L, H, d) and returned transposed to (b, H, L, d) by all three, plus flash's
    logsumexp (b, H, L) float32, dropped by SDPA (efficient and cudnn compute it only for autograd). When a
    gradient is wanted: the kernel's own aten op, whose fake allocates what the CUDA kernel does (the output
    and the logsumexp, which autograd saves with q, k, v; efficient's padded to a multiple of 32 tokens) and
    whose backward's fake allocates dq, dk, dv."""
    if kernel in ("flash", "cudnn") and q.dtype not in (torch.float16, torch.bfloat16):
        raise BackendUnavailable(f"attention backend {kernel!r} needs float16 or bfloat16 inputs, got {q.dtype}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if kernel == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        if kernel == "efficient":
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[0]
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[0]
    b, H, L, _ = q.shape
    out = q.new_empty(b, L, H, v.shape[-1]).transpose(1, 2)
    if kernel == "flash":
        q.new_empty(b, H, L, dtype=torch.float32)
    return out


def attention(q, k, v, backend: str = "sdpa"):
    """softmax(q k^T / sqrt(d)) v for q, k, v (b, H, L, d) with the named backend (see module docstring).

    On fake CUDA tensors (FakeTensorMode, memory prediction; fake CPU tensors within ``fake_cpu_as_cuda``,
    a train step's prediction) the fused backends, and ``sdpa`` through
    ``sdpa_fused_kernel``, only allocate what the kernel allocates (``_fused_attention_fake``)."""
    if backend not in ATTENTION_BACKENDS:
        if backend not in attention_backends():
            raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(attention_backends())}")
        return _plugin_attention(ATTENTION_PLUGINS[backend], q, k, v)
    if isinstance(q, FakeTensor) and (q.device.type == "cuda" or (q.device.type == "cpu" and _CPU_AS_CUDA.get())):
        kernel = sdpa_fused_kernel(q.dtype) if backend == "sdpa" else backend
        if kernel in _FUSED:
            return _fused_attention_fake(q, k, v, kernel)
    if backend == "eager":
        return attention_eager(q, k, v)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend not in _FORCED:
        raise BackendUnavailable(f"attention backend {backend!r} needs a newer torch ({torch.__version__})")
    try:
        with sdpa_kernel(_FORCED[backend]):
            return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as e:
        if "No available kernel" in str(e) or "No viable backend" in str(e):
            raise BackendUnavailable(f"attention backend {backend!r} cannot run on {q.device.type} with "
                                     f"{str(q.dtype).removeprefix('torch.')} and head_dim {q.shape[-1]}") from None
        raise


def check_attention_backend(backend: str, device, dtype: torch.dtype, head_dim: int) -> None:
    """Raises ``BackendUnavailable`` if ``backend`` cannot run on (device, dtype, head_dim): a tiny probe.
    Any failure of the probe (a cuDNN-frontend error, a CUDA error) means unavailable, with its reason."""
    if backend in ("eager", "sdpa") or torch.device(device).type == "meta":
        return
    if backend in ATTENTION_PLUGINS and torch.device(device).type not in ATTENTION_PLUGINS[backend].devices:
        raise BackendUnavailable(f"attention backend {backend!r} (package {ATTENTION_PLUGINS[backend].package!r}) "
                                 f"runs on {', '.join(ATTENTION_PLUGINS[backend].devices)}")
    try:
        q = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype)
        attention(q, q, q, backend)
    except (BackendUnavailable, ValueError):
        raise
    except Exception as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise BackendUnavailable(f"attention backend {backend!r} failed its probe on {torch.device(device)} with "
                                 f"{str(dtype).removeprefix('torch.')}: {type(e).__name__}: {why}") from None


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=None)
def _sdpa_choice(device_type: str, dtype: torch.dtype, L: int, d: int, H: int) -> str:
    # outside inference mode: under it the dispatcher shows SDPA's composite op, not the kernel it picks
    with torch.inference_mode(False), _OpRecorder() as rec:
        q = torch.zeros(1, H, L, d, device=device_type, dtype=dtype)
        F.scaled_dot_product_attention(q, q, q)
    for name in rec.names:
        for kernel in ("flash", "efficient", "cudnn"):
            if kernel in name:
                return kernel
    return "math"


def sdpa_kernel_used(device, dtype: torch.dtype, L: int, head_dim: int, heads: int) -> str:
    """The kernel PyTorch's SDPA picks for (device, dtype, L, head_dim, heads): flash, efficient, cudnn
    or math (for CPU, "flash" is its flash-style CPU kernel). Found by recording the aten op dispatched
    for a single-image probe (the choice does not depend on batch)."""
    if torch.device(device).type == "meta":
        return "unknown"
    return _sdpa_choice(torch.device(device).type, dtype, L, head_dim, heads)



ATTENTION_PLUGINS: dict[str, Plugin] = {}


def register_attention_backend(name: str, fn: Callable, *, devices, fake: Callable | None = None,
                               description: str = "") -> None:
    """Adds attention backend ``name`` (``--attn NAME`` / ``attn=NAME`` everywhere). ``fn(q, k, v)`` computes
    softmax(q k^T / sqrt(d)) v for q, k, v (b, H, L, d) -> (b, H, L, d) in q's dtype; ``devices`` the device
    types it runs on; ``fake`` the same signature on fake tensors, allocating what ``fn`` allocates on a GPU
    (memory prediction; without it a prediction says it is unavailable). ValueError for a taken name."""
    ATTENTION_PLUGINS[name] = make_plugin("attention", name, fn, devices, fake, description,
                                          owners(ATTENTION_BACKENDS, ATTENTION_PLUGINS))


def attention_backends() -> tuple[str, ...]:
    """Every attention backend name: the built-ins, then the plug-ins (entry points loaded on first use)."""
    load_group("vimbench.attention_backends")
    return ATTENTION_BACKENDS + tuple(ATTENTION_PLUGINS)


def _plugin_attention(plugin: Plugin, q, k, v):
    """A plug-in's attention, its result checked (``plugins.check_returned``: q's shape and device, and outside
    autocast its dtype); on fake tensors (memory prediction) its fake, or BackendUnavailable without one."""
    if isinstance(q, FakeTensor):
        if plugin.fake is None:
            raise BackendUnavailable(f"memory prediction unavailable: attention backend {plugin.name!r} "
                                     f"(package {plugin.package!r}) registered no fake")
        return plugin.fake(q, k, v)
    out = plugin.fn(q, k, v)
    dtype = None if torch.is_autocast_enabled(q.device.type) else q.dtype  # autocast may pick the matmuls' dtype
    check_returned("attention", plugin, "attention", out, [(tuple(q.shape), dtype, q.device.type)])
    return out
