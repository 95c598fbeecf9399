"""The compiled CPU kernels of the Vim layer: the selective scan (csrc/selective_scan_cpu.cpp) and its backward
(csrc/selective_scan_bwd_cpu.cpp; the two share csrc/scan_common.h), the pair of causal depthwise convolutions
(csrc/causal_conv_cpu.cpp) and the residual add with RMSNorm (csrc/rms_norm_cpu.cpp), C++ on ATen's vector types
(shared math in csrc/vec_math.h), one library JIT-built on first use.

Public API (shapes use the legend of ``ref.py``: b batch, E channels, L length, N state, G groups; K conv taps):

    available() -> (bool, str)       can the kernel be used here? builds it if needed; the str says why not
    build() -> str                   compiles (if not cached) and loads the kernel; returns the library path
    describe_ops(fn)                 decorator: fn registers fakes / FLOP formulas of the ops once they load
    selective_scan_compiled(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, *, time_major_out=None)
    bidirectional_scan_compiled(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z=None,
                                delta_bias=None, delta_bias_b=None, delta_softplus=True, *, time_major_out=None)
    torch.ops.vimbench_cpu.selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, dlast, states,
                                              delta_softplus) -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]
    torch.ops.vimbench_cpu.bidirectional_scan_bwd(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z,
                                                  delta_bias, delta_bias_b, dout, states, states_b, delta_softplus)
        -> [du, ddelta, dA, dB, dC, dD, du_b, ddelta_b, dA_b, dB_b, dC_b, dD_b, dz, ddelta_bias, ddelta_bias_b]
                                     the backward ops, which autograd calls (see Training below)
    causal_conv1d_pair_compiled(x, w_f, b_f, w_b, b_b) -> (x_f, x_b)   see ``kernels/causal_conv.py``
    add_rms_norm_compiled(x, residual, weight, eps) -> (out, residual_out)   see ``kernels/rms_norm.py``
    exp_floor_rate(numel=..., iters=..., aten_exp=False) -> float   exp per second with the scan's state exp
                                     (its floor), or with at::vec's exp_u20

Dtypes: u, delta, z, B, C may be float32, bfloat16 or float16 (float64 is refused: use the 'ref' backend);
they are converted to float32 as they are loaded and all arithmetic is float32. The output has u's dtype, the
last state is float32. (If u, delta and z do not share one dtype, or B and C do not share u's dtype or
float32, the odd ones out are cast to float32 first, a copy.)

Strides: u, delta, z, B, C may have any strides. The fast path is the time-major layout that Vim's in_proj and
x_proj produce: u, delta, z with stride 1 along E (e.g. views of a (b, L, channels) tensor), B, C with
stride 1 along N. Channel-major contiguous inputs are also handled (gathered per tile).

Output layout: ``out`` is always a (b, E, L) tensor. Its memory is time-major, i.e. ``out`` is the (b, E, L)
transpose of a contiguous (b, L, E) tensor, when ``time_major_out`` is True, and contiguous (b, E, L) when
False. The default (None) follows u: time-major iff u's stride along E is smaller than along L. So a mixer
that feeds time-major views gets ``out.transpose(1, 2)`` contiguous, ready for out_proj without a copy.

Training: the two scans are differentiable. ``ops.py`` registers autograd on vimbench_cpu::selective_scan_fwd and
bidirectional_scan_fwd (it saves the inputs and the kept states, below), whose backward is the compiled backward
op: the
gradients of autograd through ``ref.selective_scan_ref`` (mamba_ssm's backward) for u, delta (the raw delta,
before bias and softplus), A, B, C (summed over the channels of a group), D, z and delta_bias, and for the
last state's gradient (dlast, which starts the reverse recurrence). When autograd records the call (grad mode on
and an input requiring grad), the forward op is called with keep_states and also returns the state entering every
16 steps, (b, ceil(L / 16), N, E) float32 per direction (for Vim-Ti at 1248 px, 9.4 MB per direction and layer),
which autograd saves; the backward recomputes each 16-step tile's states from there (one exp per state entry and
step, as the forward), never forms a (b, E, L, N) tensor, and reduces dB, dC over channels
and dA, dD, ddelta_bias over batch without atomics (deterministic for a given thread count); design in the
header of csrc/selective_scan_bwd_cpu.cpp. du, ddelta and dz come back in their input's dtype and memory
layout (time-major in, time-major out, so the Vim mixer copies nothing); dA, dB, dC, dD and ddelta_bias in
their input's dtype, dB and dC with stride 1 along N. The backward op returns an empty (0,) float32 tensor for
an absent D, z or delta_bias; the autograd wrapper maps it to None. Fakes and FLOP formulas
(``ops.scan_bwd_flops``) are registered on the backward ops, so FlopCounterMode, fake-tensor memory tracking and
torch.compile (no graph break in training) see them.

Threads: the kernels parallelise over (batch, block of 16 channels) with at::parallel_for, so
``torch.set_num_threads`` governs them.

Build cache: ``<cache>/scan_cpu/torch<version>-<capability>-<hash of the sources and flags>/`` (compiled from copies of
the sources in its ``src/``, so that every checkout of the same code shares it), where <cache> is $VIMBENCH_CACHE,
else $XDG_CACHE_HOME/vimbench, else ~/.cache/vimbench; <capability> is the CPU capability ATen dispatches to
on this machine (see ``cpu_capability``; it sets the vector width the kernel is compiled for, and the kernel shapes
of csrc/scan_common.h). Capabilities the kernels do not build for make ``available()`` say why. Nothing is
built at import time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "selective_scan_cpu.cpp", CSRC / "selective_scan_bwd_cpu.cpp", CSRC / "causal_conv_cpu.cpp",
           CSRC / "rms_norm_cpu.cpp")
HEADERS = (CSRC / "vec_math.h", CSRC / "scan_common.h")
LIB_NAME = "vimbench_scan_cpu"

# Compiler flags per ATen CPU capability, as torch's own build compiles its per-capability kernels: the
# CPU_CAPABILITY macros select at::vec::Vectorized's width, the -m flags let the compiler emit it. DEFAULT is
# NEON on aarch64 and at::vec's scalar emulation elsewhere. SVE256 follows torch's SVE build (not tested here).
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "SVE256": ["-DCPU_CAPABILITY=SVE256", "-DCPU_CAPABILITY_SVE", "-DCPU_CAPABILITY_SVE256",
               "-march=armv8.2-a+sve", "-msve-vector-bits=256"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
# The other capabilities torch can report, and why the kernels do not build for them.
_NOT_BUILT = {
    "SVE128": "ATen's SVE128 vectors are incomplete; ATEN_CPU_CAPABILITY=default builds the NEON kernels",
    "VSX": "the kernels are not built for VSX; ATEN_CPU_CAPABILITY=default builds at::vec's portable code",
    "Z VECTOR": "the kernels are not built for Z VECTOR; ATEN_CPU_CAPABILITY=default builds at::vec's portable "
                "code",
}

_lock = threading.Lock()
_loaded: str | None = None          # path of the loaded library
_failure: str | None = None         # one-line reason the build failed (cached for the process)
_describers: list[Callable[[], None]] = []   # see ``describe_ops``


def cpu_capability() -> str:
    """The ATen CPU capability of this machine and torch build (honours ATEN_CPU_CAPABILITY), as torch reports
    it, upper case: AVX512, AVX2, DEFAULT, SVE256, ... ("NO AVX", x86 without AVX2, is DEFAULT)."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return "DEFAULT" if cap == "NO AVX" else cap


