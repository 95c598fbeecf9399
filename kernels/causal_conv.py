"""Vim's pair of depthwise convolutions: the causal conv of the forward direction and the anti-causal conv of
the backward direction, each followed by SiLU, over the same input x.

    causal_conv1d_pair(x, w_f, b_f, w_b, b_b, impl) -> (x_f, x_b)

Shapes: x (b, E, L) (b batch, E channels, L tokens), any strides; w_f, w_b the ``nn.Conv1d(E, E, K, groups=E)``
weights (E, 1, K); b_f, b_b (E,) or None. Outputs (b, E, L) in x's dtype:

    x_f[e, t] = silu(b_f[e] + sum_k w_f[e, 0, k] * x[e, t - (K-1) + k])    (x = 0 outside 0..L-1)
    x_b[e, t] = silu(b_b[e] + sum_k w_b[e, 0, k] * x[e, t + (K-1) - k])

x_f is the official mixer's ``silu(conv1d(x)[..., :L])``; x_b is its ``flip(silu(conv1d_b(flip(x))[..., :L]))``,
computed in original token order without flipped copies.

Implementations (``CONV_IMPLS``):
    torch  ``causal_conv1d_pair_ref``: F.conv1d on the padded input, then F.silu; outputs contiguous (b, E, L)
    cpp    the compiled CPU kernel (``selective_scan.compiled_cpu``): one pass over time-major x, outputs with
           time-major memory, as mamba_ssm's fast path pairs its CUDA scan with causal_conv1d's fused kernel
The Vim mixer uses ``cpp`` when its scan backend is ``cpp`` and ``torch`` otherwise, so a row's scan backend
names both. The ``cpp`` path calls the compiled op ``torch.ops.vimbench_cpu.causal_conv1d_pair_fwd`` directly;
its fake and its FLOP formula, registered below once the library loads, equal what the FLOP counter counts for
the two convolutions of the ``torch`` path: 2 * (2 b E L K), 2 FLOPs per multiply-add (bias and SiLU uncounted,
as for ``aten.convolution``). Its backward, registered with it (``torch.library.register_autograd``), is the
compiled op ``causal_conv1d_pair_bwd``: it recomputes the pre-activations from the saved x, and counts
2 * 2 * (2 b E L K), the input and the weight gradient of each conv, as many multiply-adds as its forward each.
(The ``torch`` path's backward counts more on torch versions whose aten.convolution_backward formula ignores
groups in the weight gradient, E times the true count; pytorch/pytorch#183405 fixes it.) Both paths
differentiate x, the weights and the biases.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from vimbench.kernels.selective_scan import compiled_cpu

CONV_IMPLS = ("torch", "cpp")


def causal_conv1d_pair_ref(x: Tensor, w_f: Tensor, b_f: Optional[Tensor], w_b: Tensor,
                           b_b: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The reference: both convs with F.conv1d (causal: pad K-1 on the left; anti-causal: pad on the right
    with the taps reversed), then SiLU."""
    E, k = x.shape[1], w_f.shape[-1] - 1
    x_f = F.silu(F.conv1d(F.pad(x, (k, 0)), w_f, b_f, groups=E))
    x_b = F.silu(F.conv1d(F.pad(x, (0, k)), w_b.flip(-1), b_b, groups=E))
    return x_f, x_b


@compiled_cpu.describe_ops
def _describe_compiled_conv() -> None:
    @torch.library.register_fake("vimbench_cpu::causal_conv1d_pair_fwd")
    def _(x, w_f, b_f, w_b, b_b):
        """The compiled kernel's allocations: two (b, L, E) outputs, returned as (b, E, L) transposes."""
        b, E, L = x.shape
        return x.new_empty(b, L, E).transpose(1, 2), x.new_empty(b, L, E).transpose(1, 2)

    @register_flop_formula(torch.ops.vimbench_cpu.causal_conv1d_pair_fwd)
    def _(x, w_f, b_f, w_b, b_b, out_shape=None, **kw):
        b, E, L = x
        return 2 * (2 * b * E * L * w_f[-1])

    @torch.library.register_fake("vimbench_cpu::causal_conv1d_pair_bwd")
    def _(x, w_f, b_f, w_b, b_b, dx_f, dx_b):
        """The compiled backward's allocations: dx as a time-major (b, E, L) transpose, the parameters'
        gradients in their shapes and dtypes (an absent bias's as an empty tensor)."""
        b, E, L = x.shape
        db = lambda bias: w_f.new_empty(0) if bias is None else torch.empty_like(bias)  # noqa: E731
        return (x.new_empty(b, L, E).transpose(1, 2), torch.empty_like(w_f), db(b_f), torch.empty_like(w_b),
                db(b_b))

    @register_flop_formula(torch.ops.vimbench_cpu.causal_conv1d_pair_bwd)
    def _(x, w_f, b_f, w_b, b_b, dx_f, dx_b, out_shape=None, **kw):
        """8 b E L K: per direction and (b, e, t), K multiply-adds for dx and K for dw, 2 FLOPs each (the bias
        gradient, SiLU and its derivative uncounted, as in the forward)."""
        b, E, L = x
        return 2 * 2 * (2 * b * E * L * w_f[-1])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dx_f, dx_b):
        x, w_f, b_f, w_b, b_b = ctx.saved_tensors
        dx, dw_f, db_f, dw_b, db_b = torch.ops.vimbench_cpu.causal_conv1d_pair_bwd(x, w_f, b_f, w_b, b_b, dx_f, dx_b)
        return dx, dw_f, None if b_f is None else db_f, dw_b, None if b_b is None else db_b

    torch.library.register_autograd("vimbench_cpu::causal_conv1d_pair_fwd", backward, setup_context=setup_context)


def causal_conv1d_pair(x: Tensor, w_f: Tensor, b_f: Optional[Tensor], w_b: Tensor, b_b: Optional[Tensor],
                       impl: str = "torch") -> tuple[Tensor, Tensor]:
    """Both convs and their SiLU with implementation ``impl`` (one of ``CONV_IMPLS``); see the module docstring."""
    if impl == "cpp":
        return compiled_cpu.causal_conv1d_pair_compiled(x, w_f, b_f, w_b, b_b)
    if impl == "torch":
        return causal_conv1d_pair_ref(x, w_f, b_f, w_b, b_b)
    raise ValueError(f"unknown causal conv implementation {impl!r}; choose from {', '.join(CONV_IMPLS)}")
