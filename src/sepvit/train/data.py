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

Augmentation is random per image but reproducible: each image's transform draws from a generator
seeded by (seed, epoch, index), so the same images get the same augmentation whatever the number of
processes or loader workers, and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from sepvit.cli import CliError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS = "digits"
DIGITS_VAL = "digits-val"  # the training images split again into train and validation
DIGITS_DATA = (DIGITS, DIGITS_VAL)
VAL_FOLDER_NAMES = ("val", "validation")


class ImageDecodeError(RuntimeError):
    """An image that passed the initial check could not be decoded."""


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
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    if data == DIGITS:
        return train_idx, test_idx
    return train_test_split(
        train_idx,
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels[train_idx],
        random_state=DIGITS_SPLIT_SEED,
    )


def load_digits_split(split: str, img_size: int, data: str = DIGITS) -> ImageSet:
    """The ``train`` or ``val`` split of ``data`` (``digits``: val is the test split) as RGB PIL
    images of ``img_size`` pixels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_idx, val_idx = digits_split_indices(data)
    chosen = train_idx if split == "train" else val_idx
    # Values run 0..16 with 16 the darkest ink; draw dark ink on white paper.
    pixels = (255 - np.round(digits.images[chosen] * (255 / 16))).astype(np.uint8)
    images = [
        Image.fromarray(p, mode="L").resize((img_size, img_size), Image.BICUBIC).convert("RGB")
        for p in pixels
    ]
    return ImageSet([str(d) for d in range(10)], images, digits.target[chosen].tolist())


def _check_image(path: Path) -> str | None:
    """None if ``path`` opens as an image, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for a bad file
        return f"{type(error).__name__}: {error}"
    return None


def scan_image_folder(split_dir: Path, classes: Sequence[str] | None = None) -> ImageSet:
    """Images of ``split_dir/<class>/*``; unreadable files are skipped and listed."""
    if not split_dir.is_dir():
        raise CliError(f"image folder {split_dir} does not exist")
    try:
        found = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    except OSError as error:
        raise CliError(f"cannot read image folder {split_dir}: {error.strerror or error}") from error
    if not found:
        raise CliError(f"image folder {split_dir} has no class folders (expected {split_dir}/<class>/*.jpg)")
    if classes is not None and found != list(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise CliError(
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
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
            )
        except OSError as error:
            raise CliError(f"cannot read class folder {class_dir}: {error.strerror or error}") from error
        readable = 0
        for path in files:
            reason = _check_image(path)
            if reason is None:
                image_set.items.append(path)
                image_set.labels.append(label)
                readable += 1
            else:
                image_set.skipped.append((str(path), reason))
        if readable == 0:
            what = "no readable images" if files else f"no image files ({', '.join(IMAGE_EXTENSIONS)})"
            raise CliError(f"class folder {class_dir} has {what}")
    return image_set


def find_val_dir(root: Path) -> Path:
    for name in VAL_FOLDER_NAMES:
        if (root / name).is_dir():
            return root / name
    raise CliError(f"{root} has no val/ folder (expected {root}/val/<class>/*.jpg)")


def load_image_sets(data: str, img_size: int) -> tuple[ImageSet, ImageSet]:
    """Training and validation images for ``--data`` (``digits``, ``digits-val`` or a folder)."""
    if data in DIGITS_DATA:
        return load_digits_split("train", img_size, data), load_digits_split("val", img_size, data)
    root = Path(data)
    if not root.exists():
        raise CliError(
            f"data folder {root} does not exist (use --data digits or a folder with train/ and val/)"
        )
    if not (root / "train").is_dir():
        raise CliError(f"{root} has no train/ folder (expected {root}/train/<class>/*.jpg)")
    train = scan_image_folder(root / "train")
    return train, scan_image_folder(find_val_dir(root), train.classes)


def open_image(item: Any) -> Image.Image:
    """An RGB PIL image from a PIL image or a path; a decoding failure names the file."""
    if isinstance(item, Image.Image):
        return item
    try:
        with Image.open(item) as image:
            return image.convert("RGB")
    except Exception as error:
        raise ImageDecodeError(f"cannot decode image {item}: {error}") from error


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators, restoring them afterwards."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


class TransformedImages(Dataset):
    """An :class:`ImageSet` with a transform seeded per (seed, epoch, index)."""

    def __init__(self, image_set: ImageSet, transform: Callable, seed: int = 0) -> None:
        self.image_set = image_set
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.image_set.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = open_image(self.image_set.items[index])
        with seeded_rng(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF):
            tensor = self.transform(image)
        return tensor, self.image_set.labels[index]


class ShardedSampler(Sampler[int]):
    """This process's share of a (shuffled) epoch, optionally starting part-way through.

    Training: every process permutes all indices with the same (seed, epoch) generator and takes
    every ``world_size``-th from ``rank``; the permutation is truncated to a multiple of the global
    batch so all processes run the same number of steps. Evaluation (``shuffle=False``): indices in
    order, strided, nothing dropped or repeated.
    """

    def __init__(
        self, size: int, rank: int, world_size: int, shuffle: bool, seed: int = 0, global_batch: int = 1
    ) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.global_batch = shuffle, seed, global_batch
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip_batches * (self.global_batch // self.world_size)

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world_size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order = order[: self.size // self.global_batch * self.global_batch]
        return order[self.rank :: self.world_size][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def build_transforms(config: dict[str, Any], data_config: dict[str, Any], training: bool) -> Callable:
    """timm's train (RandAugment, random erasing, ...) or eval transform for this configuration."""
    from timm.data import create_transform

    common = dict(
        input_size=data_config["input_size"],
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
    )
    if not training:
        return create_transform(**common, crop_pct=data_config["crop_pct"])
    aa = config["aa"]
    transform = create_transform(
        **common,
        is_training=True,
        scale=tuple(config["scale"]),
        hflip=config["hflip"],
        color_jitter=0.0,
        auto_augment=None if aa in (None, "none", "") else aa,
        re_prob=config["reprob"],
        re_mode="pixel",
    )
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


def make_loader(
    dataset: Dataset,
    sampler: ShardedSampler,
    batch_size: int,
    workers: int,
    drop_last: bool,
    pin_memory: bool,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        # A private generator: creating an iterator must not draw from the global RNG, or a resumed
        # run (which creates one more) would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


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
