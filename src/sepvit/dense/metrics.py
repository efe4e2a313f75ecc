"""COCO mAP (box and mask, pycocotools) and mIoU (confusion matrix)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch

from sepvit.utils.extras import require

# COCOeval.stats order for both box and mask evaluation.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(
    prediction: dict[str, torch.Tensor], image_id: int, category_ids: list[int], mask_threshold: float = 0.5
) -> list[dict]:
    """One image's torchvision detector output as COCO result records (labels 1..K → category ids)."""
    boxes = prediction["boxes"].detach().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]
    records = []
    masks = prediction.get("masks")
    for index in range(len(boxes)):
        record = {
            "image_id": int(image_id),
            "category_id": int(category_ids[int(prediction["labels"][index]) - 1]),
            "bbox": [round(float(v), 2) for v in boxes[index]],
            "score": float(prediction["scores"][index]),
        }
        if masks is not None:
            binary = (masks[index, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rle = require("pycocotools.mask", "dense").encode(np.asfortranarray(binary))
            record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        records.append(record)
    return records


def coco_map(
    coco_gt: Any, results: list[dict], iou_type: str, image_ids: list[int] | None = None
) -> dict[str, float]:
    """COCO AP, AP50, AP75 and AP by object size for ``iou_type`` 'bbox' or 'segm', as fractions.

    With no results at all every AP is 0 (pycocotools cannot load an empty result list).
    """
    if not results:
        return dict.fromkeys(COCO_STAT_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco_dt = coco_gt.loadRes(results)
        evaluator = require("pycocotools.cocoeval", "dense").COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # pycocotools reports -1 where a size range holds no objects.
    return {name: max(float(value), 0.0) for name, value in zip(COCO_STAT_NAMES, evaluator.stats[:6])}


class ConfusionMatrix:
    """Accumulates a (num_classes × num_classes) confusion matrix; rows are ground truth."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != self.ignore_index
        index = target[valid].long() * self.num_classes + prediction[valid].long()
        self.matrix += torch.bincount(index.cpu(), minlength=self.num_classes**2).view(self.num_classes, -1)

    def merge(self, other: torch.Tensor) -> None:
        self.matrix += other.cpu()

    def iou(self) -> torch.Tensor:
        """Per-class IoU; NaN for a class absent from both ground truth and prediction."""
        matrix = self.matrix.double()
        true_positive = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        return torch.where(union > 0, true_positive / union.clamp(min=1), torch.nan)

    def compute(self) -> dict[str, float]:
        """mIoU (mean over classes that occur), mean class accuracy and pixel accuracy, as fractions."""
        matrix = self.matrix.double()
        per_class_total = matrix.sum(1)
        accuracy = torch.where(per_class_total > 0, matrix.diag() / per_class_total.clamp(min=1), torch.nan)
        return {
            "mIoU": float(self.iou().nanmean()),
            "mAcc": float(accuracy.nanmean()),
            "aAcc": float(matrix.diag().sum() / matrix.sum().clamp(min=1)),
        }


def whole_image_detections(coco_gt: Any, image_ids: list[int], with_masks: bool = False) -> list[dict]:
    """The trivial detector: per image, one box (and mask) covering the whole image for every
    category, all with the same score. Its COCO AP is the floor a trained detector must clear."""
    records = []
    for image_id in image_ids:
        info = coco_gt.imgs[image_id]
        height, width = info["height"], info["width"]
        for category_id in sorted(coco_gt.getCatIds()):
            record = {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [0.0, 0.0, float(width), float(height)],
                "score": 1.0,
            }
            if with_masks:
                rle = require("pycocotools.mask", "dense").encode(
                    np.asfortranarray(np.ones((height, width), np.uint8))
                )
                record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            records.append(record)
    return records
