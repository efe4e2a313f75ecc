"""Classification tasks for the ablation study, generated from scikit-learn's handwritten digits.

``pair-sum``: two digits at random, far-apart places of a cluttered canvas; the label is their sum
mod 10. Neither digit alone says anything about the label (for each digit, every label is equally
likely over the other), so a model must bring together content of two regions that never share a
first-stage window: the local-global interaction SepViT's PSA and GSA exist for.

``single``: the control. One digit on the same kind of canvas; the label is that digit. Every
variant should do about equally well on it.

Canvases are grayscale (dark ink on white, like the demo's digits). Digits are upsampled ``scale``
times (8×8 -> 16×16 at the default, one first-stage window of a 128-px model with stride-4 patches
and 4×4 windows). The clutter is fragments (2×2-pixel corners of other digits, upsampled alike) at
half the ink, plus noise, so the real digits stay recognisable but a model must look for them.

The digit images are split first (test digits never appear in training canvases), then each split's
canvases are drawn from a generator seeded by (seed, split): the same arguments give the same data
on every machine.
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
    """What a task's canvases look like; the defaults give 128-px canvases of 16-px digits."""

    task: TaskName = "pair-sum"
    canvas: int = 128
    scale: int = 2
    clutter: int = 12
    min_distance: float = 64.0  # between the two digits' centres, in pixels
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.canvas < 2 * self.digit_size:
            raise ValueError(f"canvas {self.canvas} px is too small for two {self.digit_size}-px digits")
        if self.clutter < 0 or self.scale < 1 or self.min_distance < 0:
            raise ValueError("clutter, scale and min_distance must be non-negative (scale at least 1)")
        if self.min_distance > (self.canvas - self.digit_size) * 2**0.5:
            raise ValueError(f"no two places of a {self.canvas}-px canvas are {self.min_distance} px apart")

    @property
    def digit_size(self) -> int:
        return DIGIT_PIXELS * self.scale


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


def _place_digits(rng: np.random.Generator, spec: TaskSpec, count: int) -> np.ndarray:
    """Top-left corners (count, 2) of ``count`` digits, pairwise at least ``min_distance`` apart."""
    limit = spec.canvas - spec.digit_size + 1
    while True:  # rejection sampling; __post_init__ guarantees that a valid placement exists
        corners = rng.integers(0, limit, size=(count, 2))
        if count < 2 or np.hypot(*(corners[0] - corners[1])) >= spec.min_distance:
            return corners


def _label(task: TaskName, classes: np.ndarray) -> int:
    return int(classes.sum() % 10) if task == "pair-sum" else int(classes[0])


def generate_split(spec: TaskSpec, split: str, size: int) -> TaskSplit:
    """``size`` canvases of ``split`` ("train", "val" or "test"), deterministic in ``spec.seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    ink, classes = digit_pools(spec.seed)[split]
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), TASKS.index(spec.task)])
    num_digits = 2 if spec.task == "pair-sum" else 1
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
        picks = rng.integers(len(ink), size=num_digits)
        for slot, ((top, left), pick) in enumerate(zip(_place_digits(rng, spec, num_digits), picks)):
            region = canvas[top : top + spec.digit_size, left : left + spec.digit_size]
            np.maximum(region, _upsample(ink[pick], spec.scale), out=region)
            centres[n, slot] = (top + spec.digit_size // 2, left + spec.digit_size // 2)
        drawn[n, :num_digits] = classes[picks]
        labels[n] = _label(spec.task, classes[picks])
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
        for label in range(10):
            (partial / split / str(label)).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(data.images, data.labels)):
            Image.fromarray(image, mode="L").save(partial / split / str(label) / f"{index:05d}.png")
    partial.rename(root)
    return root
