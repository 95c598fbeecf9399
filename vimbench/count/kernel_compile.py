"""Ahead-of-time compile report for vimbench's Triton kernels; needs no GPU.

Each kernel configuration the launchers use (``kernels.selective_scan.triton_kernel.kernel_configs``, at
Vim's shapes) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for
every arch in ``ARCHS``, specialised as Triton's JIT specialises that launch (``specialisation``: ints equal
to 1 become constexprs, 16-divisible ints and 16-byte-aligned pointers get the divisibility attribute), and
the cubin's resource usage is read with the ``cuobjdump`` bundled in the Triton wheel:

    registers     per thread (cuobjdump REG)
    spill_bytes   per-thread stack frame (cuobjdump STACK); > 0 means ptxas spilled registers
    shared_bytes  shared memory per program Triton launches with (compiled metadata ``shared``: layout
                  conversions and reductions)

Supports the ASTSource API of Triton 3.4+ (``constexprs=``) and 3.2-3.3 (``constants=``, both keyed by
argument name); checked with Triton 3.3.1, 3.6.0 and 3.8.0. Results are cached in-process (and Triton
caches compiled kernels on disk, so a second run takes about a second).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import shutil
import subprocess
import tempfile

import torch

from vimbench.errors import InputError

ARCHS = (80, 90)
"""Compute capabilities compiled for: A100 (sm_80) and H100/H200 (sm_90)."""

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                    torch.int32: "i32", torch.int64: "i64"}


@dataclasses.dataclass(frozen=True)
class CompileRow:
    """One kernel configuration compiled for one arch. Sizes are None when compilation failed;
    status is 'ok', 'spills' or 'error: <message>'."""
    kernel: str
    config: str
    arch: str
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    status: str


def specialisation(args: dict, constexprs: dict) -> tuple[dict, dict, list[str]]:
    """What Triton's JIT compiles for a launch with ``args`` (the runtime arguments in kernel order, tensors and
    ints) and ``constexprs``: (signature, constexprs, names of the arguments it marks divisible by 16).

    The JIT's rule (triton/runtime/jit.py, ``specialize_impl``), applied to the launch's values: a pointer is
    '*<dtype>' and divisible by 16 when its address is (the CUDA caching allocator returns blocks aligned to
    512 B, and meta tensors, address 0, stand for them); an int equal to 1 becomes the constexpr 1 (Vim's
    G = 1); any other int is i32/i64, divisible by 16 when its value is (Vim's E = 2 D always is; its
    L = (res/16)^2 + 1 never is, nor 1). The compile report uses this; tests check it against the JIT's own
    binder for the installed Triton."""
    sig, consts, divisible = {}, {}, []
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"argument {name}: cannot derive a Triton type from {type(value).__name__}")
        elif value == 1:
            sig[name], consts[name] = "constexpr", 1
            continue
        else:
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        if aligned:
            divisible.append(name)
    return {**sig, **{name: "constexpr" for name in constexprs}}, {**consts, **constexprs}, divisible


def _ast_source(fn, signature: dict, constexprs: dict, divisible: list[str]):
    """ASTSource with the JIT's specialisation. Triton 3.4+ takes ``constexprs=`` and ``attrs`` keyed by
    argument path; 3.2-3.3 take ``constants=`` and get no alignment attributes (the report then compiles
    without them, and says so in the config)."""
    from triton.compiler import ASTSource
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:   # Triton 3.4+
        names = list(signature)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return ASTSource(fn, signature, constants=constexprs)                  # Triton 3.2-3.3


def _has_attrs() -> bool:
    from triton.compiler import ASTSource
    return "constexprs" in inspect.signature(ASTSource.__init__).parameters


def _cuobjdump() -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if path is None:
        raise RuntimeError(f"cuobjdump not found (looked for {bundled} and on PATH)")
    return path


def _resource_usage(cubin: bytes) -> dict:
    """{'REG': .., 'STACK': .., 'SHARED': .., 'LOCAL': ..} of the one kernel in ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in usage:
        raise RuntimeError(f"no resource usage in cuobjdump output: {text.strip()[-300:]}")
    return {k: int(v) for k, v in usage.items()}


@functools.cache
def _compile_row(kernel_index: int, arch: int) -> CompileRow:
    import triton
    from triton.backends.compiler import GPUTarget
    label, fn, args, constexprs, num_warps = _kernel_configs()[kernel_index]
    signature, consts, divisible = specialisation(args, constexprs)
    pointers = [n for n, v in args.items() if isinstance(v, torch.Tensor)]
    named = ["all pointers"] if set(pointers) <= set(divisible) else [n for n in divisible if n in pointers]
    named += [n for n in divisible if n not in pointers]
    aligned = f"divisible by 16: {' '.join(named)}" if _has_attrs() else "no alignment attributes (Triton < 3.4)"
    config = ", ".join([f"{k}={v}" for k, v in consts.items()] + [f"num_warps={num_warps}", aligned])
    common = dict(kernel=f"{fn.__name__} [{label}]", config=config, arch=f"sm_{arch}")
    try:
        compiled = triton.compile(_ast_source(fn, signature, consts, divisible),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as e:  # a failed compile is a row of the report, not a crash
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return CompileRow(**common, registers=None, spill_bytes=None, shared_bytes=None, status=f"error: {message}")
    spills = usage.get("STACK", 0)
    return CompileRow(**common, registers=usage["REG"], spill_bytes=spills, shared_bytes=compiled.metadata.shared,
                      status="spills" if spills else "ok")


@functools.cache
def _kernel_configs():
    from vimbench.kernels.selective_scan.triton_kernel import kernel_configs
    return tuple(kernel_configs())


def compile_report(archs=ARCHS) -> list[CompileRow]:
    """Compiles every launcher configuration for every arch in ``archs``; one row each, failures included."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise InputError("TRITON_INTERPRET=1 replaces the kernels by the interpreter; unset it to compile them")
    return [_compile_row(i, arch) for i in range(len(_kernel_configs())) for arch in archs]
