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

Shards (``wds:DIR``, a brace pattern such as ``shards/train-{000000..000127}.tar``, or a folder with
``_info.json``): WebDataset tar files whose samples hold an image (``.jpg``, ``.png``, ...) and its
label (``.cls``), as ``sepvit data pack`` writes them from an image folder; read as streams
(:mod:`sepvit.engine.shards`). Hugging Face datasets (``hfds:NAME`` from the local cache, or a
``save_to_disk`` folder): the ``train`` split and ``validation`` (or ``val``, ``test``), the first
``Image`` column and the first ``ClassLabel`` column.

Augmentation is random per image but reproducible: the engine seeds each image's transform by
(seed, epoch, index) (:class:`sepvit.engine.data.SeededItems`), shard streams by (seed, epoch, key).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from sepvit.data_io import IMAGE_SUFFIXES, is_image_file, open_image
from sepvit.engine.data import check_image
from sepvit.engine.shards import (
    INFO_FILE,
    WDS_PREFIX,
    ShardSet,
    ShardStream,
    check_new_shard_folder,
    is_shard_spec,
    open_shards,
    read_info,
    read_samples,
    sample_bytes,
    write_shards,
)
from sepvit.errors import ConfigError, DataError
from sepvit.utils.extras import require

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS = "digits"
DIGITS_VAL = "digits-val"  # the training images split again into train and validation
DIGITS_DATA = (DIGITS, DIGITS_VAL)
VAL_FOLDER_NAMES = ("val", "validation")
# Where a shard's sample keeps its image: webdataset's extensions of the formats open_image reads.
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


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
    """Images of ``split_dir/<class>/*``; unreadable files (broken links too) are skipped and listed.
    Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``) are neither classes nor images."""
    if not split_dir.is_dir():
        what = "is not a folder" if split_dir.exists() else "does not exist"
        raise DataError(f"image folder {split_dir} {what}")
    try:
        found = sorted(entry.name for entry in _visible(split_dir) if entry.is_dir())
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
            entries = [entry for entry in _visible(class_dir) if is_image_file(entry.name)]
        except OSError as error:
            raise DataError(f"cannot read class folder {class_dir}: {error.strerror or error}") from error
        files = sorted(Path(entry.path) for entry in entries if entry.is_file())
        image_set.skipped += [(entry.path, "broken link") for entry in entries if _broken_link(entry)]
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


def _visible(folder: Path) -> list[os.DirEntry]:
    return [entry for entry in os.scandir(folder) if not entry.name.startswith(".")]


def _broken_link(entry: os.DirEntry) -> bool:
    return entry.is_symlink() and not os.path.exists(entry.path)


