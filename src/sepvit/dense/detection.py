"""RetinaNet and Mask R-CNN (torchvision) on a timm backbone with an FPN.

torchvision's ``GeneralizedRCNNTransform`` normalises, resizes (shorter side ``min_size``, longer
side at most ``max_size``; a tuple of ``min_size`` values picks one at random per batch in
training, the multi-scale recipe) and pads a list of images of any sizes into one batch.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from sepvit.dense.backbone import BackboneWithFPN, backbone_of, image_mean_std
from sepvit.dense.data import CocoDetection, collate_detection
from sepvit.dense.metrics import coco_map, detections_to_coco
from sepvit.engine.description import RunDescription
from sepvit.errors import ConfigError

DETECTORS = ("retinanet", "maskrcnn")


def _norm_groups(channels: int) -> int:
    """GroupNorm groups of the RetinaNet head: up to 32, each of at least two channels, since P7 of
    a small image is 1×1 and a group of one value cannot be normalised (batch 1 in prediction)."""
    groups = math.gcd(32, channels)
    return groups // 2 if groups == channels else groups


def build_detector(
    arch: str,
    body: nn.Module,
    num_classes: int,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    rois_per_image: int = 512,
) -> nn.Module:
    """A torchvision detector on ``body`` (a 4-level ``features_only`` model).

    ``num_classes`` counts the object classes; labels run from 1 to ``num_classes`` (0 is
    background). RetinaNet follows mmdetection's setup: FPN on strides 8-32 plus P6/P7 computed
    from the last backbone map; its head uses GroupNorm and the GIoU box loss (torchvision's
    ``retinanet_resnet50_fpn_v2`` recipe), which trains stably from scratch. Mask R-CNN uses
    strides 4-32 plus a max-pooled P6 and samples ``rois_per_image``
    proposals per image for its box and mask heads in training.
    """
    mean, std = image_mean_std(body)
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(mean), image_std=list(std))
    last_channels = body.feature_info.channels()[-1]
    if arch == "retinanet":
        backbone = BackboneWithFPN(
            body, fpn_channels, levels=(1, 2, 3), extra_blocks=LastLevelP6P7(last_channels, fpn_channels)
        )
        detector = RetinaNet(backbone, num_classes=num_classes + 1, **common)
        detector.head = RetinaNetHead(
            fpn_channels,
            detector.anchor_generator.num_anchors_per_location()[0],
            num_classes + 1,
            norm_layer=partial(nn.GroupNorm, _norm_groups(fpn_channels)),
        )
        detector.head.regression_head._loss_type = "giou"
        return detector
    if arch == "maskrcnn":
        backbone = BackboneWithFPN(body, fpn_channels, levels=(0, 1, 2, 3), extra_blocks=LastLevelMaxPool())
        # Box and mask heads scale with the FPN width (torchvision's defaults at 256 channels).
        representation = 4 * fpn_channels
        return MaskRCNN(
            backbone,
            box_head=TwoMLPHead(fpn_channels * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, num_classes + 1),
            mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, dilation=1),
            mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1),
            box_batch_size_per_image=rois_per_image,
            **common,
        )
    raise ValueError(f"unknown detector {arch!r}; choose from {', '.join(DETECTORS)}")


def build_detection_model(description: RunDescription, drop_path_rate: float = 0.0) -> nn.Module:
    """The detector a run's description specifies."""
    extras = description.extras
    body = backbone_of(description, drop_path_rate)
    return build_detector(
        extras["arch"],
        body,
        extras["num_classes"],
        min_size=tuple(extras["train_min_sizes"]),
        max_size=extras["max_size"],
        fpn_channels=extras["fpn_channels"],
        rois_per_image=extras["rois_per_image"],
    )


class AnchorOutputs(nn.Module):
    """A RetinaNet's network without its Python pre- and post-processing, for export: images in
    [0, 1] at the size it was trained for -> (B, anchors, classes + 1 + 4), each anchor's class
    logits (background first) then its box regression; anchors, decoding and NMS are torchvision's
    (``detector.anchor_generator``, ``detector.box_coder``)."""

    def __init__(self, detector: RetinaNet) -> None:
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head
        transform = detector.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = list(self.backbone((images - self.mean) / self.std).values())
        outputs = self.head(features)
        return torch.cat([outputs["cls_logits"], outputs["bbox_regression"]], dim=-1)


def exportable(detector: nn.Module) -> nn.Module:
    """The part of a detector that exports as one graph (see :class:`AnchorOutputs`)."""
    if not isinstance(detector, RetinaNet):
        raise ConfigError(
            "a Mask R-CNN run does not export: its proposals and masks are computed with data-dependent "
            "operations; a RetinaNet run exports its per-anchor outputs"
        )
    return AnchorOutputs(detector).eval()


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 2, num_workers: int = 0
) -> dict[str, float]:
    """COCO box AP (and mask AP for Mask R-CNN) of ``model`` on ``dataset``, as fractions."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_detection)
    results = []
    for images, targets in loader:
        outputs = model([image.to(device) for image in images])
        for output, target in zip(outputs, targets):
            results += detections_to_coco(output, target["image_id"], dataset.category_ids)
    metrics = {f"bbox_{k}": v for k, v in coco_map(dataset.coco, results, "bbox", dataset.image_ids).items()}
    if isinstance(model, MaskRCNN):
        metrics.update(
            {f"segm_{k}": v for k, v in coco_map(dataset.coco, results, "segm", dataset.image_ids).items()}
        )
    return metrics
