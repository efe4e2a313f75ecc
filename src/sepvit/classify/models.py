"""Classification models by name (ours or timm's), their data configuration and pretrained weights."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn

from sepvit.errors import ConfigError, WeightsNotFoundError

# Keyword arguments that only some timm models accept; dropped when a model refuses them.
OPTIONAL_MODEL_KWARGS = ("img_size", "drop_path_rate")


def check_model_name(model_name: str) -> None:
    import timm

    import sepvit  # noqa: F401  (registers our models with timm)

    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {model_name!r} (not one of ours nor a timm model){hint}")


def default_img_size(model_name: str) -> int:
    """The model's default input size (its pretrained config), 224 if it has none."""
    import timm

    check_model_name(model_name)
    cfg = timm.models.get_pretrained_cfg(model_name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def create_model(
    model_name: str,
    num_classes: int,
    img_size: int | None = None,
    drop_path: float | None = None,
    pretrained: bool = False,
    architecture: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm-registered model; returns it and the keyword arguments that rebuild it.

    ``pretrained`` loads timm's published weights (from the Hugging Face cache, or the hub when
    online); timm replaces the classifier when ``num_classes`` differs from theirs. ``architecture``:
    further keyword arguments of the model's factory (widths, window size, ablation options).
    """
    import timm

    check_model_name(model_name)
    kwargs: dict[str, Any] = {**(architecture or {}), "num_classes": num_classes}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    while True:
        try:
            model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        except TypeError as error:
            refused = next((k for k in OPTIONAL_MODEL_KWARGS if k in kwargs and k in str(error)), None)
            if refused is None:
                raise
            kwargs.pop(refused)
            continue
        except (RuntimeError, OSError, ValueError) as error:
            if not pretrained:
                raise
            raise WeightsNotFoundError(
                f"no pretrained weights of {model_name} could be loaded ({' '.join(str(error).split())}); "
                "pass a local file instead: --pretrained FILE"
            ) from error
        return model, {key: value for key, value in kwargs.items() if key != "drop_path_rate"}


def data_config_for(model: nn.Module, img_size: int, crop_pct: float | str) -> dict[str, Any]:
    """timm's data config of the model at ``img_size`` (mean, std, interpolation, crop)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    if crop_pct != "auto":
        config["crop_pct"] = float(crop_pct)
    return {
        "input_size": [3, img_size, img_size],
        "interpolation": config["interpolation"],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "crop_pct": config["crop_pct"],
    }
