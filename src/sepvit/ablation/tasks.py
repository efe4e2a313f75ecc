"""Classification tasks for the ablation study, drawn from scikit-learn's handwritten digits.

The canvas is a strip of three regions side by side (32 × 192 px at the default, 32 × 64 px each): a
digit in the left region, a cue in the middle one, a digit in the right one. With stride-4 patches
and 2 × 2-token windows each region is exactly one window of the last stage (stride 32: 64 px wide),
so there the three regions share no window (docs/ablations.md gives every stage's grid).

``cue``: the label is the digit the cue points at. The cue is a bar: horizontal reads the left digit,
vertical the right one. Neither digit alone nor the cue alone says anything about the label, and
they must be combined non-additively: see :func:`pooled_evidence_ceiling`.

``single``: the control. One digit in the left or the right region (chosen at random), no cue; the
label is that digit. A model that cannot learn this cannot be judged on ``cue``.

Canvases are grayscale (dark ink on white, as the demo's digits) with a little noise. Digits are
upsampled ``scale`` times (8 × 8 -> 24 × 24 px at the default) and moved at random inside their
region, never across its border. The digit images are split first (test digits never appear in
training canvases); each split's canvases come from a generator seeded by (seed, split, task), so
the same arguments give the same data on every machine.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sepvit.utils.extras import require

TaskName = Literal["cue", "single"]
TASKS: tuple[str, ...] = ("cue", "single")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
DIGIT_PIXELS = 8
NUM_CLASSES = 10
NOISE_STD = 0.05
CUE_LEFT, CUE_RIGHT = 0, 1  # horizontal bar: read the left digit; vertical bar: the right one


@dataclass(frozen=True)
class TaskSpec:
    """What a task's canvases look like: three ``height`` × ``region`` regions side by side."""

    task: TaskName = "cue"
    height: int = 32
    region: int = 64
    scale: int = 3
    cue_length: int = 16
    cue_width: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.scale < 1 or self.cue_width < 1:
            raise ValueError("scale and cue_width must be at least 1")
        if max(self.digit_size, self.cue_length) > min(self.height, self.region):
            raise ValueError(
                f"{self.digit_size}-px digits and {self.cue_length}-px cues must fit "
                f"{self.height} × {self.region}-px regions"
            )

    @property
    def width(self) -> int:
        return 3 * self.region

    @property
    def digit_size(self) -> int:
        return DIGIT_PIXELS * self.scale


@dataclass(frozen=True)
class TaskSplit:
    """One split: ``images`` (N, H, W) uint8 and ``labels`` (N,), with what was drawn and where."""

    images: np.ndarray
    labels: np.ndarray
    digits: np.ndarray  # (N, 2) classes of the left and right digit; -1 where absent
    cues: np.ndarray  # (N,) CUE_LEFT or CUE_RIGHT; -1 where there is no cue
    centres: np.ndarray  # (N, 3, 2) (row, col) centre of the left digit, the cue, the right digit; -1 absent


def pooled_evidence_ceiling(class_shares: np.ndarray | None = None) -> float:
    """The best top-1 on ``cue`` of any model whose class scores add up evidence from the three
    regions seen apart (``score_y = L_y(left) + C_y(cue) + R_y(right)``, whatever the functions): a
    model that pools per-window features into a linear head, as SepViT's head does, with no
    interaction among the last stage's windows.

    When the digits are equal any model is right. Otherwise take the two digits a, b: the four
    equally likely cases (a left or right, cue left or right) need a and b to swap ranks when the
    cue flips, in both orders; the cue adds the same ``C_y`` whichever side a is on, so the order
    with a on the left wants ``C_a - C_b`` larger under the left cue and the other order smaller,
    and at most three of the four are right: ceiling = P(equal) + 3/4 · P(different), 77.5% for
    uniform digits. A model that ignores the cue gets P(equal) + 1/2 · P(different) = 55%.
    """
    shares = np.full(NUM_CLASSES, 1 / NUM_CLASSES) if class_shares is None else np.asarray(class_shares)
    equal = float(np.sum(shares**2))
    return equal + 0.75 * (1 - equal)


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


