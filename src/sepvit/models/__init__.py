"""Model families; importing this package registers every model in timm's registry."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import timm
from torch import nn

from sepvit.errors import SepViTError, UnknownModelError, WeightsNotFoundError
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


# Keyword arguments that only some models take (window grids, stochastic depth): a model whose
# factory refuses one is built without it, as it runs at any input size anyway.
OPTIONAL_KWARGS = ("img_size", "drop_path_rate")


def unknown_model_message(name: str, other_names: Iterable[str] = ()) -> str:
    """``unknown model NAME`` with close matches among timm's names and ``other_names``."""
    names = sorted(set(timm.list_models()) | set(other_names))
    matches = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(matches)}" if matches else "; see `timm.list_models()`"
    return f"unknown model {name!r}{hint}"


def _registered(model_name: str) -> bool:
    """A registered model, also with a weights tag (``name.tag``) or from the hub (``hf-hub:...``)."""
    source, name = timm.models.parse_model_name(model_name)
    return source is not None or timm.is_model(timm.models.split_model_name_tag(name)[0])


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` with this package's models registered; same arguments, and:

    an unknown name raises :class:`~sepvit.errors.UnknownModelError` with close matches; ``img_size`` and
    ``drop_path_rate`` are left out for models whose factory does not take them; weights that
    cannot be loaded with ``pretrained=True`` raise :class:`~sepvit.errors.WeightsNotFoundError`.
    ``features_only=True`` gives the backbone's feature maps, as in timm.
    """
    if not _registered(model_name):
        raise UnknownModelError(unknown_model_message(model_name))
    while True:
        try:
            return timm.create_model(model_name, pretrained=pretrained, **kwargs)
        except TypeError as error:
            refused = next((key for key in OPTIONAL_KWARGS if key in kwargs and key in str(error)), None)
            if refused is None:
                raise
            kwargs = {key: value for key, value in kwargs.items() if key != refused}
        except (RuntimeError, OSError, ValueError) as error:
            if not pretrained or isinstance(error, SepViTError):
                raise
            raise WeightsNotFoundError(
                f"no pretrained weights of {model_name} could be loaded ({' '.join(str(error).split())}); "
                "pass a local file instead: --pretrained FILE"
            ) from error


def default_input_size(model_name: str) -> tuple[int, int, int]:
    """The model's configured input size (C, H, W); 224×224 RGB when it declares none."""
    if not _registered(model_name):
        raise UnknownModelError(unknown_model_message(model_name))
    cfg = timm.models.get_pretrained_cfg(model_name)
    return tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
