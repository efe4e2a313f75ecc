"""Model families; importing this package registers every model in timm's registry."""

from __future__ import annotations

import timm
from torch import nn

from sepvit.models import efficientvit as efficientvit
from sepvit.models import mobilevitv2 as mobilevitv2
from sepvit.models import sepvit as sepvit

# The timm module names (last part of the module path) that hold our models.
MODEL_MODULES = ("sepvit", "mobilevitv2", "efficientvit")


def list_models(pattern: str = "") -> list[str]:
    """Names of the models this package registers, optionally filtered by a wildcard pattern."""
    return [
        name
        for name in timm.list_models(pattern or "*")
        if timm.models.is_model_in_modules(name, MODEL_MODULES)
    ]


def published_top1(name: str) -> float | None:
    """ImageNet-1k top-1 (%) published for the weights ``name`` ("model.tag"; a bare model name
    means its default weights), or None where none is recorded."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.has_weights:
        return None
    tagged = f"{cfg.architecture}.{cfg.tag}"
    return {**efficientvit.PUBLISHED_TOP1, **mobilevitv2.PUBLISHED_TOP1}.get(tagged)


def create_model(model_name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` with this package's models registered; same arguments."""
    return timm.create_model(model_name, **kwargs)
