"""Benchmark subjects: models by name (ours, timm's, and peers from other libraries that timm does
not register) and the papers' peer presets. Nothing is downloaded: models get random weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import timm
from torch import nn

from sepvit.bench.measure import Subject
from sepvit.bench.presets import PRESETS, paper_top1
from sepvit.errors import UnknownModelError
from sepvit.models import create_model, default_input_size, unknown_model_message
from sepvit.utils.extras import require


def _vit_pytorch_sepvit_tiny() -> nn.Module:
    """vit-pytorch's SepViT configured as SepViT-T (96·(1,2,4,8) channels, depths 1,2,6,2, window 7)."""
    return require("vit_pytorch.sep_vit", "bench").SepViT(
        num_classes=1000, dim=96, depth=(1, 2, 6, 2), heads=(3, 6, 12, 24), window_size=7
    )


# Models from other libraries that timm does not register.
EXTERNAL_MODELS: dict[str, Callable[[], nn.Module]] = {"vitpytorch_sepvit_tiny": _vit_pytorch_sepvit_tiny}


def resolve_model_names(names: Iterable[str]) -> list[str]:
    """Expand presets, drop repeats (keeping order) and reject unknown names with close matches."""
    resolved: list[str] = []
    for name in names:
        for model_name in PRESETS.get(name, (name,)):
            if model_name not in EXTERNAL_MODELS and not timm.is_model(model_name):
                raise UnknownModelError(unknown_model_message(model_name, [*EXTERNAL_MODELS, *PRESETS]))
            if model_name not in resolved:
                resolved.append(model_name)
    return resolved


def bench_model(name: str, img_size: tuple[int, int] | None = None) -> nn.Module:
    """An eval-mode model with random weights, built for ``img_size`` when its factory takes one."""
    if name in EXTERNAL_MODELS:
        return EXTERNAL_MODELS[name]().eval()
    return create_model(name, **({"img_size": img_size} if img_size else {})).eval()


def model_subjects(
    names: Iterable[str], backends: tuple[str, ...] = ("eager",), img_size: tuple[int, int] | None = None
) -> list[Subject]:
    """Benchmark subjects for models and presets, once per backend, at ``img_size`` or their own size."""
    subjects = []
    for name in resolve_model_names(names):
        shape = (3, 224, 224) if name in EXTERNAL_MODELS else default_input_size(name)
        if img_size is not None:
            shape = (shape[0], *img_size)

        def build(name: str = name) -> nn.Module:
            return bench_model(name, img_size)

        subjects += [Subject(name, build, shape, backend, paper_top1(name)) for backend in backends]
    return subjects