def capability_reason(cap: str) -> str | None:
    """None if the kernels build for capability ``cap`` (a ``cpu_capability()`` value), else why not (one line)."""
    if cap in _CAPABILITY_FLAGS:
        return None
    return _NOT_BUILT.get(cap, f"unknown ATen CPU capability {cap!r}: the kernels build for "
                               f"{', '.join(_CAPABILITY_FLAGS)}")


def cache_root() -> Path:
    """$VIMBENCH_CACHE, else $XDG_CACHE_HOME/vimbench, else ~/.cache/vimbench."""
    if os.environ.get("VIMBENCH_CACHE"):
        return Path(os.environ["VIMBENCH_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vimbench"


def _cflags() -> list[str]:
    """The compiler flags for this machine's capability."""
    return ["-O3", "-fopenmp", *_CAPABILITY_FLAGS[cpu_capability()]]


def _source_hash() -> str:
    """Of the sources' contents and the compiler flags, not of their folder: ``build`` compiles copies of the
    sources kept in the build directory, so checkouts of the same code at several paths (a base revision that
    ``vimbench gate --base`` installs, a worktree) share one build instead of compiling it again."""
    h = hashlib.sha256(" ".join(_cflags()).encode())
    for src in SOURCES + HEADERS:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """The build directory for this torch version, CPU capability and kernel source."""
    version = torch.__version__.replace("+", "_")
    return cache_root() / "scan_cpu" / f"torch{version}-{cpu_capability().replace(' ', '_')}-{_source_hash()}"


def _copy_sources(out_dir: Path) -> list[Path]:
    """The sources and headers copied into ``out_dir/src`` (each written whole, then renamed, once), the build's
    inputs; returns the sources' copies."""
    folder = out_dir / "src"
    folder.mkdir(exist_ok=True)
    for src in SOURCES + HEADERS:
        if not (folder / src.name).exists():
            tmp = folder / f".{src.name}.{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, folder / src.name)
    return [folder / src.name for src in SOURCES]


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its 'No CUDA runtime is found' warning (this build needs no
    CUDA), so that compiling prints exactly one line."""
    import logging
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _with_interpreter_bin_on_path() -> None:
    """Puts the running interpreter's bin directory first on PATH, so that a ninja installed into this
    environment (the ``ninja`` package) is found when the environment is used without being activated."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _precheck() -> str | None:
    """A one-line reason the kernel cannot be built here, or None."""
    _with_interpreter_bin_on_path()
    reason = capability_reason(cpu_capability())
    if reason is not None:
        return reason
    if sys.platform != "linux" and sys.platform != "darwin":
        return f"the compiled CPU scan is built with a Unix C++ toolchain; this is {sys.platform}"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler: {_compiler()!r} is not on PATH (install g++ or set CXX)"
    if not _cpp_extension().is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def describe_ops(fn: Callable[[], None]) -> Callable[[], None]:
    """Decorator: ``fn`` describes some of the library's ops to torch (their fakes, for the meta device,
    FakeTensorMode and torch.compile, their FLOP formulas, and the forwards' autograd through the backward ops);
    it runs once the library is loaded (now, if it is). The modules that document each op (``ops.py``, ``kernels/causal_conv.py``, ``kernels/rms_norm.py``)
    register theirs, so the callers run the compiled ops directly, with no Python op around them."""
    _describers.append(fn)
    if _loaded is not None:
        fn()
    return fn


def build() -> str:
    """Compiles the kernel if this machine's cache lacks it, loads it into torch.ops.vimbench_cpu (and runs the
    ``describe_ops`` functions), and returns the library's path. Prints one line to stderr when it compiles.
    Raises RuntimeError with a one-line message if it cannot (a longer log is kept in the build directory)."""
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise RuntimeError(_failure)
        reason = _precheck()
        if reason is not None:
            _failure = reason
            raise RuntimeError(reason)
        out_dir = build_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / f"{LIB_NAME}.so").exists():
            print("vimbench: compiling the CPU kernels of the Vim layer (once per machine, ~1 min)...", file=sys.stderr,
                  flush=True)
        load = _cpp_extension().load
        try:
            load(name=LIB_NAME, sources=[str(s) for s in _copy_sources(out_dir)], build_directory=str(out_dir),
                 extra_cflags=_cflags(),
                 extra_ldflags=["-fopenmp"], with_cuda=False, is_python_module=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 (compiler errors arrive as several exception types)
            log = out_dir / "build-error.log"
            log.write_text(f"{type(exc).__name__}: {exc}\n")
            _failure = f"building the compiled CPU scan failed ({type(exc).__name__}); compiler output in {log}"
            raise RuntimeError(_failure) from exc
        _loaded = str(out_dir / f"{LIB_NAME}.so")
        for describe in _describers:
            describe()
        return _loaded


def available() -> tuple[bool, str]:
    """(True, "") if the kernel is built (building it now if needed) and loaded, else (False, one-line reason
    for users: no compiler, no ninja, or a build failure)."""
    try:
        build()
    except Exception as exc:  # any failure to build or load (RuntimeError, OSError, ImportError) = unavailable
        return False, str(exc).splitlines()[0] if str(exc) else f"building the compiled CPU scan failed ({type(exc).__name__})"
    return True, ""


def _ops():
    """torch.ops.vimbench_cpu, built and loaded first if it is not yet (a plain check when it is, so that the
    wrappers below cost nothing per call and trace under torch.compile without a graph break)."""
    if _loaded is None:
        build()
    return torch.ops.vimbench_cpu


def is_time_major(u: torch.Tensor) -> bool:
    """Whether u is laid out time-major: its stride along E is below its stride along L."""
    return u.shape[1] > 1 and u.shape[2] > 1 and u.stride(1) < u.stride(2)


def _needs_grad(*tensors) -> bool:
    """Whether autograd records a call on ``tensors`` (grad mode on and one of them requires grad): then the
    forward keeps the states its backward starts from."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan_compiled(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, *, time_major_out=None):
    """Selective scan, semantics of ``ref.selective_scan_ref``, with the compiled CPU kernel.

    u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L) or (b, G, N, L); D, delta_bias: (E,); CPU tensors,
    float32 / bfloat16 / float16, any strides. Returns out (b, E, L) in u's dtype (memory layout: see
    ``time_major_out`` in the module docstring), and with ``return_last_state`` also h_{L-1} (b, E, N) float32.
    Differentiable in every tensor input and through both outputs (see Training in the module docstring).
    """
    if time_major_out is None:
        time_major_out = is_time_major(u)
    out, last, _ = _ops().selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                             bool(time_major_out), _needs_grad(u, delta, A, B, C, D, z, delta_bias))
    return (out, last) if return_last_state else out


def bidirectional_scan_compiled(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z=None, delta_bias=None,
                                delta_bias_b=None, delta_softplus=True, *, time_major_out=None):
    """Both scans of a Vim mixer layer, semantics of ``ref.bidirectional_scan_ref``, in one kernel.

    All inputs in original token order, shapes as in ``selective_scan_compiled`` (both directions the same
    shapes). The backward direction (u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b) is scanned from t = L-1
    down to 0 by reading reversed offsets, without flipped copies. Returns (y_f + y_b) * silu(z), (b, E, L) in
    u's dtype (y_f, y_b include their D * u terms; the sum is formed in float32). Differentiable in every tensor
    input (see Training in the module docstring).
    """
    if time_major_out is None:
        time_major_out = is_time_major(u)
    keep = _needs_grad(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias, delta_bias_b)
    return _ops().bidirectional_scan_fwd(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias,
                                         delta_bias_b, bool(delta_softplus), bool(time_major_out), keep)[0]


def causal_conv1d_pair_compiled(x, w_f, b_f, w_b, b_b):
    """Vim's two depthwise convolutions, each followed by SiLU, in one pass (semantics of
    ``kernels.causal_conv.causal_conv1d_pair_ref``).

    x: (b, E, L) CPU tensor, float32 / bfloat16 / float16, any strides (time-major is read without a copy);
    w_f, w_b: (E, 1, K) or (E, K); b_f, b_b: (E,) or None. Returns (x_f, x_b), each (b, E, L) in x's dtype with
    time-major memory (the transposes of contiguous (b, L, E) tensors); arithmetic in float32.
    """
    return _ops().causal_conv1d_pair_fwd(x, w_f, b_f, w_b, b_b)


def add_rms_norm_compiled(x, residual, weight, eps):
    """The residual add and RMSNorm of a Vim block in one pass (semantics of ``kernels.rms_norm.add_rms_norm_ref``).

    x: (..., D) CPU tensor, float32 / bfloat16 / float16; residual: None or x's shape, float32; weight: (D,).
    Returns (out in weight's dtype, residual_out float32), both x's shape, contiguous; arithmetic in float32.
    """
    return _ops().add_rms_norm_fwd(x, residual, weight, float(eps))


def vector_width() -> int:
    """float32 lanes per SIMD vector in the built kernel (16 with AVX-512, 8 with AVX2 or DEFAULT)."""
    return _ops().vector_width()


def exp_floor_rate(numel: int = 1 << 14, iters: int = 4096, *, aten_exp: bool = False) -> float:
    """Measured exp per second with the scan's state exp (exp_state_fast in csrc/vec_math.h), over all threads
    torch uses: x <- exp(-x/2) applied ``iters`` times to ``numel`` float32 values (a multiple of 1024), swept
    in L1-resident blocks of 64 independent vectors, a load, a multiply, an exp and a store per vector as in
    the scan's hot loop (so the rate is the exp's throughput). The scan's floor for one direction is then
    b*E*L*N / rate seconds. ``aten_exp``: the same with at::vec's ``exp_u20`` (the exp these kernels used off
    AVX-512 before), for comparison."""
    x = torch.rand(numel)
    _ops().exp_chain(x, 16, aten_exp)            # warm-up
    seconds = _ops().exp_chain(x, iters, aten_exp)
    return numel * iters / seconds
