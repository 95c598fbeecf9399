"""Any timm model as a baseline, by name: ``timm:<model_name>`` (pretrained=False, built for img_size).

ViT-style models (those with ``blocks[i].attn``) also take ``attn=`` like the DeiT baselines."""
from __future__ import annotations

import timm

from vimbench.baselines.deit import set_attention_backend


def create_timm_model(name: str, img_size: int = 224, attn: str | None = None, num_classes: int = 1000):
    """timm.create_model(name, pretrained=False, img_size=img_size); ``attn`` as in ``create_deit``.
    Models without an ``img_size`` argument (CNNs) are built without it: they take any input size."""
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}")
    try:
        model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=num_classes)
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if attn is not None:
        if not hasattr(model, "blocks"):
            raise ValueError(f"timm model {name!r} has no ViT blocks, so it takes no attn= option")
        set_attention_backend(model, attn)
    return model
