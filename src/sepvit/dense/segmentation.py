"""Semantic FPN (Kirillov et al. 2019) and UperNet (Xiao et al. 2018) on a 4-level feature pyramid.

Heads use GroupNorm rather than BatchNorm so that small per-device batches train well.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from sepvit.dense.backbone import backbone_of, image_mean_std
from sepvit.dense.data import IGNORE_INDEX
from sepvit.dense.metrics import ConfusionMatrix
from sepvit.engine.description import RunDescription

HEADS = ("fpn", "upernet")


def _conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> Conv2dNormActivation:
    groups = math.gcd(32, max(1, out_channels // 4))  # at least 4 channels per group, even on 1×1 maps
    return Conv2dNormActivation(
        in_channels, out_channels, kernel_size, norm_layer=lambda c: nn.GroupNorm(groups, c), bias=False
    )


def _upsample_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


class SemanticFPNHead(nn.Module):
    """FPN, then per level conv-GN-ReLU(-2× upsample) steps down to stride 4, summed, then classified."""

    def __init__(
        self, in_channels: list[int], num_classes: int, fpn_channels: int = 256, channels: int = 128
    ):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels)
        self.scale_heads = nn.ModuleList()
        for level in range(len(in_channels)):
            steps = []
            for step in range(max(level, 1)):
                steps.append(_conv_gn_relu(fpn_channels if step == 0 else channels, channels))
                if level > 0:
                    steps.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*steps))
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        pyramid = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())
        fused = self.scale_heads[0](pyramid[0])
        for head, level in zip(self.scale_heads[1:], pyramid[1:]):
            # Odd map sizes make 2× upsampling miss by a pixel: align to the finest level.
            fused = fused + _upsample_to(head(level), fused)
        return self.classifier(fused)


class UperNetHead(nn.Module):
    """Pyramid pooling on the last map, FPN top-down path, all levels fused at stride 4, classified."""

    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
    ):
        super().__init__()
        self.pool_branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv_gn_relu(in_channels[-1], channels, 1))
            for scale in pool_scales
        )
        self.pool_bottleneck = _conv_gn_relu(in_channels[-1] + len(pool_scales) * channels, channels)
        self.lateral_convs = nn.ModuleList(_conv_gn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_gn_relu(channels, channels) for _ in in_channels[:-1])
        self.fpn_bottleneck = _conv_gn_relu(len(in_channels) * channels, channels)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        last = features[-1]
        pooled = [_upsample_to(branch(last), last) for branch in self.pool_branches]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
        laterals.append(self.pool_bottleneck(torch.cat([last, *pooled], dim=1)))
        for level in range(len(laterals) - 1, 0, -1):
            laterals[level - 1] = laterals[level - 1] + _upsample_to(laterals[level], laterals[level - 1])
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        fused = torch.cat([outputs[0]] + [_upsample_to(o, outputs[0]) for o in outputs[1:]], dim=1)
        return self.classifier(self.fpn_bottleneck(fused))


class AuxiliaryFCNHead(nn.Module):
    """mmsegmentation's training-only auxiliary head on the stride-16 map (loss weight 0.4)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.layers = nn.Sequential(
            _conv_gn_relu(in_channels, channels), nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1)
        )

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.layers(feature)


class Segmenter(nn.Module):
    """Backbone + decode head. Takes images in [0, 1] (normalised inside) of any size.

    ``forward(images)`` gives logits at the input resolution; ``forward(images, labels)`` gives
    the loss dict (cross-entropy, ``IGNORE_INDEX`` skipped, plus the auxiliary loss for UperNet).
    """

    def __init__(
        self,
        body: nn.Module,
        head: str,
        num_classes: int,
        head_channels: int | None = None,
        aux_weight: float = 0.4,
    ):
        super().__init__()
        channels = body.feature_info.channels()
        mean, std = image_mean_std(body)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.body = body
        self.num_classes = num_classes
        if head == "fpn":
            self.decode_head = SemanticFPNHead(
                channels, num_classes, fpn_channels=2 * (head_channels or 128), channels=head_channels or 128
            )
            self.aux_head = None
        elif head == "upernet":
            self.decode_head = UperNetHead(channels, num_classes, channels=head_channels or 512)
            self.aux_head = AuxiliaryFCNHead(channels[2], num_classes, channels=(head_channels or 512) // 2)
        else:
            raise ValueError(f"unknown segmentation head {head!r}; choose from {', '.join(HEADS)}")
        self.aux_weight = aux_weight

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        features = self.body((images - self.mean) / self.std)
        logits = _upsample_to(self.decode_head(features), images)
        if labels is None:
            return logits
        losses = {"loss_seg": F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)}
        if self.aux_head is not None:
            aux_logits = _upsample_to(self.aux_head(features[2]), images)
            losses["loss_aux"] = self.aux_weight * F.cross_entropy(
                aux_logits, labels, ignore_index=IGNORE_INDEX
            )
        return losses


def build_segmentation_model(description: RunDescription, drop_path_rate: float = 0.0) -> Segmenter:
    """The segmenter a run's description specifies."""
    extras = description.extras
    body = backbone_of(description, drop_path_rate)
    return Segmenter(body, extras["head"], extras["num_classes"], head_channels=extras["head_channels"])


@torch.no_grad()
def predict_probabilities(
    model: Segmenter,
    image: torch.Tensor,
    output_size: tuple[int, int],
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    size_divisor: int = 32,
) -> torch.Tensor:
    """Class probabilities (C, H, W) at ``output_size`` for one image (3, h, w), averaged over
    rescaled (and optionally flipped) copies: mmsegmentation's multi-scale test."""
    total = None
    for scale in scales:
        height, width = (max(size_divisor, round(s * scale)) for s in image.shape[-2:])
        scaled = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)
        views = [scaled, scaled.flip(-1)] if flip else [scaled]
        for index, view in enumerate(views):
            logits = model(view)
            if index == 1:
                logits = logits.flip(-1)
            probabilities = F.interpolate(
                logits, size=output_size, mode="bilinear", align_corners=False
            ).softmax(1)
            total = probabilities if total is None else total + probabilities
    return total[0] / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def evaluate_segmentation(
    model: Segmenter,
    dataset,
    device: torch.device,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    num_workers: int = 0,
) -> dict[str, float]:
    """mIoU, mean class accuracy and pixel accuracy over ``dataset`` (image, full-size label) pairs."""
    model.eval()
    matrix = ConfusionMatrix(model.num_classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    for image, label in loader:
        probabilities = predict_probabilities(model, image.to(device), tuple(label.shape), scales, flip)
        matrix.update(probabilities.argmax(0).cpu(), label)
    return matrix.compute()
