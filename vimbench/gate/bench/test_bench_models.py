"""Whole models: forward_features of vim_tiny and deit_tiny (default scan/attention backends), float32; and
of vim_tiny with the scan backend given by --scan (``plugin_scan``, see conftest.py)."""
import pytest
import torch

from vimbench.models.registry import create_model

SHAPE = {"cpu": (1, 128), "cuda": (16, 224)}
"""(batch, resolution) per device type."""


def _time_forward(model, options, device, calibrated, benchmark):
    batch, res = SHAPE[device.type]
    benchmark.group = f"model forward_features batch {batch} res {res}"
    torch.manual_seed(0)
    net = create_model(model, img_size=res, **options).to(device).eval()
    x = torch.randn(batch, 3, res, res, device=device)
    calibrated(lambda: net.forward_features(x))


@pytest.mark.parametrize("model", ["vim_tiny", "deit_tiny"])
def test_model(model, device, calibrated, benchmark):
    _time_forward(model, {}, device, calibrated, benchmark)


def test_vim_tiny_scan(plugin_scan, device, calibrated, benchmark):
    _time_forward("vim_tiny", {"scan": plugin_scan}, device, calibrated, benchmark)
