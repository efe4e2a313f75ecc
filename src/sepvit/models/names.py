"""Models by name for the applications (benchmarks, export): ours and timm's, and peers from other
libraries that timm does not register. Nothing is downloaded: models get random weights."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from torch import nn

from sepvit.errors import ConfigError
from sepvit.utils.extras import require


class UnknownModelError(ConfigError):
    """A model name that is neither registered in timm, nor a preset, nor an external model."""


def _vit_pytorch_sepvit_tiny() -> nn.Module:
    """vit-pytorch's SepViT configured as SepViT-T (96·(1,2,4,8) channels, depths 1,2,6,2, window 7)."""
    return require("vit_pytorch.sep_vit", "bench").SepViT(
        num_classes=1000, dim=96, depth=(1, 2, 6, 2), heads=(3, 6, 12, 24), window_size=7
    )


# Models from other libraries that timm does not register.
EXTERNAL_MODELS: dict[str, Callable[[], nn.Module]] = {"vitpytorch_sepvit_tiny": _vit_pytorch_sepvit_tiny}


def is_known(name: str) -> bool:
    import timm

    return name in EXTERNAL_MODELS or timm.is_model(name)


def unknown_name_message(name: str, other_names: Iterable[str] = ()) -> str:
    """``unknown model NAME`` with close matches among timm's, the external and ``other_names``."""
    import timm

    names = sorted(set(timm.list_models()) | set(EXTERNAL_MODELS) | set(other_names))
    matches = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(matches)}" if matches else "; see `timm.list_models()`"
    return f"unknown model {name!r}{hint}"


def create_model(name: str, **kwargs) -> nn.Module:
    """An eval-mode model with random weights (nothing is downloaded)."""
    import timm

    if name in EXTERNAL_MODELS:
        return EXTERNAL_MODELS[name]().eval()
    if not is_known(name):
        raise UnknownModelError(unknown_name_message(name))
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def create_model_at_size(name: str, img_size: tuple[int, int] | None = None) -> nn.Module:
    """The model built for ``img_size`` when its factory takes one (window grids, position tables),
    else as configured: such models run at any input size as built."""
    if img_size is not None and name not in EXTERNAL_MODELS:
        try:
            return create_model(name, img_size=img_size)
        except TypeError:
            pass
    return create_model(name)


def default_input_size(name: str) -> tuple[int, int, int]:
    """The model's configured input size (C, H, W); 224×224 RGB when it declares none."""
    import timm

    config = None if name in EXTERNAL_MODELS else timm.models.get_pretrained_cfg(name)
    return tuple(config.input_size) if config is not None else (3, 224, 224)
