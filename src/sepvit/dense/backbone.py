"""Feature-pyramid backbones from timm models, and loading classification checkpoints into them."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from sepvit.engine.checkpoint import LoadReport, load_pretrained, read_weights
from sepvit.engine.description import RunDescription
from sepvit.errors import CheckpointError
from sepvit.models import create_model


def create_features(
    model_name: str,
    img_size: tuple[int, int] | None = None,
    drop_path_rate: float = 0.0,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    features_only: bool = True,
    **model_kwargs,
) -> nn.Module:
    """A timm model; ``features_only`` returns the NCHW maps of ``out_indices`` (strides 4..32 for SepViT).

    ``img_size`` builds a windowed model's window grid (and its window tokens) for that input
    size; models without such a grid are created without it.
    """
    kwargs = {**model_kwargs, "drop_path_rate": drop_path_rate}
    if features_only:
        kwargs.update(features_only=True, out_indices=out_indices)
    else:
        kwargs["num_classes"] = 0
    if img_size is not None:
        kwargs["img_size"] = tuple(img_size)
    return create_model(model_name, **kwargs)


def backbone_of(description: RunDescription, drop_path_rate: float = 0.0) -> nn.Module:
    """The ``features_only`` backbone of the dense run ``description`` describes."""
    return create_features(
        description.model, description.input_size, drop_path_rate, **description.model_kwargs
    )


def image_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config = timm.data.resolve_data_config({}, model=model)
    return tuple(config["mean"]), tuple(config["std"])


def load_classification_checkpoint(
    features: nn.Module, model_name: str, path: str | Path, img_size: tuple[int, int] | None = None
) -> LoadReport:
    """Load a classification checkpoint of ``model_name`` into its ``features_only`` model.

    The checkpoint is adapted (window tokens to the new window grid) against a classifier built for
    the same ``img_size``; its classifier head is left over. Raises ``CheckpointError`` when it
    holds another model, shapes disagree or most of the backbone is not in it.
    """
    _, description = read_weights(path)
    if description is not None and description.model != model_name:
        raise CheckpointError(f"checkpoint {path} holds {description.model}, not {model_name}")
    reference = create_features(model_name, img_size=img_size, features_only=False)
    return load_pretrained(features, path, reference=reference)


class BackboneWithFPN(nn.Module):
    """A ``features_only`` timm model plus torchvision's FPN: the backbone torchvision detectors expect.

    ``levels`` picks which pyramid maps feed the FPN (RetinaNet uses strides 8-32, Mask R-CNN
    4-32); ``extra_blocks`` adds the coarser levels (P6/P7 or max-pool). The output is an
    ``OrderedDict`` of ``out_channels``-channel maps named ``"0"``, ``"1"``, … then the extras.
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int,
        levels: tuple[int, ...] = (0, 1, 2, 3),
        extra_blocks: ExtraFPNBlock | None = None,
    ):
        super().__init__()
        channels = body.feature_info.channels()
        self.body = body
        self.levels = levels
        self.fpn = FeaturePyramidNetwork(
            [channels[i] for i in levels], out_channels, extra_blocks=extra_blocks
        )
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(images)
        return self.fpn(OrderedDict((str(i), features[level]) for i, level in enumerate(self.levels)))
