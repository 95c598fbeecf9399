"""DeiT baselines (Touvron et al., arXiv 2012.12877): timm's ``deit_{tiny,small,base}_patch16_224``
(pretrained=False) built for ``img_size=res`` (non-multiples of 16 allowed: the grid is floor(res/16)),
with the attention kernel as explicit per-instance state.

Every block's timm ``Attention`` is replaced by ``BackendAttention``, which keeps timm's ``qkv`` and
``proj`` modules (so state_dict keys are timm's) and runs the core through ``kernels.attention`` with the
backend named by ``attn=`` (eager | sdpa | flash | efficient | math | cudnn).
Shapes: b batch, M tokens (patches + cls), D embed_dim, H heads, d = D / H.
"""
from __future__ import annotations

import timm
import torch.nn as nn

from vimbench.kernels.attention import attention, attention_backends


def unsupported_attention(timm_attn: nn.Module) -> str | None:
    """Why ``BackendAttention`` cannot replace the timm ``Attention`` ``timm_attn`` (a q/k norm or a
    norm before the projection, which it does not implement); None if it can."""
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(timm_attn, name, nn.Identity()), nn.Identity):
            return f"BackendAttention does not implement timm's {name}"
    return None


class BackendAttention(nn.Module):
    """timm's multi-head self-attention with the kernel named by ``backend``. (b, M, D) -> (b, M, D)."""

    def __init__(self, timm_attn: nn.Module, backend: str):
        super().__init__()
        why = unsupported_attention(timm_attn)
        if why:
            raise ValueError(why)
        self.num_heads, self.head_dim = timm_attn.num_heads, timm_attn.head_dim
        self.qkv, self.proj = timm_attn.qkv, timm_attn.proj
        self.backend = backend

    def forward(self, x, attn_mask=None, **unused):
        if attn_mask is not None:
            raise ValueError("BackendAttention does not take an attention mask")
        b, M, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, M, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v, self.backend)                                    # (b, H, M, d)
        return self.proj(x.transpose(1, 2).reshape(b, M, self.num_heads * self.head_dim))


def set_attention_backend(model: nn.Module, attn: str) -> None:
    """Sets the attention kernel of every block of a timm ViT-style ``model`` (replacing timm Attention)."""
    if attn not in attention_backends():
        raise ValueError(f"unknown attention backend {attn!r}; choose from {', '.join(attention_backends())}")
    for blk in model.blocks:
        if isinstance(blk.attn, BackendAttention):
            blk.attn.backend = attn
        else:
            blk.attn = BackendAttention(blk.attn, attn)
    model.attn = attn


def create_deit(variant: str, img_size: int = 224, attn: str = "sdpa", num_classes: int = 1000):
    """timm ``deit_{variant}_patch16_224`` built for ``img_size``, attention kernel ``attn``.

    The returned timm VisionTransformer has ``forward_features`` (b, 3, img, img) -> (b, M, D) and ``forward``
    (adds the cls-token head), and an ``attn`` attribute naming the backend.
    """
    model = timm.create_model(f"deit_{variant}_patch16_224", pretrained=False, img_size=img_size,
                              num_classes=num_classes)
    set_attention_backend(model, attn)
    return model
