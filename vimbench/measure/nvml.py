"""NVML readings of one GPU that cannot cost a measured row.

Every NVML call goes through ``GpuReadings.read``: a call that raises (``NVMLError`` NOT_SUPPORTED and
NO_PERMISSION are common on MIG, vGPU and in containers; a missing driver library; anything else) gives
None, an empty cell in the row, and a note "nvml <reading>: <error>" that ends up in the row's ``error``
column. The GPU is found by its PCI bus id, which NVML and CUDA agree on; NVML's device index is not the
CUDA ordinal under ``CUDA_VISIBLE_DEVICES``.

    watch = NvmlWatch(device)     # NVML used memory now, before this process touches CUDA
    ...                           # the first forward (CUDA context, lazy initialisation)
    watch.start()                 # sample used memory every ~5 ms in a thread
    ...                           # the timed loop
    row.update(watch.finish())    # mem_nvml_gib, sm_clock_mhz, temperature_c, power_w, error (notes)
"""
from __future__ import annotations

import threading
import time

import torch

from vimbench.measure.core import GIB

TELEMETRY = ("sm_clock_mhz", "temperature_c", "power_w")


def nvml():
    """The initialised pynvml module, or None when NVML (driver or package) is unavailable."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # pynvml.NVMLError, ImportError, or a driver library missing
        return None


def pci_bus_id(index: int) -> str | None:
    """CUDA device ``index``'s PCI address as NVML spells it ("00000000:3B:00.0"), None where torch does not
    report it (torch < 2.3). Reading device properties does not create a CUDA context."""
    props = torch.cuda.get_device_properties(index)
    if not hasattr(props, "pci_bus_id"):
        return None
    return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class GpuReadings:
    """Guarded NVML readings of CUDA device ``index``; ``notes`` collects one line per failed reading."""

    def __init__(self, index: int):
        self.notes: list[str] = []
        self.nv = nvml()
        self.handle = None
        if self.nv is None:
            self.notes.append("nvml unavailable (no pynvml or no driver library)")
            return
        self.handle = self.read("device handle", lambda: self._handle(index))

    def _handle(self, index: int):
        bus_id = pci_bus_id(index)
        if bus_id is None:
            self.notes.append("nvml device found by index (this torch does not report PCI bus ids)")
            return self.nv.nvmlDeviceGetHandleByIndex(index)
        return self.nv.nvmlDeviceGetHandleByPciBusId(bus_id)

    def read(self, what: str, call):
        """``call()``, or None when NVML is missing or (with a note) when the call raises."""
        if self.nv is None:
            return None
        try:
            return call()
        except Exception as e:  # NVMLError of any kind, or a broken binding: one empty cell, never the row
            self.notes.append(f"nvml {what}: {_why(e)}")
            return None

    def used_bytes(self) -> int | None:
        """Device memory in use (bytes, all processes)."""
        if self.handle is None:
            return None
        return self.read("memory info", lambda: self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)

    def telemetry(self) -> dict:
        """sm_clock_mhz (MHz), temperature_c (C), power_w (W) now; None for each that failed."""
        nv, h = self.nv, self.handle
        if h is None:
            return dict.fromkeys(TELEMETRY)
        power_mw = self.read("power", lambda: nv.nvmlDeviceGetPowerUsage(h))
        return {"sm_clock_mhz": self.read("sm clock", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                "temperature_c": self.read("temperature",
                                           lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                "power_w": None if power_mw is None else power_mw / 1000.0}


class NvmlWatch:
    """NVML used memory during the timed loop (max over samples every ``period`` s, minus the level at
    construction) and the telemetry after it, for CUDA device ``index``; see the module docstring."""

    def __init__(self, index: int, period: float = 0.005):
        self.gpu, self.period = GpuReadings(index), period
        self.idle = self.gpu.used_bytes()
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            used = self.gpu.used_bytes()
            if used is None:  # noted once; a sampler that cannot read has no peak
                self.peak = None
                return
            self.peak = used if self.peak is None else max(self.peak, used)
            time.sleep(self.period)

    def start(self) -> None:
        if self.idle is not None:
            self._thread.start()

    def finish(self) -> dict:
        """mem_nvml_gib (None when any reading failed), the telemetry, and ``error``: the notes, if any."""
        mem = None
        if self._thread.is_alive() or self._thread.ident is not None:
            self._stop.set()
            self._thread.join()
            last = self.gpu.used_bytes() if self.peak is not None else None
            if last is not None:
                mem = (max(self.peak, last) - self.idle) / GIB
        out = {"mem_nvml_gib": mem, **self.gpu.telemetry()}
        if self.gpu.notes:
            out["error"] = "; ".join(self.gpu.notes)
        return out
