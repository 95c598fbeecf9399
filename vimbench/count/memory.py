"""Predicted peak GPU memory of an inference forward pass or of a train step, without a GPU.

    predict_memory(MemoryConfig("deit_tiny", {"attn": "eager"}, res=1248, batch=64))
    -> MemoryPrediction(impl="eager", ..., params=5717416, mem_pred_weights_gib=0.021, ...)

Method. The model is built on the meta device, then under ``FakeTensorMode`` moved to a fake "cuda" device
with ``to_empty``: parameters, the input and every activation are fake tensors (metadata only), so a
DeiT-Ti at 1248 x 1248 with batch 64 costs nothing real. The forward runs under ``torch.no_grad`` (a
forward under ``torch.inference_mode`` allocates the same tensors, but under it composite ops such as
SDPA, matmul or rms_norm reach a dispatch mode whole, hiding the temporaries they allocate inside)
inside ``AllocationTracker``, a ``TorchDispatchMode`` that records one allocation per new storage an op
creates and one free when that storage dies (a weakref finalizer), in program order. That trace (weights
first, in parameter order, as ``model.cuda()`` allocates them; then the input; then the forward) is replayed
through ``CachingAllocatorModel``, a model of PyTorch's CUDA caching allocator, which gives the peak
allocated bytes (what ``torch.cuda.max_memory_allocated`` reports) and the reserved bytes
(``max_memory_reserved``: segments obtained with cudaMalloc and kept as cache).

What a dispatch-level trace cannot see is modelled where it matters:
  * the selective scan custom ops are traced through their fake implementations, which allocate what each
    backend allocates on a GPU (``vimbench.kernels.selective_scan``: fused triton writes only y; mamba_ssm
    also its chunk states; ``ref`` and ``cpu`` their temporaries);
  * fused attention (flash, efficient, cudnn, and ``sdpa`` on CUDA) allocates only its output (and flash
    its logsumexp), modelled in ``vimbench.kernels.attention``: on fake CUDA tensors SDPA would otherwise
    take the materialising math path.
Autocast (``amp``): the forward runs under torch.autocast("cuda") on the fake tensors, so the trace has the
half-precision copies autocast makes (weights cast once per forward and cached until it ends, activations
cast at each op); the prediction is of eager execution (a torch.compile'd forward allocates differently).
Train step (``mode="train"``, ``trace_train_step``). The step ``vimbench scaling --mode train`` times
(``vimbench.measure.train``): the model in train mode, SGD with momentum 0.9 (foreach, as on CUDA); each step
is forward, loss (cross-entropy on labels with the head, the mean of the squared features for the
backbone), ``backward()``,
``optimizer.step()``, ``zero_grad(set_to_none=True)``. Two steps are traced and the peak is over both: the
momentum buffers are allocated by the first step and kept, so the second step's peak is the steady state
(what ``max_memory_allocated`` reports after any number of steps). The trace sees everything autograd
saves (eager attention's (b, H, L, L) probabilities; a fused kernel's output and logsumexp through its aten
op's fake; each scan backend's saved tensors through its custom op's autograd and the fakes of its forward
and backward), the gradients as the backward accumulates them, the momentum buffers, and with
``grad_checkpointing`` the blocks' recomputation (torch.utils.checkpoint, per block). It runs on fake
*CPU* tensors standing for CUDA ones (``fake_cpu_as_cuda``): on a host without a GPU torch's autograd engine
refuses a backward through CUDA tensors, fake or not. The ops of these models allocate the same outputs on
both devices; what differs by device is modelled (fused attention as on CUDA; the scan backend resolved as
on CUDA). Not modelled: a train step under autocast (refused).
Not counted: workspaces a library allocates inside a kernel (cuBLAS keeps ~32 MiB per handle on Hopper,
cuDNN convolution workspaces), and the CUDA context (~0.5 GiB, outside the allocator: see
``vimbench.commands.memory``). Units: bytes internally, GiB = 2**30 bytes in every ``*_gib`` value.
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vimbench.config import ModelVariant
from vimbench.kernels.attention import fake_cpu_as_cuda, modelled_card, sdpa_fused_kernel
from vimbench.measure.core import DTYPES, GIB
from vimbench.measure.train import LR, MOMENTUM, train_loss
from vimbench.errors import BackendUnavailable
from vimbench.kernels.selective_scan import bidirectional_scan_fake, has_memory_model, selective_scan_fake
from vimbench.kernels.selective_scan.backends import has_backward
from vimbench.kernels.selective_scan.ops import bidirectional_scan_bwd_fake, selective_scan_bwd_fake
from vimbench.models.registry import OWN_IMPL, count_params, create_model


# PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp), default configuration.
MIN_BLOCK = 512                 # every request rounds up to a multiple of this (kMinBlockSize)
SMALL_SIZE = 1 << 20            # requests up to this come from the small pool (kSmallSize)
SMALL_SEGMENT = 2 << 20         # small-pool segment size (kSmallBuffer)
LARGE_SEGMENT = 20 << 20        # large-pool segment for requests below MIN_LARGE_ALLOC (kLargeBuffer)
MIN_LARGE_ALLOC = 10 << 20      # from here a segment is the request rounded up to ROUND_LARGE (kMinLargeAlloc)
ROUND_LARGE = 2 << 20           # (kRoundLarge)


def round_request(nbytes: int) -> int:
    """The block size the allocator hands out for a request of ``nbytes``: a multiple of 512, at least 512."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(block: int) -> int:
    """Bytes cudaMalloc'ed for a new segment that must hold a (rounded) ``block``."""
    if block <= SMALL_SIZE:
        return SMALL_SEGMENT
    if block < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-block // ROUND_LARGE) * ROUND_LARGE