def find_val_dir(root: Path) -> Path:
    for name in VAL_FOLDER_NAMES:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root} has no val/ folder (expected {root}/val/<class>/*.jpg)")


def load_image_sets(data: str, img_size: int) -> tuple[ImageSet, ImageSet]:
    """Training and validation images for ``--data`` (``digits``, ``digits-val``, a Hugging Face
    dataset or a folder)."""
    if data in DIGITS_DATA:
        return load_digits_split("train", img_size, data), load_digits_split("val", img_size, data)
    if is_hf_spec(data):
        return load_hf_sets(data)
    root = Path(data)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data folder {root} {what} (use --data digits or a folder with train/ and val/)")
    return scan_image_folders(root)


def scan_image_folders(root: Path) -> tuple[ImageSet, ImageSet]:
    """The train and val images of an image folder, each split read by :func:`scan_image_folder`;
    a single class is refused (every prediction would be right, so accuracy would say nothing)."""
    if not (root / "train").is_dir():
        raise DataError(f"{root} has no train/ folder (expected {root}/train/<class>/*.jpg)")
    train = scan_image_folder(root / "train")
    val = scan_image_folder(find_val_dir(root), train.classes)
    if len(train.classes) < 2:
        raise DataError(
            f"{root / 'train'} has one class folder ({train.classes[0]}); a classifier needs at least two"
        )
    return train, val


def load_classification_data(
    data: str, val_data: str | None, img_size: int
) -> tuple[ImageSet | ShardSet, ImageSet | ShardSet]:
    """Training and validation data for ``--data`` and ``--val-data``: image sets, or shards
    (:func:`sepvit.engine.shards.open_shards`) read as streams."""
    if not is_shard_spec(data):
        if val_data is not None:
            raise ConfigError(
                "--val-data is for shards; image folders and datasets bring their own val split"
            )
        return load_image_sets(data, img_size)
    train = open_shards(data, "train")
    if val_data is not None:
        val = open_shards(val_data, "val")
    else:
        folder = data.removeprefix(WDS_PREFIX)
        folder = folder if Path(folder).is_dir() else str(Path(train.urls[0]).parent)
        if read_info(folder) is None:
            raise DataError(
                f"--data {data}: no {INFO_FILE} beside the shards names a val split; give --val-data"
            )
        val = open_shards(folder, "val")
    classes = train.classes or shard_classes(train)
    return replace(train, classes=classes), replace(val, classes=val.classes or classes)


def shard_classes(shards: ShardSet) -> tuple[str, ...]:
    """Class names ``0..max`` from the ``.cls`` entries, for shards whose info file names none."""
    labels = {
        shard_label(sample, f"{sample['__url__']}/{sample['__key__']}")
        for url in shards.urls
        for sample in read_samples(url, select=lambda name: name.endswith(".cls"))
    }
    return tuple(str(label) for label in range(max(labels, default=-1) + 1))


def shard_label(sample: dict[str, Any], name: str, num_classes: int | None = None) -> int:
    """A shard sample's ``.cls`` label: a whole number from 0 (below ``num_classes``, when known)."""
    if "cls" not in sample:
        raise DataError(f"sample {name} has no .cls label")
    text = bytes(sample["cls"]).decode("utf-8", "replace").strip()
    if not text.isdigit() or not text.isascii():
        raise DataError(f"sample {name} has the label {text[:20]!r}; a .cls label is a class index from 0")
    label = int(text)
    if num_classes is not None and label >= num_classes:
        raise DataError(f"sample {name} has the label {label}, but the shards have {num_classes} classes")
    return label


class ClassifySample:
    """A shard's sample (image bytes under any image extension, label as ``.cls`` text) transformed;
    labels are checked against ``num_classes`` when it is known."""

    def __init__(self, transform: Callable, num_classes: int | None = None) -> None:
        self.transform = transform
        self.num_classes = num_classes

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        extension, data = sample_bytes(sample, SHARD_IMAGE_EXTENSIONS)
        name = f"{sample['__url__']}/{sample['__key__']}.{extension}"
        label = shard_label(sample, name, self.num_classes)
        return self.transform(open_image(io.BytesIO(data), name)), label


def image_folder_samples(image_set: ImageSet) -> Iterator[dict[str, Any]]:
    """The images of a scanned folder as shard samples: the file's bytes, unchanged, under its own
    extension (``jpg`` for ``.jpeg``), the label as ``.cls`` and the file's path relative to the
    split folder in ``.json``."""
    for index, (path, label) in enumerate(zip(image_set.items, image_set.labels)):
        extension = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        relative = f"{path.parent.name}/{path.name}"
        yield {
            "__key__": f"{index:08d}",
            extension: path.read_bytes(),
            "cls": str(label).encode(),
            "json": json.dumps({"path": relative}).encode(),
        }


def pack_image_folder(root: Path, out: Path, shard_size: int) -> tuple[dict[str, Any], list[ImageSet]]:
    """``root/train`` (in an order shuffled with seed :data:`PACK_SEED`) and ``root/val`` (or
    ``validation``, in order) as shards in ``out`` with ``_info.json``."""
    check_new_shard_folder(out)  # before reading every image
    if not root.is_dir():
        raise DataError(f"image folder {root} {'is not a folder' if root.exists() else 'does not exist'}")
    train, val = scan_image_folders(root)
    # Shuffled once, so that each shard holds every class: streams shuffle only within a buffer.
    order = np.random.default_rng(PACK_SEED).permutation(len(train.items))
    shuffled = ImageSet(train.classes, [train.items[i] for i in order], [train.labels[i] for i in order])
    sets = {"train": shuffled, "val": val}
    info = write_shards(
        {split: image_folder_samples(images) for split, images in sets.items()},
        out,
        shard_size,
        {"classes": train.classes},
    )
    return info, [train, sets["val"]]


PACK_SEED = 0
HF_PREFIX = "hfds:"
HF_VAL_SPLITS = ("validation", "val", "test")


def is_hf_spec(data: str) -> bool:
    """``hfds:NAME`` (a Hugging Face dataset by name, from its cache) or a ``save_to_disk`` folder."""
    return data.startswith(HF_PREFIX) or (Path(data) / "dataset_dict.json").is_file()


def load_hf_sets(data: str) -> tuple[ImageSet, ImageSet]:
    """The train and validation splits of a Hugging Face image-classification dataset: its first
    ``Image`` column and its first ``ClassLabel`` column (whose names are the classes)."""
    datasets = require("datasets", "cluster")
    try:
        if data.startswith(HF_PREFIX):
            splits = datasets.load_dataset(data.removeprefix(HF_PREFIX))
        else:
            splits = datasets.load_from_disk(data)
    except Exception as error:  # datasets raises many types for a missing or foreign dataset
        raise DataError(f"cannot load dataset {data}: {' '.join(str(error).split())}") from error
    if "train" not in splits:
        raise DataError(f"dataset {data} has no 'train' split (it has {', '.join(splits)})")
    val_split = next((name for name in HF_VAL_SPLITS if name in splits), None)
    if val_split is None:
        raise DataError(f"dataset {data} has none of the splits {', '.join(HF_VAL_SPLITS)}")
    features = splits["train"].features
    image_column = next((k for k, v in features.items() if isinstance(v, datasets.Image)), None)
    label_column = next((k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None)
    if image_column is None or label_column is None:
        raise DataError(f"dataset {data} needs an Image and a ClassLabel column (it has {dict(features)})")
    classes = list(features[label_column].names)
    return tuple(
        ImageSet(classes, HFImages(splits[name], image_column, f"{data}[{name}]"), splits[name][label_column])
        for name in ("train", val_split)
    )


class HFImages(Sequence):
    """The images of a Hugging Face dataset's column, decoded like image files (:func:`open_image`)."""

    def __init__(self, dataset: Any, column: str, name: str) -> None:
        self.dataset = dataset.cast_column(column, require("datasets", "cluster").Image(decode=False))
        self.column, self.name = column, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return HFImages(self.dataset.select(range(len(self))[index]), self.column, self.name)
        stored = self.dataset[index][self.column]
        where = f"{self.name} image {index}"
        return open_image(io.BytesIO(stored["bytes"]) if stored.get("bytes") else stored["path"], where)


def evaluation_images(val_set: ImageSet | ShardSet, transform: Callable) -> Dataset:
    """Transformed (image, label) pairs of a validation set: a stream for shards."""
    if isinstance(val_set, ShardSet):
        return ShardStream(val_set, ClassifySample(transform, val_set.num_classes), train=False)
    return ClassificationImages(val_set, transform)


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
    data_config: dict[str, Any],
    aa: str,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    reprob: float,
) -> Callable:
    """timm's training transform: random resized crop, flip, auto-augment, random erasing."""
    from timm.data import create_transform

    try:
        transform = create_transform(
            **_common(data_config),
            is_training=True,
            scale=tuple(scale),
            ratio=tuple(ratio),
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


def check_classes(data: str, found: Sequence[str], expected: Sequence[str], whose: str) -> None:
    """Refuse data whose classes are not the model's (``whose``: "checkpoint's", "model's")."""
    if list(found) != list(expected):
        raise ConfigError(
            f"the classes of {data} ({len(found)}) differ from the {whose} ({len(expected)}): "
            f"{list(found)[:10]} vs {list(expected)[:10]}"
        )


def describe(image_set: ImageSet | ShardSet, name: str) -> str:
    """One line such as ``train: 1437 images, 10 classes`` plus skipped files, if any."""
    if isinstance(image_set, ShardSet):
        shards = f"{len(image_set.urls)} shards"
        return f"{name}: {len(image_set)} images in {shards}, {len(image_set.classes)} classes"
    line = f"{name}: {len(image_set.items)} images, {len(image_set.classes)} classes"
    if image_set.skipped:
        shown = "; ".join(f"{path} ({reason})" for path, reason in image_set.skipped[:5])
        more = f" and {len(image_set.skipped) - 5} more" if len(image_set.skipped) > 5 else ""
        line += f"; skipped {len(image_set.skipped)} unreadable file(s): {shown}{more}"
    return line


def limit(image_set: ImageSet | ShardSet, count: int | None) -> ImageSet | ShardSet:
    if count is None:
        return image_set
    if isinstance(image_set, ShardSet):
        return image_set.first(count)
    return ImageSet(image_set.classes, image_set.items[:count], image_set.labels[:count], image_set.skipped)
