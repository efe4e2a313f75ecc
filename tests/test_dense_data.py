"""The embedded shapes dataset and the COCO / ADE20K readers that load it."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sepvit.dense import synthetic
from sepvit.dense.data import (
    IGNORE_INDEX,
    ADE20KSegmentation,
    CocoDetection,
    SegmentationEvalDataset,
    collate_segmentation,
    detection_transforms,
    segmentation_transforms,
)
from sepvit.errors import DataError


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return synthetic.write_coco(
        tmp_path_factory.mktemp("data") / "coco", num_train=6, num_val=3, size=64, seed=3
    )


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return synthetic.write_ade20k(
        tmp_path_factory.mktemp("data") / "ade", num_train=6, num_val=3, size=64, seed=3
    )


def test_rendered_scene_masks_are_disjoint_and_match_the_class_map():
    scene = synthetic.render_scene(np.random.default_rng(0), 80, 96, max_objects=6)
    assert scene.image.shape == (80, 96, 3) and scene.image.dtype == np.uint8
    assert len(scene.masks) == len(scene.labels) >= 1
    assert scene.masks.sum(0).max() <= 1  # each pixel belongs to at most one visible instance
    class_map = scene.class_map()
    for mask, label in zip(scene.masks, scene.labels):
        assert (class_map[mask] == label + 1).all()
    assert (class_map[~scene.masks.any(0)] == 0).all()


def test_coco_reader_returns_boxes_that_enclose_their_masks(coco_root):
    dataset = CocoDetection(coco_root, "train", with_masks=True)
    assert len(dataset) == 6 and dataset.class_names == list(synthetic.SHAPE_NAMES)
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    masks, boxes = target["masks"], target["boxes"]
    assert masks.shape[1:] == image.shape[1:] and len(boxes) == len(masks) == len(target["labels"])
    for mask, box in zip(masks, boxes):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        expected = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        torch.testing.assert_close(box.as_subclass(torch.Tensor), expected)
    document = json.loads((coco_root / "annotations" / "instances_train.json").read_text())
    assert sum(a["image_id"] == dataset.image_ids[0] for a in document["annotations"]) == len(boxes)


def test_detection_flip_moves_boxes_with_the_masks(coco_root):
    torch.manual_seed(0)
    dataset = CocoDetection(coco_root, "train", transforms=detection_transforms(True), with_masks=True)
    for _ in range(4):  # flips are random: every outcome must stay consistent
        _, target = dataset[1]
        for mask, box in zip(target["masks"], target["boxes"]):
            xs = torch.nonzero(mask, as_tuple=True)[1]
            assert abs(float(box[0]) - int(xs.min())) < 1e-4 and abs(float(box[2]) - int(xs.max()) - 1) < 1e-4


def test_coco_reader_names_missing_layout_and_broken_images(tmp_path, coco_root):
    with pytest.raises(DataError, match=r"instances_val2017\.json"):
        CocoDetection(coco_root, "val2017")
    broken = tmp_path / "broken"
    (broken / "annotations").mkdir(parents=True)
    (broken / "val").mkdir()
    document = json.loads((coco_root / "annotations" / "instances_val.json").read_text())
    (broken / "annotations" / "instances_val.json").write_text(json.dumps(document))
    (broken / "val" / document["images"][0]["file_name"]).write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match="cannot read image"):
        CocoDetection(broken, "val")[0]


def test_ade20k_reader_shifts_labels_and_ignores_unlabelled(ade_root):
    dataset = ADE20KSegmentation(ade_root, "training")
    assert dataset.num_classes == 4 and dataset.class_names[0] == "background"
    image, label = dataset[0]
    stored = np.array(Image.open(ade_root / "annotations" / "training" / "000001.png"))
    assert label.shape == stored.shape == tuple(image.shape[1:])
    np.testing.assert_array_equal(label.numpy(), stored.astype(np.int64) - 1)
    # Value 0 ("unlabelled" in ADE20K) becomes the ignore index.
    Image.fromarray(np.where(stored == 2, 0, stored).astype(np.uint8)).save(
        ade_root / "annotations" / "training" / "000001.png"
    )
    _, relabelled = dataset[0]
    assert (relabelled[torch.from_numpy(stored == 2)] == IGNORE_INDEX).all()


def test_ade20k_reader_refuses_labels_beyond_its_classes(ade_root, tmp_path):
    with pytest.raises(DataError, match=r"classes\.txt names 4 classes, expected 2"):
        ADE20KSegmentation(ade_root, "validation", num_classes=2)
    copy = tmp_path / "ade"
    shutil.copytree(ade_root, copy)
    (copy / "classes.txt").unlink()
    with pytest.raises(DataError, match="give the number of classes"):
        ADE20KSegmentation(copy, "validation")
    dataset = ADE20KSegmentation(copy, "validation", num_classes=2)
    with pytest.raises(DataError, match="beyond 2 classes"):
        for index in range(len(dataset)):
            dataset[index]
    with pytest.raises(DataError, match="images/testing"):
        ADE20KSegmentation(ade_root, "testing")


def test_segmentation_augmentation_keeps_image_and_labels_aligned(ade_root):
    torch.manual_seed(0)
    crop = 64
    train_set = ADE20KSegmentation(ade_root, "training", segmentation_transforms(True, crop, (0.5, 0.9)))
    images, labels = collate_segmentation([train_set[i] for i in range(4)])
    assert images.shape == (4, 3, crop, crop) and labels.shape == (4, crop, crop)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    assert (labels == IGNORE_INDEX).any()  # crops of downscaled images are padded with the ignore label
    eval_set = SegmentationEvalDataset(ADE20KSegmentation(ade_root, "validation"), short_side=32)
    image, label = eval_set[0]
    assert (
        min(image.shape[1:]) == 32 and label.shape == ADE20KSegmentation(ade_root, "validation")[0][1].shape
    )
