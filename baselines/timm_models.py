"""Any timm model as a baseline, by name: ``timm:<model_name>`` (pretrained=False, built for img_size).

ViT-style models (every ``blocks[i].attn`` a timm ``Attention`` that ``BackendAttention`` can replace)
take ``attn=`` like the DeiT baselines; every other model (a CNN such as resnet18, a hybrid such as
mambaout_femto) takes no option and runs timm's own forward."""
from __future__ import annotations

import difflib
import functools

import timm
import torch
from timm.models.vision_transformer import Attention

from vimbench.baselines.deit import set_attention_backend, unsupported_attention
from vimbench.errors import InputError
from vimbench.kernels.attention import attention_backends


def check_timm_name(name: str) -> None:
    """InputError unless timm knows model ``name`` (a pretrained tag such as ``.augreg_in1k`` allowed);
    the message lists up to five close matches: the names containing it (timm's ``list_models`` with a
    ``*name*`` pattern), else all timm names, ranked by difflib similarity."""
    if name and timm.is_model(name):
        return
    if not name:
        raise InputError("timm: needs a model name, e.g. timm:resnet18 (see timm.list_models())")
    containing = timm.list_models(f"*{name}*")
    matches = difflib.get_close_matches(name, containing or timm.list_models(), n=5, cutoff=0 if containing else 0.6)
    hint = f"; close matches: {', '.join('timm:' + m for m in matches)}" if matches else ""
    raise InputError(f"unknown timm model {name!r}{hint}")


@functools.lru_cache(maxsize=None)
def timm_options(name: str) -> dict:
    """The options timm model ``name`` takes: {"attn": attention_backends} (the function listing the allowed
    values, plug-ins included) for a ViT-style model, {} otherwise. Decided from the model built on the meta device (nothing allocated); InputError for a
    name timm does not know (``check_timm_name``)."""
    check_timm_name(name)
    with torch.device("meta"):
        model = create_timm_model(name)
    blocks = getattr(model, "blocks", None)
    takes_attn = blocks is not None and len(blocks) > 0 and all(
        isinstance(getattr(b, "attn", None), Attention) and unsupported_attention(b.attn) is None for b in blocks)
    return {"attn": attention_backends} if takes_attn else {}


def create_timm_model(name: str, img_size: int = 224, attn: str | None = None, num_classes: int = 1000):
    """timm.create_model(name, pretrained=False, img_size=img_size); ``attn`` as in ``create_deit``.
    Models without an ``img_size`` argument (CNNs) are built without it: they take any input size."""
    try:
        model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=num_classes)
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if attn is not None:
        set_attention_backend(model, attn)
    return model
