"""Dataset readers (COCO instances, ADE20K scene parsing), augmentations and batching."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from sepvit.data_io import is_image_file, open_image
from sepvit.errors import DataError
from sepvit.utils.extras import require

IGNORE_INDEX = 255


class CocoDetection(Dataset):
    """COCO-format instances: ``<root>/annotations/instances_<split>.json`` and images in ``<root>/<split>/``.

    Returns ``(image, target)``: a float image in [0, 1] (3, H, W) and a torchvision detection
    target (``boxes`` XYXY in pixels, ``labels`` in 1..num_classes, ``masks`` (N, H, W) when
    ``with_masks``, ``image_id``). Crowd regions are left out of training targets, as usual.
    Category ids are mapped to contiguous labels in sorted id order; ``category_ids[label - 1]``
    maps back.
    """

    def __init__(self, root: str | Path, split: str, transforms=None, with_masks: bool = False):
        COCO = require("pycocotools.coco", "dense").COCO

        self.root = Path(root)
        annotation_file = self.root / "annotations" / f"instances_{split}.json"
        self.image_dir = self.root / split
        if not annotation_file.is_file() or not self.image_dir.is_dir():
            raise DataError(
                f"{self.root} is not a COCO-format dataset for split {split!r}: expected "
                f"annotations/instances_{split}.json and the folder {split}/"
            )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(annotation_file))
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"cannot parse {annotation_file}: {error}") from error
        self.image_ids = sorted(self.coco.getImgIds())
        self.category_ids = sorted(self.coco.getCatIds())
        if not self.image_ids or not self.category_ids:
            raise DataError(f"{annotation_file} lists no images or no categories")
        used = {a.get("category_id") for a in self.coco.dataset.get("annotations", [])}
        unknown = sorted(used - set(self.category_ids), key=str)
        if unknown:
            raise DataError(
                f"{annotation_file}: annotations use category_id {', '.join(map(repr, unknown[:5]))}, "
                "which the categories list does not define"
            )
        self.label_of_category = {category: i + 1 for i, category in enumerate(self.category_ids)}
        self.class_names = [self.coco.cats[category]["name"] for category in self.category_ids]
        self.transforms = transforms
        self.with_masks = with_masks

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        image = open_image(self.image_path(index))
        width, height = image.size
        annotations = [
            a
            for a in self.coco.imgToAnns[image_id]
            if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
        ]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor(
                [self.label_of_category[a["category_id"]] for a in annotations], dtype=torch.int64
            ),
            "image_id": image_id,
        }
        if self.with_masks:
            masks = [self.coco.annToMask(a) for a in annotations]
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
            if stacked.shape[1:] != (height, width):
                raise DataError(f"masks of image {image_id} do not match its size {height}x{width}")
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))
        pixels = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        if self.transforms is not None:
            pixels, target = self.transforms(pixels, target)
        return v2.functional.to_dtype(pixels, torch.float32, scale=True), target


class ADE20KSegmentation(Dataset):
    """ADE20K-format scene parsing: ``<root>/images/<split>/*.jpg`` and ``<root>/annotations/<split>/*.png``.

    Label PNGs hold class ``k`` as ``k + 1`` and 0 for "unlabelled" (``reduce_zero_label``, the
    ADE20K convention, maps 0 to the ignore index 255 and shifts the rest down). Class names come
    from ``<root>/classes.txt`` when present. Returns a float image in [0, 1] (3, H, W) and an
    int64 label map (H, W).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transforms=None,
        num_classes: int | None = None,
        reduce_zero_label: bool = True,
    ):
        self.root = Path(root)
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise DataError(
                f"{self.root} is not an ADE20K-format dataset for split {split!r}: expected "
                f"images/{split}/ and annotations/{split}/"
            )
        self.images = sorted(p for p in image_dir.iterdir() if is_image_file(p))
        if not self.images:
            raise DataError(f"no images in {image_dir}")
        self.labels = [label_dir / f"{p.stem}.png" for p in self.images]
        missing = [p.name for p in self.labels if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} label PNGs missing in {label_dir}, e.g. {missing[0]}")
        classes_file = self.root / "classes.txt"
        names = classes_file.read_text().split("\n") if classes_file.is_file() else []
        self.class_names = [name.strip() for name in names if name.strip()]
        if num_classes is None:
            if not self.class_names:
                raise DataError(f"{self.root} has no classes.txt: give the number of classes")
            num_classes = len(self.class_names)
        if self.class_names and len(self.class_names) != num_classes:
            raise DataError(f"classes.txt names {len(self.class_names)} classes, expected {num_classes}")
        self.class_names = self.class_names or [str(i) for i in range(num_classes)]
        self.num_classes = num_classes
        self.transforms = transforms
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.images)

    def read_label(self, index: int) -> torch.Tensor:
        path = self.labels[index]
        try:
            with Image.open(path) as file:
                label = torch.from_numpy(np.array(file, dtype=np.int64))
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"cannot read label map {path}: {error}") from error
        if label.ndim != 2:
            raise DataError(f"label map {path} has {label.ndim} dimensions, expected a single channel")
        if self.reduce_zero_label:
            label = torch.where(label == 0, IGNORE_INDEX, label - 1)
        valid = label[label != IGNORE_INDEX]
        if valid.numel() and int(valid.max()) >= self.num_classes:
            raise DataError(
                f"label map {path} holds class {int(valid.max())}, beyond {self.num_classes} classes"
            )
        return label

    def __getitem__(self, index: int):
        image = open_image(self.images[index])
        label = self.read_label(index)
        if label.shape != (image.height, image.width):
            raise DataError(
                f"{self.labels[index]} is {tuple(label.shape)}, its image {image.height}x{image.width}"
            )
        pixels = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        mask = tv_tensors.Mask(label)
        if self.transforms is not None:
            pixels, mask = self.transforms(pixels, mask)
        return v2.functional.to_dtype(pixels, torch.float32, scale=True), mask.as_subclass(torch.Tensor)


def detection_transforms(train: bool) -> v2.Compose | None:
    """Flip (and mild colour jitter) for training; resizing is the detector's own (min/max size)."""
    if not train:
        return None
    return v2.Compose(
        [v2.RandomHorizontalFlip(0.5), v2.ColorJitter(0.2, 0.2, 0.2), v2.SanitizeBoundingBoxes()]
    )


def segmentation_transforms(
    train: bool, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0)
) -> v2.Compose:
    """mmseg's ADE20K pipeline: random rescale of the shorter side around ``crop_size``, random
    crop (padded with the ignore label), flip, photometric jitter. Evaluation resizes the shorter
    side to ``crop_size``; labels stay at full resolution (see ``SegmentationEvalDataset``)."""
    if not train:
        return v2.Compose([v2.Resize(crop_size)])
    low, high = (max(1, round(crop_size * s)) for s in scale_range)
    return v2.Compose(
        [
            v2.RandomResize(low, high + 1),
            v2.RandomCrop(
                crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
            ),
            v2.RandomHorizontalFlip(0.5),
            v2.ColorJitter(0.25, 0.25, 0.25, 0.05),
        ]
    )


class SegmentationEvalDataset(Dataset):
    """Wraps a segmentation dataset for evaluation: resized image, label map at its original size."""

    def __init__(self, dataset: ADE20KSegmentation, short_side: int):
        self.dataset = dataset
        self.resize = v2.Resize(short_side)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image = open_image(self.dataset.images[index])
        pixels = self.resize(tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1)))
        return v2.functional.to_dtype(pixels, torch.float32, scale=True), self.dataset.read_label(index)


def collate_detection(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


def pad_to_batch(
    images: list[torch.Tensor], labels: list[torch.Tensor] | None = None, size_divisor: int = 32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack images of different sizes into one zero-padded batch (labels padded with the ignore index)."""
    height = math.ceil(max(i.shape[-2] for i in images) / size_divisor) * size_divisor
    width = math.ceil(max(i.shape[-1] for i in images) / size_divisor) * size_divisor

    def pad(tensor: torch.Tensor, value: float) -> torch.Tensor:
        return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]), value=value)

    batch = torch.stack([pad(i, 0.0) for i in images])
    if labels is None:
        return batch, None
    return batch, torch.stack([pad(label, IGNORE_INDEX) for label in labels])


def collate_segmentation(batch):
    images, labels = zip(*batch)
    return pad_to_batch(list(images), list(labels))
