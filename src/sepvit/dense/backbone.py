"""Feature-pyramid backbones from timm models, and loading classification checkpoints into them."""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from sepvit.engine.checkpoint import read_weights
from sepvit.errors import CheckpointError
from sepvit.models import create_model

# A checkpoint that covers less than this share of the backbone's tensors is not one for it.
MIN_LOADED_FRACTION = 0.5


def create_features(
    model_name: str,
    img_size: tuple[int, int] | None = None,
    drop_path_rate: float = 0.0,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    features_only: bool = True,
) -> nn.Module:
    """A timm model; ``features_only`` returns the NCHW maps of ``out_indices`` (strides 4..32 for SepViT).

    ``img_size`` builds a windowed model's window grid (and its window tokens) for that input
    size; models without such a grid are created without it.
    """
    kwargs = {"drop_path_rate": drop_path_rate}
    if features_only:
        kwargs.update(features_only=True, out_indices=out_indices)
    else:
        kwargs["num_classes"] = 0
    if img_size is not None:
        kwargs["img_size"] = tuple(img_size)
    return create_model(model_name, **kwargs)


def image_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config = timm.data.resolve_data_config({}, model=model)
    return tuple(config["mean"]), tuple(config["std"])


@dataclass
class LoadReport:
    """What a checkpoint gave a backbone: tensors loaded, left at initialisation, and left over."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone tensors the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the backbone does not use
    mismatched: list[str] = field(default_factory=list)  # "name: checkpoint shape vs backbone shape"
    adapted: list[str] = field(default_factory=list)  # reshaped by the model's checkpoint filter

    def summary(self, limit: int = 5) -> str:
        def listed(title: str, names: list[str]) -> str:
            more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
            return f"\n  {title} ({len(names)}): {', '.join(names[:limit])}{more}" if names else ""

        return (
            f"loaded {len(self.loaded)} of {len(self.loaded) + len(self.missing)} backbone tensors"
            + listed("adapted to the window grid", self.adapted)
            + listed("missing, left at initialisation", self.missing)
            + listed("not used by the backbone", self.unexpected)
            + listed("shape mismatch, not loaded", self.mismatched)
        )


def _flat_name(name: str) -> str:
    # timm's feature wrappers rename "stages.0.x" to "stages_0.x" (FeatureListNet) or prefix "model.".
    return name.removeprefix("model.").replace(".", "_")


def load_classification_checkpoint(
    features: nn.Module, model_name: str, path: str | Path, img_size=None
) -> LoadReport:
    """Load a classification checkpoint of ``model_name`` into its ``features_only`` model.

    The checkpoint goes through the model family's ``checkpoint_filter_fn`` against a classifier
    built for the same ``img_size``, which adapts window tokens to the new window grid; the
    classifier head is dropped. Raises ``CheckpointError`` when shapes disagree or most
    of the backbone is not in the checkpoint (another model, or not a checkpoint of ours).
    """
    checkpoint, info = read_weights(path)
    trained_as = (info or {}).get("model")
    if trained_as and trained_as != model_name:
        raise CheckpointError(f"checkpoint {path} holds {trained_as}, not {model_name}")
    reference = create_features(model_name, img_size=img_size, features_only=False)
    filter_fn = getattr(sys.modules[type(reference).__module__], "checkpoint_filter_fn", None)
    filtered = dict(checkpoint)
    if filter_fn is not None:
        try:
            filtered = filter_fn(dict(checkpoint), reference)
        except Exception as error:  # a foreign checkpoint can break a filter in any way
            raise CheckpointError(f"checkpoint {path} does not fit {model_name}: {error}") from error
    report = LoadReport()
    by_flat_name = {_flat_name(name): name for name in filtered}
    target_state = features.state_dict()
    to_load = {}
    for name, tensor in target_state.items():
        source = by_flat_name.pop(_flat_name(name), None)
        if source is None:
            report.missing.append(name)
        elif filtered[source].shape != tensor.shape:
            report.mismatched.append(f"{source}: {tuple(filtered[source].shape)} vs {tuple(tensor.shape)}")
        else:
            to_load[name] = filtered[source]
            report.loaded.append(name)
            original = checkpoint.get(source)
            if original is not None and original.shape != tensor.shape:
                report.adapted.append(source)
    report.unexpected = sorted(by_flat_name.values())  # the classifier head, and anything foreign
    total = len(target_state)
    if report.mismatched or len(report.loaded) < MIN_LOADED_FRACTION * total:
        raise CheckpointError(
            f"checkpoint {path} does not fit {model_name}: " + report.summary().replace("\n  ", "; ")
        )
    features.load_state_dict(to_load, strict=False)
    return report


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
