"""Classification models for a run (ours or any timm model) and their data configuration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from sepvit.engine.description import RunDescription
from sepvit.models import create_model


def build_classifier(
    model_name: str,
    num_classes: int,
    img_size: int | None = None,
    drop_path: float | None = None,
    pretrained: bool = False,
    architecture: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A classifier of ``num_classes``; returns it and the keyword arguments that rebuild it.

    ``pretrained`` loads timm's published weights (from the Hugging Face cache, or the hub when
    online); timm replaces the classifier when ``num_classes`` differs from theirs. ``architecture``:
    further keyword arguments of the model's factory (widths, window size, ablation options); an
    ``img_size`` there, such as a non-square (H, W), takes the place of ``img_size``.
    """
    kwargs: dict[str, Any] = {**(architecture or {}), "num_classes": num_classes}
    if img_size is not None and "img_size" not in kwargs:
        kwargs["img_size"] = img_size
    training_only = {"drop_path_rate": drop_path} if drop_path else {}
    model = create_model(model_name, pretrained=pretrained, **kwargs, **training_only)
    return model, kwargs


def data_config_for(model: nn.Module, img_size: int | Sequence[int], crop_pct: float | str) -> dict[str, Any]:
    """timm's data config of the model at ``img_size``, one side or (H, W) (mean, std, interpolation,
    crop)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    if crop_pct != "auto":
        config["crop_pct"] = float(crop_pct)
    return {
        "input_size": [3, *((img_size, img_size) if isinstance(img_size, int) else img_size)],
        "interpolation": config["interpolation"],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "crop_pct": config["crop_pct"],
    }


def describe_classifier(
    model_name: str,
    model_kwargs: dict[str, Any],
    class_names: list[str],
    data_config: dict[str, Any],
    data: str | None = None,
) -> RunDescription:
    """The description a classification run stores with its weights."""
    return RunDescription(
        task="classify",
        model=model_name,
        model_kwargs=model_kwargs,
        class_names=class_names,
        input_size=tuple(data_config["input_size"][-2:]),
        data=data,
        data_config=data_config,
    )
