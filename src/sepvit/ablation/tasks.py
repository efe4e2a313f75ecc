"""Classification tasks for the ablation study, generated from scikit-learn's handwritten digits.

``pair-sum``: two digits, one in each half of a cluttered canvas; the label is their sum (0-18, 19
classes). One digit alone gives at best one chance in ten of the label (every sum with it is equally
likely), so a model must bring together two regions that share no window in stages 1-3 of the
study's models: the local-global interaction SepViT's PSA and GSA exist for. The sum, unlike the sum
mod 10, grows with each digit, so recognising either digit already lowers the loss: small models learn
it in minutes, where the sum mod 10 (like any parity) gives no signal until both digits are known.

``single``: the control. One digit in one of the two halves (chosen at random); the label is that
digit. Every variant should do about equally well on it.

Canvases are grayscale (dark ink on white, like the demo's digits). Digits are upsampled ``scale``
times (8×8 -> 24×24 at the default, three first-stage windows wide on a 64-px canvas with stride-4
patches and 2×2 windows). Each digit sits in its half of the canvas, moved at random by up to
``jitter`` pixels up or down and as far sideways as the half allows, never across the middle: so
the two digits share no window until the last stage, whose single window is global. The clutter is
fragments (2×2-pixel corners of other digits, upsampled alike) at half the ink, plus noise.

The digit images are split first (test digits never appear in training canvases), then each split's
canvases are drawn from a generator seeded by (seed, split, task): the same arguments give the same
data on every machine.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sepvit.utils.extras import require

TaskName = Literal["pair-sum", "single"]
TASKS: tuple[str, ...] = ("pair-sum", "single")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
DIGIT_PIXELS = 8
CLUTTER_INK = 0.5
NOISE_STD = 0.05


@dataclass(frozen=True)
class TaskSpec:
    """What a task's canvases look like; the defaults give 64-px canvases of 24-px digits."""

    task: TaskName = "pair-sum"
    canvas: int = 64
    scale: int = 3
    clutter: int = 6
    jitter: int = 8  # largest move of a digit up or down from the middle row, in pixels
    single_share: float = 1 / 3  # pair-sum training canvases that hold one digit (its sum is itself)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.clutter < 0 or self.scale < 1 or self.jitter < 0:
            raise ValueError("clutter, scale and jitter must be non-negative (scale at least 1)")
        if not 0 <= self.single_share < 1:
            raise ValueError(f"single_share must lie in [0, 1), got {self.single_share}")
        if self.canvas < 2 * self.digit_size:
            raise ValueError(
                f"canvas {self.canvas} px is too small for two {self.digit_size}-px digits side by side"
            )
        if self.jitter > (self.canvas - self.digit_size) // 2:
            raise ValueError(
                f"a jitter of {self.jitter} px moves {self.digit_size}-px digits "
                f"off a {self.canvas}-px canvas"
            )

    @property
    def digit_size(self) -> int:
        return DIGIT_PIXELS * self.scale

    @property
    def num_classes(self) -> int:
        return 19 if self.task == "pair-sum" else 10


@dataclass(frozen=True)
class TaskSplit:
    """One split: ``images`` (N, canvas, canvas) uint8, ``labels`` (N,), the digits drawn and where."""

    images: np.ndarray
    labels: np.ndarray
    digits: np.ndarray  # (N, 2) digit classes; -1 where a single-digit canvas has no second digit
    centres: np.ndarray  # (N, 2, 2) (row, col) centre of each digit; -1 where absent


