"""The conditions every result row carries: software versions, host, device, GPU telemetry."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path

import torch

from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.measure.nvml import GpuReadings


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.cache
def git_commit() -> str:
    """Short commit of the vimbench checkout (with '+dirty' for local changes), '' if not a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{sha}+dirty" if sha and dirty else sha


def slug(name: str) -> str:
    """A device name as a file-name part: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Static conditions of a run on ``device``: versions, host CPU and the ATen capability its compiled kernels
    target (``compiled_cpu.cpu_capability``: ATEN_CPU_CAPABILITY honoured), thread count, GPU name and driver."""
    env = {"device_name": cpu_model(), "driver_version": "", "cuda_version": torch.version.cuda or "",
           "torch_version": torch.__version__, "triton_version": _version("triton"),
           "timm_version": _version("timm"), "vimbench_version": _version("vimbench"),
           "git_commit": git_commit(), "cpu_model": cpu_model(), "host": platform.node(),
           "cpu_capability": compiled_cpu.cpu_capability(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        gpu = GpuReadings(device.index or 0)
        env["driver_version"] = gpu.read("driver version", lambda: gpu.nv.nvmlSystemGetDriverVersion()) or ""
    return env


def precision() -> dict:
    """torch's settings that change what float32 computes, read now (``vimbench.rows.schema.PRECISION``): tf32
    and cudnn_tf32 (TF32 allowed in cuBLAS matmuls, cuDNN convolutions), cudnn_benchmark, matmul_precision
    (``torch.get_float32_matmul_precision()``)."""
    return {"tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_precision": torch.get_float32_matmul_precision()}