# ----------------------------------------------------------------------------------------------------
# The trace
# ----------------------------------------------------------------------------------------------------

@dataclass
class AllocationTrace:
    """Allocations and frees in program order: ``events[i] = (block_id, nbytes)`` allocates ``nbytes``
    (as requested, unrounded) when positive and frees block ``block_id`` when ``nbytes`` is 0. The first
    ``n_weights`` events are the model's weights."""
    events: list[tuple[int, int]] = field(default_factory=list)
    n_weights: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)

    def alloc(self, nbytes: int) -> int:
        block = next(self._ids)
        self.events.append((block, nbytes))
        return block

    def free(self, block: int) -> None:
        self.events.append((block, 0))

    def peak_live(self) -> int:
        """Peak of the live bytes, each allocation rounded as the allocator rounds it (no cache, no splits)."""
        sizes, live, peak = {}, 0, 0
        for block, nbytes in self.events:
            if nbytes:
                sizes[block] = round_request(nbytes)
                live += sizes[block]
                peak = max(peak, live)
            else:
                live -= sizes.pop(block)
        return peak


class AllocationTracker(TorchDispatchMode):
    """Records in ``trace`` every storage that a dispatched op creates (on allocation) and its death (a
    weakref finalizer on the storage). An output sharing the storage of one of the op's inputs (views,
    in-place and ``out=`` ops) records nothing, nor does a zero-byte storage (no allocator call).

    ``inline`` maps an op to a Python function with the op's signature that is run in its place with the
    tracker active, so that tensors it allocates and frees inside are recorded too (the custom scan ops'
    fake implementations; a test passes their real implementations).
    """

    def __init__(self, trace: AllocationTrace, inline: dict | None = None):
        super().__init__()
        self.trace, self.inline = trace, inline or {}
        self._live: set[int] = set()

    def track(self, tensor: torch.Tensor) -> None:
        """Records ``tensor``'s storage if it is new."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live or storage.nbytes() == 0:
            return
        self._live.add(key)
        weakref.finalize(storage, self._on_free, key, self.trace.alloc(storage.nbytes()))

    def _on_free(self, key: int, block: int) -> None:
        self._live.discard(key)
        self.trace.free(block)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.inline:
            with self:
                out = self.inline[func](*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage()._cdata not in inputs:
                self.track(leaf)
        return out


SCAN_FAKES = {torch.ops.vimbench.selective_scan.default: selective_scan_fake,
              torch.ops.vimbench.bidirectional_scan.default: bidirectional_scan_fake,
              torch.ops.vimbench.selective_scan_bwd.default: selective_scan_bwd_fake,
              torch.ops.vimbench.bidirectional_scan_bwd.default: bidirectional_scan_bwd_fake}
"""The custom ops whose fake implementations run inside the tracker (they allocate scan temporaries): the
scans and their backwards."""


# ----------------------------------------------------------------------------------------------------
# The caching allocator
# ----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Block:
    addr: int
    size: int
    small: bool
    free: bool = True
    prev: "_Block | None" = None
    next: "_Block | None" = None


class CachingAllocatorModel:
    """Replays an ``AllocationTrace`` through a model of PyTorch's CUDA caching allocator (one stream, default
    ``PYTORCH_CUDA_ALLOC_CONF``, no capacity limit, no ``empty_cache``):

      * a request rounds up to a multiple of 512 B; requests <= 1 MiB use the small pool, larger ones the
        large pool;
      * it takes the best-fitting cached free block of its pool (smallest size, then lowest address); if
        none fits, a new segment is cudaMalloc'ed: 2 MiB (small pool), 20 MiB (requests < 10 MiB) or the
        request rounded up to 2 MiB;
      * the block is split when the remainder is >= 512 B (small pool) or > 1 MiB (large pool); otherwise
        the whole block is handed out and counted as allocated;
      * a freed block merges with free neighbours of its segment and stays cached; segments are never
        returned to the driver.

    ``allocated``/``reserved`` are the current bytes, ``peak_allocated``/``peak_reserved`` their maxima
    (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``).
    """

    def __init__(self):
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self._free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}  # by pool: (size, addr, block)
        self._blocks: dict[int, _Block] = {}

    def replay(self, events: list[tuple[int, int]]) -> "CachingAllocatorModel":
        """Applies ``AllocationTrace.events`` (or a slice of them) in order."""
        for block_id, nbytes in events:
            if nbytes:
                self._blocks[block_id] = self.malloc(nbytes)
            else:
                self.release(self._blocks.pop(block_id))
        return self

    def malloc(self, nbytes: int) -> _Block:
        size = round_request(nbytes)
        small = size <= SMALL_SIZE
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            block = pool.pop(i)[2]
        else:
            seg = segment_size(size)
            block = _Block(self.reserved, seg, small)   # a fresh address range per segment
            self.reserved += seg
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block.size - size
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            rest = _Block(block.addr + size, remaining, small, prev=block, next=block.next)
            if block.next:
                block.next.prev = rest
            block.next, block.size = rest, size
            bisect.insort(pool, (rest.size, rest.addr, rest))
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def release(self, block: _Block) -> None:
        self.allocated -= block.size
        block.free = True
        pool = self._free[block.small]
        for other in (block.prev, block.next):
            if other is not None and other.free:
                pool.remove((other.size, other.addr, other))
                if other is block.prev:
                    other.size += block.size
                    other.next = block.next
                    if block.next:
                        block.next.prev = other
                    block = other
                else:
                    block.size += other.size
                    block.next = other.next
                    if other.next:
                        other.next.prev = block
        bisect.insort(pool, (block.size, block.addr, block))


# ----------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------

def fake_autocast(device: str, amp: str):
    """torch.autocast on ``device`` in ``amp``'s dtype (nothing for none), enabled even for fake CUDA
    tensors on a machine without CUDA, where torch.autocast("cuda") would disable itself."""
    if amp == "none":
        return contextlib.nullcontext()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast": re-enabled below
        ctx = torch.autocast(device, dtype=DTYPES[amp])
    ctx._enabled = True
    return ctx


def trace_forward(model: torch.nn.Module, input_shape: tuple, dtype: torch.dtype, head: bool,
                  device: str = "cuda", inline: dict | None = None, amp: str = "none") -> AllocationTrace:
    """The allocation trace of ``model`` on ``device``: its weights (one allocation per distinct storage of
    parameters and buffers), an input of ``input_shape``/``dtype``, then ``forward_features`` (``forward``
    when ``head``) under ``torch.no_grad``, and under autocast in ``amp``'s dtype unless none (see the
    module docstring).

    A meta ``model`` is moved to fake ``device`` tensors (nothing is allocated); a ``model`` with real
    tensors runs for real on them (tests use this on the CPU to check the fake trace).
    """
    trace = AllocationTrace()
    fake = next(model.parameters()).device.type == "meta"
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        if fake:
            model.to_empty(device=device)
        tracker = AllocationTracker(trace, inline)
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tracker.track(tensor)
        trace.n_weights = len(trace.events)
        with tracker, torch.no_grad():
            x = torch.empty(input_shape, dtype=dtype, device=device)
            with fake_autocast(device, amp):
                out = model(x) if head else model.forward_features(x)
        del x, out
    return trace


def trace_train_step(model: torch.nn.Module, input_shape: tuple, dtype: torch.dtype, head: bool,
                     grad_checkpointing: bool = False, inline: dict | None = None, steps: int = 2) -> AllocationTrace:
    """The allocation trace of ``steps`` train steps of ``model`` (see the module docstring): its weights, an
    input of ``input_shape``/``dtype`` (kept across steps, as a benchmark keeps its batch), then per step the
    forward (``forward`` when ``head``, else ``forward_features``), the train step's loss (``measure.train``:
    cross-entropy against labels with the head, the mean of the squared features without), ``backward()``,
    its SGD step and ``zero_grad(set_to_none=True)``. A meta ``model`` runs on fake CPU
    tensors standing for CUDA ones; a ``model`` with real tensors runs for real (tests check the fake trace
    against it)."""
    trace = AllocationTrace()
    fake = next(model.parameters()).device.type == "meta"
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), fake_cpu_as_cuda():
        if fake:
            model.to_empty(device="cpu")
        model.train()
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        tracker = AllocationTracker(trace, inline)
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tracker.track(tensor)
        trace.n_weights = len(trace.events)
        # foreach, as torch's default on CUDA (on CPU tensors it would loop per parameter)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)
        with tracker:
            device = next(model.parameters()).device
            x = torch.empty(input_shape, dtype=dtype, device=device)
            labels = torch.zeros(input_shape[0], dtype=torch.long, device=device) if head else None
            for _ in range(steps):
                train_loss(model(x) if head else model.forward_features(x), labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            del x, labels
    return trace


def resolved_impl(model: torch.nn.Module) -> str:
    """The token-mixer backend a forward on a GPU runs: the concrete scan backend for Vim models (``auto``
    resolved as on a CUDA machine with this environment), the attention backend for ViT-style ones,
    ``OWN_IMPL`` for a model that takes neither (a timm CNN)."""
    if hasattr(model, "scan_backend"):
        return model.scan_backend("cuda")
    return getattr(model, "attn", None) or OWN_IMPL


def resolved_kernel(model: torch.nn.Module, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> str:
    """What computes the token mixer on a GPU of compute ``capability``: the scan backend, or for ``sdpa``
    the fused kernel SDPA is modelled to pick there (``sdpa_fused_kernel``)."""
    impl = resolved_impl(model)
    return sdpa_fused_kernel(dtype, capability) if impl == "sdpa" else impl


class MemoryPrediction(NamedTuple):
    """What ``predict_memory`` predicts: ``impl`` and ``kernel`` (what the prediction is for: ``resolved_impl``,
    ``resolved_kernel``), ``tokens``, ``params`` and, in GiB (2**30 B):
      mem_pred_weights_gib      parameters and buffers as allocated (each rounded to 512 B)
      mem_pred_activations_gib  peak minus weights: input, activations, output and scan workspaces; in a
                                train step also the gradients and the momentum buffers
      mem_pred_peak_gib         torch.cuda.max_memory_allocated after the call (weights + input included)
      mem_pred_reserved_gib     torch.cuda.max_memory_reserved: the caching allocator's segments
    The CUDA context is not included."""
    impl: str
    kernel: str
    tokens: int | None
    params: int
    mem_pred_weights_gib: float
    mem_pred_activations_gib: float
    mem_pred_peak_gib: float
    mem_pred_reserved_gib: float


def predict_memory(cfg: ModelVariant, capability: tuple[int, int] | None = None,
                   amp: str = "none") -> MemoryPrediction:
    """Predicted CUDA memory of one inference forward (``mode`` infer) or of a train step in steady state
    (train: ``trace_train_step``, with ``grad_checkpointing`` per block) of ``model`` (built for
    ``res`` x ``res`` images with ``options``) on a ``batch``-image input of ``dtype``,
    backbone only (``forward_features``) unless ``head``, under autocast in ``amp``'s dtype unless none
    (infer only), on a card of compute ``capability`` (what ``sdpa`` runs there: ``sdpa_fused_kernel``; None:
    the GPU here, else an H100). ``BackendUnavailable`` ("memory prediction unavailable") for a plug-in
    backend that registered no fake, and in train mode for a forward-only scan backend or under autocast.
    """
    torch_dtype = DTYPES[cfg.dtype]
    with torch.device("meta"):
        net = create_model(cfg.model, img_size=cfg.res, **cfg.options).to(torch_dtype).eval()
    train = cfg.mode == "train"
    scan = resolved_impl(net) if hasattr(net, "scan_backend") else None
    if train and scan is not None and not has_backward(scan):
        raise BackendUnavailable(f"train memory prediction unavailable: scan backend {scan!r} is forward-only "
                                 "(no backward)")
    if scan is not None and not has_memory_model(scan, train=train):
        raise BackendUnavailable(f"memory prediction unavailable: scan backend {scan!r} registered no fake"
                                 + (" of its backward" if train and has_memory_model(scan) else ""))
    shape = (cfg.batch, 3, cfg.res, cfg.res)
    with modelled_card(capability):
        if not train:
            trace = trace_forward(net, shape, torch_dtype, cfg.head, inline=SCAN_FAKES, amp=amp)
        else:
            if amp != "none":
                raise BackendUnavailable("train memory prediction under autocast is not modelled")
            if scan is not None:
                net.set_scan(scan)  # resolved as on CUDA: the step runs on fake CPU tensors
            trace = trace_train_step(net, shape, torch_dtype, cfg.head, cfg.grad_checkpointing, inline=SCAN_FAKES)
    sim = CachingAllocatorModel().replay(trace.events[:trace.n_weights])
    weights = sim.allocated
    sim.replay(trace.events[trace.n_weights:])
    return MemoryPrediction(resolved_impl(net),
                            resolved_kernel(net, torch_dtype if amp == "none" else DTYPES[amp], capability),
                            net.num_tokens, count_params(net), weights / GIB, (sim.peak_allocated - weights) / GIB,
                            sim.peak_allocated / GIB, sim.peak_reserved / GIB)


# ----------------------------------------------------------------------------------------------------
# Cards, and whether a run fits
# ----------------------------------------------------------------------------------------------------

CONTEXT_GIB = 0.5
"""Assumed CUDA context (driver, kernels, cuBLAS/cuDNN handles) that nvidia-smi counts on top of the
allocator's reserved memory: typically 0.3-0.6 GiB with CUDA 12 and lazy module loading."""

