"""FLOPs of any registered model at any resolution and batch, without allocating real tensors.

The model is built on the meta device and run once under ``torch.utils.flop_counter.FlopCounterMode``: an
inference forward (mode infer), or a train step's forward, loss and ``backward()`` (mode train).
Convention: 2 FLOPs per multiply-add for matmuls and convolutions (FlopCounterMode's own), and for the
selective scan the formula registered in ``kernels/selective_scan/ops.py`` (1 FLOP per add, mul or
elementwise function, ``SCAN_FLOPS_PER_STATE`` = 7 per (b, e, t, n)). Elementwise work outside the scan
(norms, activations, softmax, residual adds) is not counted, as in every common counter.

Train mode. The counter sees the backward through each op's registered formula: a matmul's backward is two
matmuls of the forward's size (grad input and grad weight: 2x the forward), less for the patch embedding
(its input needs no gradient: the weight's only, 1x); attention's backward is four batched matmuls (dQ, dK,
dV and dP: 2x the forward; fused kernels that recompute Q K^T, as FlashAttention's, do 2.5x, not counted
here: FLOPs do not depend on the backend); the scan's backward by the formula registered on its backward op
(``scan_bwd_flops``). With ``grad_checkpointing`` each block's forward runs again in the backward, up to
the last tensor its backward needs (torch.utils.checkpoint stops early: a DeiT block's fc2 is not recomputed),
and the counter counts it. The loss (``vimbench.measure.train``'s: cross-entropy with the head, the mean of
the squared features without) and the SGD step (4 FLOPs per parameter: momentum, then the update) are
elementwise and not counted, like the norms: the step's share is params / flops_total, below 0.01% for every
built-in model at 224 px.

Categories (each op counted once):
    flops_scan       the selective scan ops (both directions of each Vim layer; the custom ops, or the compiled CPU
                     scan's own)
    flops_attention  attention's QK^T and AV products (bmm, or the fused SDPA op): 4 * b * H * L^2 * d per layer
    flops_linear     matmuls and convolutions (qkv/in/out projections, MLP, x_proj, dt_proj, conv1d or the compiled
                     causal conv pair, patch embed, head)
    flops_other      anything else FlopCounterMode counts (0 for the built-in models)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

from vimbench.config import ModelVariant
from vimbench.measure.train import train_loss
from vimbench.models.registry import count_params, create_model

_LINEAR_OPS = {"mm", "addmm", "convolution", "_convolution", "conv1d", "conv2d", "convolution_backward"}


def flop_category(op) -> str:
    """scan for any op of the scan's (forward or backward: a name with "scan"), attention for batched matmuls
    and SDPA, linear for matmuls and convolutions (the compiled causal conv pair's ops included)."""
    name = str(op).split(".")[-1] if "." in str(op) else str(op)
    if "scan" in name:
        return "scan"
    if name in ("bmm", "baddbmm") or "scaled_dot_product" in name:
        return "attention"
    if name in _LINEAR_OPS or name.startswith("causal_conv1d"):
        return "linear"
    return "other"


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape, **kw) -> int:
    """torch's convolution backward formula (``flop_counter.conv_backward_flop``) with the weight gradient of a
    grouped convolution divided by its groups: torch counts it as if every input channel met every output
    channel, which makes a depthwise conv1d's weight gradient E times too large (E = 384 in Vim-Ti). With it, a
    convolution's backward is 2x its forward (grad input and grad weight), as a matmul's."""
    torch_formula = conv_backward_flop.__wrapped__  # on shapes, as this one
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = torch_formula(*args, [output_mask[0], False, False], out_shape)
    grad_weight = torch_formula(*args, [False, output_mask[1], False], out_shape)
    return grad_input + grad_weight // groups


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: _conv_backward_flop}
"""Formulas that replace torch's in every count (``FlopCounterMode(custom_mapping=...)``)."""


class FlopCount(NamedTuple):
    """What ``count_flops`` counts: FLOPs per category (see the module docstring) and their total, the
    parameters, and ``tokens`` (sequence length incl. cls; None for a model without patch tokens)."""
    flops_total: int
    flops_scan: int
    flops_attention: int
    flops_linear: int
    flops_other: int
    params: int
    tokens: int | None


def count_flops(cfg: ModelVariant) -> FlopCount:
    """FLOPs of one inference forward (``mode`` infer) or one train step (train: forward, loss, backward;
    see the module docstring) of ``model`` built for ``res`` x ``res`` with ``options``, batch
    ``batch``: ``forward_features`` (the backbone, what the Vim paper timed), or the full classifier with
    ``head``; with ``grad_checkpointing`` (train only) each block is recomputed in the backward. The
    dtype does not matter (the meta model is fp32)."""
    with torch.device("meta"):
        net = create_model(cfg.model, img_size=cfg.res, **cfg.options).train(cfg.mode == "train")
        x = torch.empty(cfg.batch, 3, cfg.res, cfg.res)
    if cfg.grad_checkpointing:
        net.set_grad_checkpointing(True)
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter, torch.set_grad_enabled(cfg.mode == "train"):
        out = net(x) if cfg.head else net.forward_features(x)
        if cfg.mode == "train":
            train_loss(out, torch.zeros(cfg.batch, dtype=torch.long) if cfg.head else None).backward()
    flops = {"scan": 0, "attention": 0, "linear": 0, "other": 0}
    for op, n in counter.get_flop_counts()["Global"].items():
        flops[flop_category(op)] += int(n)
    return FlopCount(sum(flops.values()), flops["scan"], flops["attention"], flops["linear"], flops["other"],
                     count_params(net), net.num_tokens)
