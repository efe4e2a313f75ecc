"""Benchmark subjects: models by name (sepvit.models.names) and the papers' peer presets."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from sepvit.bench.measure import Subject
from sepvit.bench.presets import PAPER_TOP1, PRESETS
from sepvit.models import names as model_names
from sepvit.models.names import (
    UnknownModelError,
    create_model_at_size,
    default_input_size,
    is_known,
)


def unknown_name_message(name: str) -> str:
    """``unknown model NAME``, with close matches among models and the benchmark presets."""
    return model_names.unknown_name_message(name, PRESETS)


def resolve_model_names(names: Iterable[str]) -> list[str]:
    """Expand presets, drop repeats (keeping order) and reject unknown names with close matches."""
    resolved: list[str] = []
    for name in names:
        for model_name in PRESETS.get(name, (name,)):
            if not is_known(model_name):
                raise UnknownModelError(unknown_name_message(model_name))
            if model_name not in resolved:
                resolved.append(model_name)
    return resolved


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
