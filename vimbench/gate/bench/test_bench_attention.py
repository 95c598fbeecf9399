"""Attention backends (kernels/attention.py) at DeiT-Ti's shape: heads 3, head_dim 64, 197 tokens (224 px).

Forced SDPA kernels that cannot run on the device (or dtype) are skipped. CPU: float32; CUDA: float16,
so that flash and cuDNN attention can run.
"""
import pytest
import torch

from vimbench.kernels.attention import ATTENTION_BACKENDS, attention, check_attention_backend
from vimbench.kernels.selective_scan import BackendUnavailable

SHAPE = {"cpu": (1, 3, 197, 64), "cuda": (64, 3, 197, 64)}
"""(b, H, L, d)"""
DTYPE = {"cpu": torch.float32, "cuda": torch.float16}


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention(backend, device, calibrated, benchmark):
    shape, dtype = SHAPE[device.type], DTYPE[device.type]
    try:
        check_attention_backend(backend, device, dtype, shape[-1])
    except BackendUnavailable as e:
        pytest.skip(str(e))
    benchmark.group = f"attention {shape} {str(dtype).removeprefix('torch.')}"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(*shape, device=device, dtype=dtype, generator=g) for _ in range(3))
    calibrated(lambda: attention(q, k, v, backend))
