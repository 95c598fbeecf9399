"""Selective-scan backends at a fixed small shape, and at Vim-Ti's 1248 shape (the cpu-vs-ref claim).

Shapes (b, E, L, N) follow kernels/selective_scan/ref.py; inputs are float32 with D, z, delta_bias and
softplus, as a Vim layer calls the scan. ``scan_backend``: every built-in, or the one given by --scan
(conftest.py).
"""
import pytest
import torch

from vimbench.kernels.selective_scan import BackendUnavailable, check_scan_backend, selective_scan
from vimbench.kernels.selective_scan.backends import TRITON_DESIGNS

SMALL = {"cpu": (1, 384, 197, 16), "cuda": (8, 384, 1025, 16)}
"""Vim-Ti at 224 (L = 197) on CPU; Vim-Ti at 512 with batch 8 on CUDA."""
VIM_TI_1248 = (1, 384, 6085, 16)
"""Vim-Ti at 1248: E = 2 * 192, L = 78^2 + 1 tokens. On the 2-core CI machine (one thread, CPU time), `cpu`
ran 1.7-2.1x faster than `ref` here (176 vs 292 ms, medians of the CPU baseline's 10 runs)."""


def scan_inputs(b, E, L, N, device):
    g = torch.Generator(device=device).manual_seed(0)
    u, z = (torch.randn(b, E, L, device=device, generator=g) for _ in range(2))
    delta = torch.rand(b, E, L, device=device, generator=g) * 0.1
    A = -torch.rand(E, N, device=device, generator=g) - 0.5
    B, C = (torch.randn(b, N, L, device=device, generator=g) for _ in range(2))
    D, delta_bias = (torch.randn(E, device=device, generator=g) for _ in range(2))
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True)


def _checked(backend, device):
    if backend in TRITON_DESIGNS and device.type != "cuda":
        pytest.skip("triton runs only under the interpreter on CPU, which is not a benchmark")
    try:
        check_scan_backend(backend, device)
    except BackendUnavailable as e:
        pytest.skip(str(e))


def test_scan(scan_backend, device, calibrated, benchmark):
    _checked(scan_backend, device)
    shape = SMALL[device.type]
    benchmark.group = f"scan {shape}"
    x = scan_inputs(*shape, device)
    calibrated(lambda: selective_scan(**x, backend=scan_backend))


def test_scan_vim_tiny_1248(scan_backend, device, calibrated, benchmark):
    _checked(scan_backend, device)
    benchmark.group = f"scan Vim-Ti 1248 {VIM_TI_1248}"
    x = scan_inputs(*VIM_TI_1248, device)
    calibrated(lambda: selective_scan(**x, backend=scan_backend))
