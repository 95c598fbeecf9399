"""The residual add and RMSNorm that open every Vim block (and close the backbone, with norm_f):

    add_rms_norm(x, residual, weight, eps, impl) -> (out, residual_out)

Shapes: x (..., D); residual None or x's shape, float32; weight (D,). Outputs x's shape:

    residual_out = residual + float(x)            (float(x) when residual is None; float32)
    out          = residual_out / sqrt(mean over D of residual_out^2 + eps) * weight      (weight's dtype)

This is mamba_ssm's fused add-norm with prenorm and a float32 residual (``rms_norm_fn``), what the official Vim
runs on GPU. With float32 weights both implementations below compute exactly this; with bfloat16 / float16
weights the ``torch`` path (the model's plain PyTorch path) rounds residual_out to weight's dtype before the
norm, while ``cpp``, like mamba_ssm's kernel, normalises the float32 residual (they agree to that dtype's
precision).

Implementations (``NORM_IMPLS``):
    torch  ``add_rms_norm_ref``: the add, then torch's RMSNorm (``F.rms_norm``, several elementwise ops on CPU)
    cpp    the compiled CPU kernel (``selective_scan.compiled_cpu``): one pass per row
The Vim block uses ``cpp`` when its scan backend is ``cpp`` and ``torch`` otherwise (as for the causal convs,
``kernels/causal_conv.py``). The ``cpp`` path calls the compiled op ``torch.ops.vimbench_cpu.add_rms_norm_fwd``
directly; its fake, registered below once the library loads, serves the meta device, FakeTensorMode and
torch.compile. Its backward, registered with it (``torch.library.register_autograd``), is the compiled op
``add_rms_norm_bwd``: from the saved residual_out (float32, as mamba_ssm's fused add-norm saves it; the
reciprocal RMS is recomputed), the gradient of out and that of residual_out (the residual stream's), it returns
the gradients of x, residual and weight. Like every norm it counts 0 FLOPs, forward and backward, in both paths
(the FLOP counter counts no elementwise op).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vimbench.kernels.selective_scan import compiled_cpu

NORM_IMPLS = ("torch", "cpp")


def add_rms_norm_ref(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The reference, the Vim block's plain PyTorch path: the float32 add, then torch's RMSNorm of the residual
    cast to weight's dtype."""
    res = x.float() if residual is None else residual + x.float()
    return F.rms_norm(res.to(weight.dtype), (res.shape[-1],), weight, eps), res


@compiled_cpu.describe_ops
def _describe_compiled_norm() -> None:
    @torch.library.register_fake("vimbench_cpu::add_rms_norm_fwd")
    def _(x, residual, weight, eps):
        """The compiled kernel's allocations: out in weight's dtype and the float32 residual, both contiguous."""
        return (torch.empty_like(x, dtype=weight.dtype, memory_format=torch.contiguous_format),
                torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format))

    @torch.library.register_fake("vimbench_cpu::add_rms_norm_bwd")
    def _(dout, dresidual_out, residual_out, weight, eps, x_dtype, has_residual):
        """The compiled backward's allocations: dx in x's dtype, dresidual float32 (empty without a residual),
        dweight in weight's dtype, all contiguous."""
        dres = residual_out.new_empty(residual_out.shape if has_residual else (0,))
        return (residual_out.new_empty(residual_out.shape, dtype=x_dtype), dres, torch.empty_like(weight))

    def setup_context(ctx, inputs, output):
        x, residual, weight, eps = inputs
        ctx.save_for_backward(output[1], weight)
        ctx.eps, ctx.x_dtype, ctx.has_residual = eps, x.dtype, residual is not None

    def backward(ctx, dout, dresidual_out):
        residual_out, weight = ctx.saved_tensors
        dx, dres, dweight = torch.ops.vimbench_cpu.add_rms_norm_bwd(dout, dresidual_out, residual_out, weight,
                                                                    ctx.eps, ctx.x_dtype, ctx.has_residual)
        return dx, dres if ctx.has_residual else None, dweight, None

    torch.library.register_autograd("vimbench_cpu::add_rms_norm_fwd", backward, setup_context=setup_context)


def add_rms_norm(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                 impl: str = "torch") -> tuple[Tensor, Tensor]:
    """The add and the norm with implementation ``impl`` (one of ``NORM_IMPLS``); see the module docstring."""
    if impl == "cpp":
        return compiled_cpu.add_rms_norm_compiled(x, residual, weight, eps)
    if impl == "torch":
        return add_rms_norm_ref(x, residual, weight, eps)
    raise ValueError(f"unknown add + RMSNorm implementation {impl!r}; choose from {', '.join(NORM_IMPLS)}")
