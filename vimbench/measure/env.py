"""The conditions every result row carries: software versions, host, device, GPU telemetry."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


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


def nvml():
    """The initialised pynvml module, or None when NVML (driver or package) is unavailable."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # pynvml.NVMLError, ImportError, or a driver library missing
        return None


def environment(device: torch.device) -> dict:
    """Static conditions of a run on ``device``: versions, host CPU, thread count, GPU name and driver."""
    env = {"device_name": cpu_model(), "driver_version": "", "cuda_version": torch.version.cuda or "",
           "torch_version": torch.__version__, "triton_version": _version("triton"),
           "timm_version": _version("timm"), "vimbench_version": _version("vimbench"),
           "git_commit": git_commit(), "cpu_model": cpu_model(), "host": platform.node(),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        nv = nvml()
        if nv is not None:
            env["driver_version"] = nv.nvmlSystemGetDriverVersion()
    return env


def nvml_index(index: int) -> int:
    """NVML's index of the GPU this process's torch calls cuda:<index>. CUDA_VISIBLE_DEVICES renumbers the
    GPUs for CUDA (a worker pinned to GPU 3 sees it as cuda:0) but not for NVML, which counts every GPU of
    the host in PCI order (set CUDA_DEVICE_ORDER=PCI_BUS_ID on a host with different GPU models). Entries
    that are not indices (UUIDs) are left as they are."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return int(visible[index]) if index < len(visible) and visible[index].isdigit() else index


def gpu_telemetry(nv, index: int) -> dict:
    """SM clock (MHz), temperature (C) and power draw (W) of GPU ``index`` now; {} without NVML."""
    if nv is None:
        return {}
    h = nv.nvmlDeviceGetHandleByIndex(index)
    return {"sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            "temperature_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0}