def _draw(canvas: np.ndarray, ink: np.ndarray, top: int, left: int) -> tuple[int, int]:
    """Ink ``ink`` onto ``canvas`` at (top, left); returns the centre of what was drawn."""
    region = canvas[top : top + ink.shape[0], left : left + ink.shape[1]]
    np.maximum(region, ink, out=region)
    return top + ink.shape[0] // 2, left + ink.shape[1] // 2


def _random_corner(rng: np.random.Generator, spec: TaskSpec, region: int, shape: tuple[int, int]) -> tuple:
    """Top-left corner of a ``shape`` drawing at a random place inside region 0, 1 or 2."""
    top = int(rng.integers(0, spec.height - shape[0] + 1))
    left = region * spec.region + int(rng.integers(0, spec.region - shape[1] + 1))
    return top, left


def cue_bar(spec: TaskSpec, cue: int) -> np.ndarray:
    """The cue's ink: a horizontal bar (read the left digit) or a vertical one (the right digit)."""
    bar = np.ones((spec.cue_width, spec.cue_length), dtype=np.float32)
    return bar if cue == CUE_LEFT else bar.T


def generate_split(spec: TaskSpec, split: str, size: int) -> TaskSplit:
    """``size`` canvases of ``split`` ("train", "val" or "test"), deterministic in ``spec.seed``; the
    first ten canvases have labels 0, 1, ..., 9, the rest are drawn freely."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if size < NUM_CLASSES:
        raise ValueError(f"a {split} split needs at least {NUM_CLASSES} images, got {size}")
    ink, classes = digit_pools(spec.seed)[split]
    digit_ink = np.kron(ink, np.ones((spec.scale, spec.scale), dtype=np.float32))
    by_class = [np.flatnonzero(classes == digit) for digit in range(NUM_CLASSES)]
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), TASKS.index(spec.task)])
    images = np.empty((size, spec.height, spec.width), dtype=np.uint8)
    labels = np.empty(size, dtype=np.int64)
    digits = np.full((size, 2), -1, dtype=np.int64)
    cues = np.full(size, -1, dtype=np.int64)
    centres = np.full((size, 3, 2), -1, dtype=np.int64)
    digit_shape = (spec.digit_size, spec.digit_size)
    for n in range(size):
        canvas = np.zeros((spec.height, spec.width), dtype=np.float32)
        picks = rng.integers(len(ink), size=2)
        sides = (0, 1) if spec.task == "cue" else (int(rng.integers(2)),)
        read = int(rng.integers(2)) if spec.task == "cue" else sides[0]
        if n < NUM_CLASSES:  # every class at least once, so that every split has every class
            picks[read] = rng.choice(by_class[n])
        for side in sides:
            corner = _random_corner(rng, spec, 2 * side, digit_shape)
            centres[n, 2 * side] = _draw(canvas, digit_ink[picks[side]], *corner)
            digits[n, side] = classes[picks[side]]
        if spec.task == "cue":
            bar = cue_bar(spec, read)
            centres[n, 1] = _draw(canvas, bar, *_random_corner(rng, spec, 1, bar.shape))
            cues[n] = read
        labels[n] = digits[n, read]
        canvas += rng.normal(0.0, NOISE_STD, size=canvas.shape).astype(np.float32)
        images[n] = np.round(255 * (1 - canvas.clip(0, 1))).astype(np.uint8)
    return TaskSplit(images, labels, digits, cues, centres)


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
        for label in range(NUM_CLASSES):
            (partial / split / str(label)).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(data.images, data.labels)):
            Image.fromarray(image, mode="L").save(partial / split / str(label) / f"{index:05d}.png")
    partial.rename(root)
    return root
