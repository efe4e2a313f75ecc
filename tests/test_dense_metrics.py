"""COCO AP and mIoU against cases computed by hand."""

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sepvit.dense.metrics import ConfusionMatrix, coco_map, detections_to_coco, whole_image_detections

CATEGORY_IDS = [5, 9]  # non-contiguous on purpose: labels 1, 2 map to them


def _ground_truth(boxes_xywh, size=(200, 200), category_id=5) -> COCO:
    annotations = []
    for index, (x, y, w, h) in enumerate(boxes_xywh, start=1):
        mask = np.zeros(size, np.uint8)
        mask[y : y + h, x : x + w] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "id": index,
                "image_id": 1,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
                "segmentation": rle,
            }
        )
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "height": size[0], "width": size[1], "file_name": "a.png"}],
        "annotations": annotations,
        "categories": [{"id": i, "name": str(i)} for i in CATEGORY_IDS],
    }
    coco.createIndex()
    return coco


def _prediction(boxes_xyxy, scores, labels, size=(200, 200)):
    masks = torch.zeros(len(boxes_xyxy), 1, *size)
    for index, (x0, y0, x1, y1) in enumerate(boxes_xyxy):
        masks[index, 0, y0:y1, x0:x1] = 0.9
    return {
        "boxes": torch.tensor(boxes_xyxy, dtype=torch.float32),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels),
        "masks": masks,
    }


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_detection_scores_one(iou_type):
    coco = _ground_truth([(10, 10, 40, 40)])
    results = detections_to_coco(_prediction([(10, 10, 50, 50)], [0.9], [1]), 1, CATEGORY_IDS)
    assert results[0]["category_id"] == 5 and results[0]["bbox"] == [10.0, 10.0, 40.0, 40.0]
    stats = coco_map(coco, results, iou_type)
    assert stats["AP"] == pytest.approx(1.0) and stats["APm"] == pytest.approx(1.0)
    assert stats["APs"] == 0.0  # no small objects: pycocotools' -1 reported as 0


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_false_positive_ranked_first_halves_the_precision(iou_type):
    coco = _ground_truth([(10, 10, 40, 40)])
    # The wrong-class detection does not count; the higher-scored misplaced one is a false positive.
    prediction = _prediction(
        [(10, 10, 50, 50), (120, 120, 160, 160), (10, 10, 50, 50)], [0.5, 0.9, 0.95], [1, 1, 2]
    )
    stats = coco_map(coco, detections_to_coco(prediction, 1, CATEGORY_IDS), iou_type)
    assert stats["AP"] == pytest.approx(0.5) and stats["AP50"] == pytest.approx(0.5)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_partial_overlap_counts_at_the_thresholds_it_reaches(iou_type):
    coco = _ground_truth([(0, 0, 100, 100)])
    # IoU 0.62: a hit at thresholds 0.50, 0.55 and 0.60, a miss at the seven above: AP = 3/10.
    stats = coco_map(
        coco, detections_to_coco(_prediction([(0, 0, 100, 62)], [0.8], [1]), 1, CATEGORY_IDS), iou_type
    )
    assert stats["AP"] == pytest.approx(0.3)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == 0.0


def test_no_detections_score_zero():
    assert coco_map(_ground_truth([(0, 0, 10, 10)]), [], "bbox")["AP"] == 0.0


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_whole_image_baseline_scores_only_objects_that_fill_the_image(iou_type):
    small = _ground_truth([(10, 10, 40, 40)])
    records = whole_image_detections(small, [1], with_masks=True)
    assert [r["category_id"] for r in records] == CATEGORY_IDS
    assert records[0]["bbox"] == [0.0, 0.0, 200.0, 200.0]
    assert coco_map(small, records, iou_type)["AP50"] == 0.0  # IoU 1600/40000
    # An object covering 63% of the image: IoU 0.63, a hit at thresholds 0.50-0.60 only (AP 3/10).
    large = _ground_truth([(0, 0, 200, 126)])
    stats = coco_map(large, whole_image_detections(large, [1], with_masks=True), iou_type)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP"] == pytest.approx(0.3)


def test_miou_from_the_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    matrix = ConfusionMatrix(num_classes=4)
    matrix.update(prediction, target)
    # IoU: class 0 = 1/3, class 1 = 3/4, class 2 = 1/2; class 3 never occurs (NaN, left out).
    iou = matrix.iou()
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 3 / 4, 1 / 2], dtype=torch.float64))
    assert math.isnan(iou[3])
    metrics = matrix.compute()
    assert metrics["mIoU"] == pytest.approx(19 / 36)
    assert metrics["aAcc"] == pytest.approx(5 / 7) and metrics["mAcc"] == pytest.approx(2 / 3)
    # A class predicted but absent from the ground truth scores IoU 0 and lowers the mean.
    matrix.update(torch.tensor([3]), torch.tensor([0]))
    assert matrix.iou()[3] == 0.0 and matrix.compute()["mIoU"] < 19 / 36
