"""Model names for benchmarks and export: ours and timm's, presets, and optional external models."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from torch import nn

from sepvit.bench.measure import Subject
from sepvit.bench.presets import PAPER_TOP1, PRESETS
from sepvit.utils.extras import require


class UnknownModelError(ValueError):
    """A model name that is neither registered in timm, nor a preset, nor an external model."""


def _vit_pytorch_sepvit_tiny() -> nn.Module:
    """vit-pytorch's SepViT configured as SepViT-T (96·(1,2,4,8) channels, depths 1,2,6,2, window 7)."""
    return require("vit_pytorch.sep_vit", "bench").SepViT(
        num_classes=1000, dim=96, depth=(1, 2, 6, 2), heads=(3, 6, 12, 24), window_size=7
    )


# Models from other libraries that timm does not register.
EXTERNAL_MODELS: dict[str, Callable[[], nn.Module]] = {"vitpytorch_sepvit_tiny": _vit_pytorch_sepvit_tiny}


def known_names() -> list[str]:
    import timm

    import sepvit  # noqa: F401  (registers our models with timm)

    return sorted(set(timm.list_models()) | set(PRESETS) | set(EXTERNAL_MODELS))


def unknown_name_message(name: str) -> str:
    matches = difflib.get_close_matches(name, known_names(), n=5, cutoff=0.6)
    hint = (
        f"; close matches: {', '.join(matches)}" if matches else "; see `timm.list_models()` or the presets"
    )
    return f"unknown model {name!r}{hint}"


def resolve_model_names(names: Iterable[str]) -> list[str]:
    """Expand presets, drop repeats (keeping order) and reject unknown names with close matches."""
    import timm

    import sepvit  # noqa: F401

    resolved: list[str] = []
    for name in names:
        for model_name in PRESETS.get(name, (name,)):
            if model_name not in EXTERNAL_MODELS and not timm.is_model(model_name):
                raise UnknownModelError(unknown_name_message(model_name))
            if model_name not in resolved:
                resolved.append(model_name)
    return resolved


def create_model(name: str, **kwargs) -> nn.Module:
    """An eval-mode model with random weights (nothing is downloaded)."""
    import timm

    import sepvit  # noqa: F401

    if name in EXTERNAL_MODELS:
        return EXTERNAL_MODELS[name]().eval()
    if not timm.is_model(name):
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

    import sepvit  # noqa: F401

    config = None if name in EXTERNAL_MODELS else timm.models.get_pretrained_cfg(name)
    return tuple(config.input_size) if config is not None else (3, 224, 224)


def model_subjects(
    names: Iterable[str], backends: tuple[str, ...] = ("eager",), img_size: tuple[int, int] | None = None
) -> list[Subject]:
    """Benchmark subjects for models and presets, once per backend, at ``img_size`` or their own size."""
    subjects = []
    for name in resolve_model_names(names):
        shape = default_input_size(name)
        if img_size is not None:
            shape = (shape[0], *img_size)

        def build(name: str = name) -> nn.Module:
            return create_model_at_size(name, img_size)

        subjects += [Subject(name, build, shape, backend, PAPER_TOP1.get(name)) for backend in backends]
    return subjects
