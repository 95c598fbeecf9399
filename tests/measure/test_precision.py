"""Rows record the float32 precision settings torch held while measuring, read then, not written as literals:
changing one changes the row (measure_model and measure_op, in-process on CPU at tiny shapes)."""
import pytest
import torch

from vimbench.config import ScalingConfig
from vimbench.measure.model import measure_model
from vimbench.count.ops import Geometry
from vimbench.measure.ops import KernelConfig, measure_op

MODEL_CFG = ScalingConfig("deit_tiny", {"attn": "eager"}, 32, threads=1, warmup=0, repeats=1, min_time=0)
OP_CFG = KernelConfig(op="attention", impl="eager", model="deit_tiny", res=32, batch=1, dtype="fp32", mode="infer",
                      compile="none", amp="none", device="cpu",
                      geometry=Geometry("deit_tiny", 32, 1, 5, 192, 0, 0, 3, 64), threads=1,
                      timing=dict(warmup=0, repeats=1, min_time=0))


@pytest.fixture
def changed_settings():
    """matmul precision 'medium', cudnn.benchmark and both TF32 flags flipped for the test, restored after."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("medium")   # also allows TF32 in cuBLAS matmuls
    torch.backends.cudnn.benchmark = not saved[1]
    torch.backends.cudnn.allow_tf32 = not saved[3]
    yield dict(tf32=True, cudnn_tf32=not saved[3], cudnn_benchmark=not saved[1], matmul_precision="medium")
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


@pytest.mark.parametrize("measure, cfg", [(measure_model, MODEL_CFG), (measure_op, OP_CFG)],
                         ids=["measure_model", "measure_op"])
def test_rows_read_the_precision_settings_at_measurement_time(measure, cfg, changed_settings):
    row = measure(cfg)
    assert {k: row[k] for k in changed_settings} == changed_settings
    torch.set_float32_matmul_precision("highest")
    assert measure(cfg)["matmul_precision"] == "highest" and measure(cfg)["tf32"] is False
