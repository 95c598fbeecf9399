"""The regime a measured callable runs in: torch.compile (inductor) and autocast, as timm's benchmark offers them.

    compile  none | default | max-autotune   torch.compile(fn, mode=..., backend="inductor")
    amp      none | fp16 | bf16              torch.autocast(device type, dtype) around every call; the
                                             weights keep the run's --dtype (fp32), unlike --dtype fp16/bf16

``compiled`` compiles once, before any warm-up: the first call of the compiled callable traces and
compiles it, and that call's wall time is ``compile_s`` (s; it includes that one execution and, for
max-autotune, the autotuning benchmarks). It is never inside a timed region. ``graph_breaks`` counts the
places where TorchDynamo had to end a graph and fall back to Python during that first call (Dynamo's own
``graph_break`` counters, the numbers ``torch._dynamo.explain`` reports): 0 means the callable compiled as
whole graphs with no Python in between.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from vimbench.measure.core import DTYPES
from vimbench.measure.isolation import one_line

COMPILE_MODES = ("none", "default", "max-autotune")
AMP_DTYPES = ("none", "fp16", "bf16")


class CompileFailed(RuntimeError):
    """torch.compile could not compile (or run) the callable; the message names the mode and the failure."""


def autocast(device: torch.device, amp: str):
    """The context a call runs in: torch.autocast on ``device``'s type in ``amp``'s dtype, or nothing for none."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[amp])


def graph_breaks() -> int:
    """Graph breaks TorchDynamo recorded since its counters were last cleared."""
    from torch._dynamo.utils import counters  # imported when needed: dynamo is slow to import
    return int(sum(counters["graph_break"].values()))


def compiled(fn: Callable, mode: str, call: Callable[[Callable], object]) -> tuple[Callable, dict]:
    """(``fn`` compiled with inductor in ``mode``, {"compile_s", "graph_breaks"}); ``call(f)`` runs ``f`` once
    as the timed calls will (same inputs, same inference/autocast context) and triggers the compilation.
    ``mode`` none returns ``fn`` itself and {}. A failure while compiling raises ``CompileFailed``."""
    if mode == "none":
        return fn, {}
    import torch._dynamo.utils
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    start = time.perf_counter()
    try:
        compiled_fn = torch.compile(fn, mode=mode, backend="inductor")
        call(compiled_fn)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except Exception as e:  # any failure of the compiler stack: reported, with the mode, as the row's error
        inner = getattr(e, "inner_exception", None)  # Dynamo's BackendCompilerFailed wraps what inductor raised
        why = f"inductor raised {one_line(inner)}" if inner is not None else one_line(e)
        raise CompileFailed(f"torch.compile (mode {mode}) failed: {why}") from e
    return compiled_fn, {"compile_s": time.perf_counter() - start, "graph_breaks": graph_breaks()}