def digit_pools(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The bundled digits split into train/val/test pools, stratified: (ink in [0, 1], classes)."""
    datasets = require("sklearn.datasets", extra="train")
    train_test_split = require("sklearn.model_selection", extra="train").train_test_split

    digits = datasets.load_digits()
    ink = digits.images.astype(np.float32) / 16.0
    indices = np.arange(len(digits.target))
    rest, test = train_test_split(
        indices, test_size=SPLIT_FRACTIONS["test"], stratify=digits.target, random_state=seed
    )
    val_share = SPLIT_FRACTIONS["val"] / (1 - SPLIT_FRACTIONS["test"])
    train, val = train_test_split(rest, test_size=val_share, stratify=digits.target[rest], random_state=seed)
    return {
        name: (ink[idx], digits.target[idx]) for name, idx in (("train", train), ("val", val), ("test", test))
    }


def _upsample(ink: np.ndarray, scale: int) -> np.ndarray:
    return np.kron(ink, np.ones((scale, scale), dtype=ink.dtype))


def _place_digit(rng: np.random.Generator, spec: TaskSpec, half: int) -> tuple[int, int]:
    """Top-left corner of a digit in the left (``half`` 0) or right (1) half of the canvas."""
    middle = (spec.canvas - spec.digit_size) // 2
    top = middle + int(rng.integers(-spec.jitter, spec.jitter + 1))
    left = half * spec.canvas // 2 + int(rng.integers(0, spec.canvas // 2 - spec.digit_size + 1))
    return top, left


def _picks_for_label(rng: np.random.Generator, classes: np.ndarray, label: int, count: int) -> np.ndarray:
    """Indices of ``count`` digit images whose classes sum to ``label`` (the first digit's class
    drawn uniformly among those that allow it)."""
    first = int(rng.integers(max(0, label - 9 * (count - 1)), min(9, label) + 1))
    wanted = (first, label - first)[:count]
    return np.array([rng.choice(np.flatnonzero(classes == digit)) for digit in wanted])


def generate_split(spec: TaskSpec, split: str, size: int) -> TaskSplit:
    """``size`` canvases of ``split`` ("train", "val" or "test"), deterministic in ``spec.seed``; the
    first ``spec.num_classes`` canvases have labels 0, 1, ..., the rest are drawn freely."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if size < spec.num_classes:
        raise ValueError(
            f"a {split} split of {spec.task} needs at least {spec.num_classes} images, got {size}"
        )
    ink, classes = digit_pools(spec.seed)[split]
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), TASKS.index(spec.task)])
    fragment = 2 * spec.scale
    images = np.empty((size, spec.canvas, spec.canvas), dtype=np.uint8)
    labels = np.empty(size, dtype=np.int64)
    drawn = np.full((size, 2), -1, dtype=np.int64)
    centres = np.full((size, 2, 2), -1, dtype=np.int64)
    for n in range(size):
        canvas = np.zeros((spec.canvas, spec.canvas), dtype=np.float32)
        for _ in range(spec.clutter):
            source = _upsample(ink[rng.integers(len(ink))], spec.scale)
            row, col = rng.integers(0, spec.digit_size - fragment + 1, size=2)
            top, left = rng.integers(0, spec.canvas - fragment + 1, size=2)
            patch = source[row : row + fragment, col : col + fragment] * CLUTTER_INK
            region = canvas[top : top + fragment, left : left + fragment]
            np.maximum(region, patch, out=region)
        one_digit = spec.task == "single" or (
            split == "train" and n >= spec.num_classes and rng.random() < spec.single_share
        )
        halves = (int(rng.integers(2)),) if one_digit else (0, 1)
        if n < spec.num_classes:  # every class at least once, so that every split has every class
            picks = _picks_for_label(rng, classes, n, len(halves))
        else:
            picks = rng.integers(len(ink), size=len(halves))
        for slot, (half, pick) in enumerate(zip(halves, picks)):
            top, left = _place_digit(rng, spec, half)
            region = canvas[top : top + spec.digit_size, left : left + spec.digit_size]
            np.maximum(region, _upsample(ink[pick], spec.scale), out=region)
            centres[n, slot] = (top + spec.digit_size // 2, left + spec.digit_size // 2)
        drawn[n, : len(halves)] = classes[picks]
        labels[n] = int(classes[picks].sum())
        canvas += rng.normal(0.0, NOISE_STD, size=canvas.shape).astype(np.float32)
        images[n] = np.round(255 * (1 - canvas.clip(0, 1))).astype(np.uint8)
    return TaskSplit(images, labels, drawn, centres)


def write_image_folder(spec: TaskSpec, sizes: dict[str, int], root: str | Path) -> Path:
    """Write the task as ``root/{train,val,test}/<label>/<index>.png``, the layout ``sepvit train`` reads.

    The folder appears whole or not at all: it is written beside ``root`` and renamed into place.
    An existing ``root`` is left as it is (its data came from the same spec, or the caller chose it).
    """
    from PIL import Image

    root = Path(root)
    if root.exists():
        return root
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, size in sizes.items():
        data = generate_split(spec, split, size)
        for label in range(spec.num_classes):
            (partial / split / str(label)).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(data.images, data.labels)):
            Image.fromarray(image, mode="L").save(partial / split / str(label) / f"{index:05d}.png")
    partial.rename(root)
    return root
