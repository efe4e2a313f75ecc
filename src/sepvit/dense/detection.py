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

from sepvit.dense.backbone import BackboneWithFPN, create_features, image_mean_std
from sepvit.dense.data import CocoDetection, collate_detection
from sepvit.dense.metrics import coco_map, detections_to_coco

DETECTORS = ("retinanet", "maskrcnn")


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
            norm_layer=partial(nn.GroupNorm, math.gcd(32, fpn_channels)),
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


def build_detection_model(info: dict, drop_path_rate: float = 0.0) -> nn.Module:
    """The detector a checkpoint's description (or a task's configuration) specifies."""
    body = create_features(info["model"], img_size=info["img_size"], drop_path_rate=drop_path_rate)
    return build_detector(
        info["arch"],
        body,
        info["num_classes"],
        min_size=tuple(info["train_min_sizes"]),
        max_size=info["max_size"],
        fpn_channels=info["fpn_channels"],
        rois_per_image=info["rois_per_image"],
    )


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
