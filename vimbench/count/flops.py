"""FLOPs of any registered model at any resolution and batch, without allocating real tensors.

The model is built on the meta device and run once under ``torch.utils.flop_counter.FlopCounterMode``.
Convention: 2 FLOPs per multiply-add for matmuls and convolutions (FlopCounterMode's own), and for the
selective scan the formula registered in ``kernels/selective_scan/ops.py`` (1 FLOP per add, mul or
elementwise function, ``SCAN_FLOPS_PER_STATE`` = 7 per (b, e, t, n)). Elementwise work outside the scan
(norms, activations, softmax, residual adds) is not counted, as in every common counter.

Categories (each op counted once):
    flops_scan       the selective scan ops (both directions of each Vim layer; the custom ops, or the compiled CPU
                     scan's own)
    flops_attention  attention's QK^T and AV products (bmm, or the fused SDPA op): 4 * b * H * L^2 * d per layer
    flops_linear     matmuls and convolutions (qkv/in/out projections, MLP, x_proj, dt_proj, conv1d or the compiled
                     causal conv pair, patch embed, head)
    flops_other      anything else FlopCounterMode counts (0 for the built-in models)
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from vimbench.models.registry import count_params, create_model

_SCAN_OPS = {"selective_scan", "bidirectional_scan", "selective_scan_fwd", "bidirectional_scan_fwd"}
_LINEAR_OPS = {"mm", "addmm", "convolution", "_convolution", "conv1d", "conv2d", "causal_conv1d_pair_fwd"}


def _category(op) -> str:
    name = str(op).split(".")[-1] if "." in str(op) else str(op)
    if name in _SCAN_OPS:
        return "scan"
    if name in ("bmm", "baddbmm") or "scaled_dot_product" in name:
        return "attention"
    if name in _LINEAR_OPS:
        return "linear"
    return "other"


def count_flops(model: str, res: int, batch: int = 1, head: bool = False, **options) -> dict:
    """FLOPs of one inference forward of ``model`` built for res x res, batch ``batch``.

    ``head=False`` counts ``forward_features`` (the backbone, what the Vim paper timed); ``head=True`` the
    full classifier. Returns flops_total, flops_scan, flops_attention, flops_linear, flops_other (FLOPs),
    params and tokens (sequence length incl. cls).
    """
    with torch.device("meta"):
        net = create_model(model, img_size=res, **options).eval()
        x = torch.empty(batch, 3, res, res)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x) if head else net.forward_features(x)
    out = {"flops_scan": 0, "flops_attention": 0, "flops_linear": 0, "flops_other": 0}
    for op, n in counter.get_flop_counts()["Global"].items():
        out[f"flops_{_category(op)}"] += int(n)
    out["flops_total"] = sum(out.values())
    return {**out, "params": count_params(net), "tokens": net.num_tokens}
