"""The backend record: the entry points do what a backend's ``ScanBackend`` says (layouts read, its pair, its
devices), for a built-in and a plug-in alike."""
import dataclasses

import pytest
import torch

import vimbench
from helpers import assert_close, fresh_plugins, scan_case  # noqa: F401  (fresh_plugins: a fixture)
from vimbench.errors import BackendUnavailable
from vimbench.kernels.selective_scan import (REGISTRY, SCAN_BACKENDS, ScanBackend, bidirectional_scan,
                                             bidirectional_scan_ref, check_scan_backend, selective_scan)
from vimbench.kernels.selective_scan.backends import has_backward, runs_on_cuda, scan_plugins
from vimbench.kernels.selective_scan.check import time_major
from vimbench.kernels.selective_scan.ref import selective_scan_ref


def test_the_builtins_are_records_and_what_they_declare():
    """What the separate tables held before the records (the CPU-only and strided ``cpp``, every built-in
    trains, the pair kernels of cpp and the Triton designs), now read off the records."""
    assert tuple(REGISTRY)[:len(SCAN_BACKENDS)] == SCAN_BACKENDS
    assert all(isinstance(REGISTRY[n], ScanBackend) and REGISTRY[n].package is None for n in SCAN_BACKENDS)
    assert {n: runs_on_cuda(n) for n in SCAN_BACKENDS} == {"ref": True, "cpu": True, "cpp": False, "triton": True,
                                                          "triton_pipelined": True, "mamba_ssm": True}
    assert all(has_backward(n) for n in SCAN_BACKENDS)
    assert [n for n in SCAN_BACKENDS if REGISTRY[n].strided] == ["cpp"]
    assert [n for n in SCAN_BACKENDS if REGISTRY[n].pair is not None] == ["cpp", "triton", "triton_pipelined"]
    assert {n: REGISTRY[n].companion_impl for n in SCAN_BACKENDS} == {n: "cpp" if n == "cpp" else "torch"
                                                                      for n in SCAN_BACKENDS}


def _recording(seen: list):
    """The reference scan, recording whether its u arrived contiguous."""
    def scan(u, *args, **kw):
        seen.append(u.is_contiguous())
        return selective_scan_ref(u, *args, **kw)
    return scan


@pytest.mark.parametrize("strided", [False, True])
def test_the_entry_points_copy_inputs_only_for_a_backend_that_reads_contiguous_ones(strided, fresh_plugins,
                                                                                   monkeypatch):
    seen = []
    vimbench.register_scan_backend("rec", _recording(seen), devices="cpu")
    monkeypatch.setitem(REGISTRY, "rec", dataclasses.replace(REGISTRY["rec"], strided=strided))
    (u, delta, A, B, C), kw = scan_case(2, 6, 7, 4, 0)
    out = selective_scan(time_major(u), time_major(delta), A, time_major(B), time_major(C), **kw, backend="rec")
    assert_close("out", selective_scan_ref(u, delta, A, B, C, **kw), out)
    assert seen == [not strided]


def test_a_record_pair_replaces_the_two_launches(fresh_plugins, monkeypatch):
    """A record's ``pair`` runs both directions, once, in place of two calls of its forward."""
    forward_calls, pair_calls = [], []
    vimbench.register_scan_backend("paired", _recording(forward_calls), devices="cpu")

    def pair(*args):
        pair_calls.append(len(args))
        return bidirectional_scan_ref(*args)
    monkeypatch.setitem(REGISTRY, "paired", dataclasses.replace(REGISTRY["paired"], pair=pair))
    (u, delta, A, B, C), kw = scan_case(1, 4, 5, 3, 0)
    (u_b, delta_b, A_b, B_b, C_b), kw_b = scan_case(1, 4, 5, 3, 0)
    args = (u, delta, A, B, C, kw["D"], u_b, delta_b, A_b, B_b, C_b, kw_b["D"])
    extras = dict(z=kw["z"], delta_bias=kw["delta_bias"], delta_bias_b=kw_b["delta_bias"])
    out = bidirectional_scan(*args, **extras, backend="paired")
    assert_close("pair", bidirectional_scan_ref(*args, **extras), out)
    assert pair_calls == [16] and forward_calls == []
    monkeypatch.setitem(REGISTRY, "paired", dataclasses.replace(REGISTRY["paired"], pair=None))
    bidirectional_scan(*args, **extras, backend="paired")
    assert pair_calls == [16] and forward_calls == [True, True]  # the generic pair: two launches


def test_a_plugin_record_carries_its_package_devices_and_availability(fresh_plugins):
    vimbench.register_scan_backend("gpu_only", selective_scan_ref, devices="cuda", description="d")
    record = scan_plugins()["gpu_only"]
    assert (record.package, record.devices, record.strided, record.own_ops, record.pair) == ("", ("cuda",), False,
                                                                                             False, None)
    assert not has_backward("gpu_only") and runs_on_cuda("gpu_only")
    assert record.why_unavailable(torch.device("cuda")) == record.why_unavailable(torch.device("meta")) == ""
    with pytest.raises(BackendUnavailable, match=r"^scan backend 'gpu_only' \(package ''\) runs on cuda, not cpu$"):
        check_scan_backend("gpu_only", "cpu")