CARDS = {"h100-80gb": 79.6, "h200-141gb": 140.4, "a100-80gb": 80.0, "a100-40gb": 40.0,
         "l40s-48gb": 45.0, "a6000-48gb": 48.0, "v100-32gb": 31.7, "rtx4090-24gb": 24.0,
         "rtx3090-24gb": 24.0}
"""Total memory per card in GiB as nvidia-smi reports it (MiB / 1024, e.g. H100 SXM 81559 MiB): the bound on
context + reserved. Values are +-1% across board variants and drivers."""
CARD_CAPABILITY = {"h100-80gb": (9, 0), "h200-141gb": (9, 0), "a100-80gb": (8, 0), "a100-40gb": (8, 0),
                   "l40s-48gb": (8, 9), "a6000-48gb": (8, 6), "v100-32gb": (7, 0), "rtx4090-24gb": (8, 9),
                   "rtx3090-24gb": (8, 6)}
"""Compute capability per card: which fused attention kernel SDPA picks there (``sdpa_fused_kernel``)."""


def fits(reserved_gib: float, card: str) -> bool:
    """Whether a run whose allocator reserves ``reserved_gib`` fits ``card`` beside the CUDA context.
    Conservative: before raising OOM the real allocator frees cached segments and retries, so a run whose
    peak allocated (not reserved) + context fits may still succeed."""
    return reserved_gib + CONTEXT_GIB <= CARDS[card]
