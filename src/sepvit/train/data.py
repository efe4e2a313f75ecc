"""Datasets (embedded digits, image folders), timm transforms and data loaders.

Digits: scikit-learn's bundled 1,797 handwritten 8×8 digits, split 80/20 stratified by class with
``random_state=0`` (1,437 train, 360 test images), drawn as dark ink on a white background and
upsampled (bicubic) to the model's input size. Nothing is downloaded. ``digits-val`` is for choosing
a recipe without looking at the test images: it leaves them out and splits the 1,437 training images
again, 80/20 stratified with ``random_state=0`` (1,149 train, 288 validation images).

Image folders: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (``validation`` also accepted),
JPEG, PNG, BMP, GIF, TIFF or WebP. Every file is opened and checked when the dataset is built;
files that cannot be read as images are skipped, counted and reported with their names. A file that
passes that check but fails to decode later (e.g. truncated) stops the run with an error naming it.

Augmentation is random per image but reproducible: the engine seeds each image's transform by
(seed, epoch, index) (:class:`sepvit.engine.data.SeededItems`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from sepvit.data_io import IMAGE_SUFFIXES, is_image_file, open_image
from sepvit.engine.data import check_image
from sepvit.errors import ConfigError, DataError
from sepvit.utils.extras import require

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS = "digits"
DIGITS_VAL = "digits-val"  # the training images split again into train and validation
DIGITS_DATA = (DIGITS, DIGITS_VAL)
VAL_FOLDER_NAMES = ("val", "validation")


@dataclass
class ImageSet:
    """Images (PIL images or file paths) with integer labels, and the files that were skipped."""

    classes: list[str]
    items: list[Any]
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def digits_split_indices(data: str = DIGITS) -> tuple[np.ndarray, np.ndarray]:
    """Indices into scikit-learn's digits of the training and evaluation images of ``data``.

    ``digits``: the fixed train/test split. ``digits-val``: the train part alone, split again the
    same way (stratified, fixed), so the test images are in neither part.
    """
    labels = require("sklearn.datasets", "train").load_digits().target
    train_test_split = require("sklearn.model_selection", "train").train_test_split
    fixed_split = dict(test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), stratify=labels, **fixed_split)
    if data == DIGITS:
        return train_idx, test_idx
    return train_test_split(train_idx, stratify=labels[train_idx], **fixed_split)


def load_digits_split(split: str, img_size: int, data: str = DIGITS) -> ImageSet:
    """The ``train`` or ``val`` split of ``data`` (``digits``: val is the test split) as RGB PIL
    images of ``img_size`` pixels."""
    digits = require("sklearn.datasets", "train").load_digits()
    train_idx, val_idx = digits_split_indices(data)
    chosen = train_idx if split == "train" else val_idx
    # Values run 0..16 with 16 the darkest ink; draw dark ink on white paper.
    pixels = (255 - np.round(digits.images[chosen] * (255 / 16))).astype(np.uint8)
    images = [
        Image.fromarray(p, mode="L").resize((img_size, img_size), Image.BICUBIC).convert("RGB")
        for p in pixels
    ]
    return ImageSet([str(d) for d in range(10)], images, digits.target[chosen].tolist())


def scan_image_folder(split_dir: Path, classes: Sequence[str] | None = None) -> ImageSet:
    """Images of ``split_dir/<class>/*``; unreadable files are skipped and listed."""
    if not split_dir.is_dir():
        what = "is not a folder" if split_dir.exists() else "does not exist"
        raise DataError(f"image folder {split_dir} {what}")
    try:
        found = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    except OSError as error:
        raise DataError(f"cannot read image folder {split_dir}: {error.strerror or error}") from error
    if not found:
        raise DataError(f"image folder {split_dir} has no class folders (expected {split_dir}/<class>/*.jpg)")
    if classes is not None and found != list(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(
            f"classes of {split_dir} differ from the training classes: "
            f"missing {missing or 'none'}, extra {extra or 'none'}"
        )
    image_set = ImageSet(found, [], [])
    for label, name in enumerate(found):
        class_dir = split_dir / name
        try:
            files = sorted(
                Path(entry.path)
                for entry in os.scandir(class_dir)
                if entry.is_file() and is_image_file(entry.name)
            )
        except OSError as error:
            raise DataError(f"cannot read class folder {class_dir}: {error.strerror or error}") from error
        readable = 0
        for path in files:
            reason = check_image(path)
            if reason is None:
                image_set.items.append(path)
                image_set.labels.append(label)
                readable += 1
            else:
                image_set.skipped.append((str(path), reason))
        if readable == 0:
            what = "no readable images" if files else f"no image files ({', '.join(IMAGE_SUFFIXES)})"
            raise DataError(f"class folder {class_dir} has {what}")
    return image_set


def find_val_dir(root: Path) -> Path:
    for name in VAL_FOLDER_NAMES:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root} has no val/ folder (expected {root}/val/<class>/*.jpg)")


def load_image_sets(data: str, img_size: int) -> tuple[ImageSet, ImageSet]:
    """Training and validation images for ``--data`` (``digits``, ``digits-val`` or a folder)."""
    if data in DIGITS_DATA:
        return load_digits_split("train", img_size, data), load_digits_split("val", img_size, data)
    root = Path(data)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data folder {root} {what} (use --data digits or a folder with train/ and val/)")
    if not (root / "train").is_dir():
        raise DataError(f"{root} has no train/ folder (expected {root}/train/<class>/*.jpg)")
    train = scan_image_folder(root / "train")
    return train, scan_image_folder(find_val_dir(root), train.classes)


class ClassificationImages(Dataset):
    """(transformed image, label) pairs of an :class:`ImageSet`."""

    def __init__(self, image_set: ImageSet, transform: Callable) -> None:
        self.image_set = image_set
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_set.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.image_set.items[index]
        image = item if isinstance(item, Image.Image) else open_image(item)
        return self.transform(image), self.image_set.labels[index]


def _common(data_config: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_size", "interpolation", "mean", "std")
    return {key: data_config[key] for key in keys}


def eval_transform(data_config: dict[str, Any]) -> Callable:
    """timm's evaluation transform: resize, centre crop of ``crop_pct``, normalise."""
    from timm.data import create_transform

    return create_transform(**_common(data_config), crop_pct=data_config["crop_pct"])


def train_transform(
    data_config: dict[str, Any], aa: str, scale: tuple[float, float], hflip: float, reprob: float
) -> Callable:
    """timm's training transform: random resized crop, flip, auto-augment, random erasing."""
    from timm.data import create_transform

    try:
        transform = create_transform(
            **_common(data_config),
            is_training=True,
            scale=tuple(scale),
            hflip=hflip,
            color_jitter=0.0,
            auto_augment=None if aa in (None, "none", "") else aa,
            re_prob=reprob,
            re_mode="pixel",
        )
    except (AssertionError, ValueError, KeyError) as error:
        raise ConfigError(f"--aa {aa!r} is not a timm auto-augment policy ({error})") from error
    for step in transform.transforms:
        # RandAugment and AugMix keep a list of ops, AutoAugment a list of sub-policies.
        ops = [*getattr(step, "ops", ()), *(op for policy in getattr(step, "policy", ()) for op in policy)]
        for op in ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, also for 0 bits kept (a black image, as Pillow used to give).

    RandAugment's increasing posterize keeps 0 bits at magnitude 10, which Pillow 12 and later
    refuse with an error; the default ``rand-m9-mstd0.5`` policy reaches magnitude 10 now and then.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def describe(image_set: ImageSet, name: str) -> str:
    """One line such as ``train: 1437 images, 10 classes`` plus skipped files, if any."""
    line = f"{name}: {len(image_set.items)} images, {len(image_set.classes)} classes"
    if image_set.skipped:
        shown = "; ".join(f"{path} ({reason})" for path, reason in image_set.skipped[:5])
        more = f" and {len(image_set.skipped) - 5} more" if len(image_set.skipped) > 5 else ""
        line += f"; skipped {len(image_set.skipped)} unreadable file(s): {shown}{more}"
    return line


def limit(image_set: ImageSet, count: int | None) -> ImageSet:
    if count is None:
        return image_set
    return ImageSet(image_set.classes, image_set.items[:count], image_set.labels[:count], image_set.skipped)
