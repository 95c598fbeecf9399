"""Guarded NVML readings: a fake pynvml that raises NOT_SUPPORTED on each call in turn must cost only the
reading it fails (an empty cell and a note), never the timed row."""
import sys
import types

import pytest
import torch

from vimbench.measure import nvml as nvml_mod
from vimbench.measure.core import GIB
from vimbench.measure.nvml import GpuReadings, NvmlWatch

CALLS = ("nvmlInit", "nvmlDeviceGetHandleByPciBusId", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetClockInfo",
         "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage", "nvmlSystemGetDriverVersion")
USED = [1 * GIB, 3 * GIB, 2 * GIB]  # idle, then samples: the peak is 3 GiB -> mem_nvml_gib 2


class NVMLError(Exception):
    pass


def fake_pynvml(failing: str | None):
    """A pynvml stand-in whose ``failing`` call raises NOT_SUPPORTED; memory readings walk through USED
    (then stay at the last value); the handle is only found by PCI bus id "00000000:3B:00.0"."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError, nv.NVML_CLOCK_SM, nv.NVML_TEMPERATURE_GPU = NVMLError, 1, 0
    reads = iter(USED)
    last = {"used": USED[0]}

    def memory(handle):
        last["used"] = next(reads, last["used"])
        return types.SimpleNamespace(used=last["used"])

    def by_bus_id(bus_id):
        assert bus_id == "00000000:3B:00.0"
        return "handle"

    impl = {"nvmlInit": lambda: None, "nvmlDeviceGetHandleByPciBusId": by_bus_id,
            "nvmlDeviceGetMemoryInfo": memory, "nvmlDeviceGetClockInfo": lambda h, clock: 1980,
            "nvmlDeviceGetTemperature": lambda h, sensor: 41, "nvmlDeviceGetPowerUsage": lambda h: 350_000,
            "nvmlSystemGetDriverVersion": lambda: "580.1",
            "nvmlDeviceGetHandleByIndex": lambda i: pytest.fail("NVML's index is not the CUDA ordinal")}
    for name, fn in impl.items():
        def call(*args, _fn=fn, _name=name):
            if _name == failing:
                raise NVMLError("Not Supported")
            return _fn(*args)
        setattr(nv, name, call)
    return nv


@pytest.fixture
def gpu_at_bus_3b(monkeypatch):
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)


def watch_with(monkeypatch, failing):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(failing))
    watch = NvmlWatch(0, period=0.0)
    watch.start()
    return watch.finish()


def test_all_readings_when_nvml_works(monkeypatch, gpu_at_bus_3b):
    out = watch_with(monkeypatch, None)
    assert out == {"mem_nvml_gib": 2.0, "sm_clock_mhz": 1980, "temperature_c": 41, "power_w": 350.0}


@pytest.mark.parametrize("failing", CALLS[:-1])
def test_a_failing_call_empties_its_cells_and_leaves_a_note(monkeypatch, gpu_at_bus_3b, failing):
    out = watch_with(monkeypatch, failing)
    assert set(out) == {"mem_nvml_gib", "sm_clock_mhz", "temperature_c", "power_w", "error"}
    empty = {k for k, v in out.items() if v is None}
    expected = {"nvmlInit": {"mem_nvml_gib", "sm_clock_mhz", "temperature_c", "power_w"},
                "nvmlDeviceGetHandleByPciBusId": {"mem_nvml_gib", "sm_clock_mhz", "temperature_c", "power_w"},
                "nvmlDeviceGetMemoryInfo": {"mem_nvml_gib"}, "nvmlDeviceGetClockInfo": {"sm_clock_mhz"},
                "nvmlDeviceGetTemperature": {"temperature_c"}, "nvmlDeviceGetPowerUsage": {"power_w"}}[failing]
    assert empty == expected
    assert out["error"].startswith("nvml ") and len(out["error"].splitlines()) == 1
    if failing != "nvmlInit":
        assert "Not Supported" in out["error"]


def test_driver_version_failure_is_an_empty_cell(monkeypatch, gpu_at_bus_3b):
    from vimbench.measure.env import environment
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml("nvmlSystemGetDriverVersion"))
    assert environment(torch.device("cuda", 0))["driver_version"] == ""
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(None))
    assert environment(torch.device("cuda", 0))["driver_version"] == "580.1"


def test_handle_is_found_by_pci_bus_id(monkeypatch):
    props = types.SimpleNamespace(pci_domain_id=1, pci_bus_id=0xA1, pci_device_id=2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert nvml_mod.pci_bus_id(0) == "00000001:A1:02.0"
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(None))
    gpu = GpuReadings(0)
    assert gpu.handle is None and "nvml device handle" in gpu.notes[0]  # the fake knows only bus 3B
