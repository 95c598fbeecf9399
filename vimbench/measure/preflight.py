"""Preflight: within seconds, what a GPU run needs and what is missing, before any measurement.

    checks = run_preflight(torch.device("cuda"))
    print("\n".join(report_lines(checks)))     # one line per check
    if failed(checks): ...                     # a required check is missing: nothing can be measured

Checks (``Check.name``), each one line saying what was found or exactly what is missing:
    imports        the packages vimbench imports (torch, triton, timm, pandas, matplotlib, click, tqdm) and
                   nvidia-ml-py (optional: without it the NVML cells are empty)
    c compiler     what Triton builds its kernel launcher with: $CC, else gcc, else clang on PATH
    python headers Python.h, which the launcher's C source includes
    triton cache   a writable Triton cache directory (compiled kernels are written there)
    nvml           the GPU found by PCI bus id and its memory readable (optional; CUDA only)
    triton launch  one tiny kernel compiled, launched and checked (CUDA only): exp2 of 16 zeros is 16 ones
On a CPU device the CUDA-only checks are ``skipped``; the rest are checked as on a GPU host.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import torch

REQUIRED_IMPORTS = ("torch", "triton", "timm", "pandas", "matplotlib", "click", "tqdm")
OPTIONAL_IMPORTS = {"pynvml": "nvidia-ml-py"}
"""Optional module -> the pip package that provides it."""


@dataclasses.dataclass(frozen=True)
class Check:
    """One precondition: status 'ok', 'missing' or 'skipped'; required: whether a GPU run cannot go on
    without it; message: one line, what was found or what is missing and how to provide it."""
    name: str
    status: str
    required: bool
    message: str


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_imports() -> list[Check]:
    checks = []
    for module, required in [(m, True) for m in REQUIRED_IMPORTS] + [(m, False) for m in OPTIONAL_IMPORTS]:
        try:
            importlib.import_module(module)
            checks.append(Check(f"import {module}", "ok", required, "imports"))
        except Exception as e:
            pkg = OPTIONAL_IMPORTS.get(module, module)
            checks.append(Check(f"import {module}", "missing", required,
                                f"cannot import {module} ({_one_line(e)}): install the {pkg} package"))
    return checks


def check_c_compiler() -> Check:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return Check("c compiler", "missing", True, "no C compiler: Triton builds its launcher with $CC, gcc or "
                                                    "clang; install gcc or set CC")
    if os.sep in cc and not os.access(cc, os.X_OK):
        return Check("c compiler", "missing", True, f"$CC={cc} is not an executable file")
    return Check("c compiler", "ok", True, cc)


def check_python_headers() -> Check:
    include = Path(sysconfig.get_paths(scheme=sysconfig.get_default_scheme())["include"])
    if (include / "Python.h").exists():
        return Check("python headers", "ok", True, str(include / "Python.h"))
    return Check("python headers", "missing", True, f"no Python.h in {include}: install the Python development "
                                                    f"headers (e.g. python3-dev) for this interpreter")


def triton_cache_dir() -> Path:
    """Where Triton writes compiled kernels: triton.knobs.cache.dir (Triton 3.4+), else $TRITON_CACHE_DIR,
    else ~/.triton/cache."""
    try:
        import triton
        return Path(triton.knobs.cache.dir)
    except (ImportError, AttributeError):
        return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def check_triton_cache() -> Check:
    path = triton_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        return Check("triton cache", "missing", True,
                     f"cannot write the Triton cache {path} ({_one_line(e)}): set TRITON_CACHE_DIR to a writable folder")
    return Check("triton cache", "ok", True, f"{path} is writable")


def check_nvml(device: torch.device) -> Check:
    if device.type != "cuda":
        return Check("nvml", "skipped", False, "not a CUDA device")
    from vimbench.measure.nvml import GpuReadings
    gpu = GpuReadings(device.index or 0)
    if gpu.used_bytes() is None:
        return Check("nvml", "missing", False, f"{'; '.join(gpu.notes)}: the NVML memory, clock, temperature and "
                                               "power cells will be empty")
    return Check("nvml", "ok", False, "; ".join(["memory readable", *gpu.notes]))


def check_triton_launch(device: torch.device) -> Check:
    if device.type != "cuda":
        return Check("triton launch", "skipped", True, "not a CUDA device (the kernels are compiled ahead of time "
                                                       "by `vimbench check-kernels` instead)")
    try:
        from vimbench.kernels.exp_rate import exp2_chain
        x = exp2_chain(torch.zeros(16, device=device), iters=1)
        torch.cuda.synchronize(device)
        if not bool((x.cpu() == 1).all()):
            return Check("triton launch", "missing", True, f"a tiny Triton kernel ran but computed {x.tolist()[:4]}..., "
                                                           "not ones")
    except Exception as e:
        return Check("triton launch", "missing", True, f"a tiny Triton kernel failed: {_one_line(e)}")
    return Check("triton launch", "ok", True, "compiled, launched and correct")


def run_preflight(device: torch.device | str) -> list[Check]:
    """Every check for ``device``, in the order of the module docstring; never raises."""
    device = torch.device(device)
    return [*check_imports(), check_c_compiler(), check_python_headers(), check_triton_cache(), check_nvml(device),
            check_triton_launch(device)]


def failed(checks: list[Check]) -> list[Check]:
    """The required checks that are missing."""
    return [c for c in checks if c.required and c.status == "missing"]


def report_lines(checks: list[Check]) -> list[str]:
    """One line per check: 'preflight <name>: <status> (<optional>)<message>'."""
    return [f"preflight {c.name}: {c.status}{'' if c.required else ' (optional)'}: {c.message}" for c in checks]
