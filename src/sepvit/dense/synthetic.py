"""The embedded dense-prediction dataset: random shapes on textured backgrounds.

Every scene has exact ground truth (each instance's visible mask, its box and the class map),
written in the COCO layout (``annotations/instances_<split>.json`` + ``<split>/``) and the ADE20K
layout (``images/<split>/`` + ``annotations/<split>/`` label PNGs), so training on it exercises
the same readers as real data. The class depends on the shape only, never on the colour (shapes
are saturated, backgrounds greyish).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sepvit.utils.extras import require

SHAPE_NAMES = ("circle", "square", "triangle")
SEGMENTATION_CLASS_NAMES = ("background", *SHAPE_NAMES)
COCO_SPLITS = ("train", "val")
ADE20K_SPLITS = ("training", "validation")
# A shape hidden below this share of its drawn area is dropped: too little of it is left to name.
MIN_VISIBLE_FRACTION = 0.4


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) bool, visible part of each instance
    labels: np.ndarray  # (N,) int, index into SHAPE_NAMES

    def class_map(self) -> np.ndarray:
        """(H, W) uint8: 0 for background, 1 + shape index elsewhere."""
        class_map = np.zeros(self.image.shape[:2], np.uint8)
        for mask, label in zip(self.masks, self.labels):
            class_map[mask] = label + 1
        return class_map


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Two grey tones mixed by oriented stripes plus smooth blotches: texture without shapes."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 30)
    stripes = 0.5 + 0.5 * np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period)
    coarse = rng.random((height // 16 + 2, width // 16 + 2)).astype(np.float32)
    blotches = np.asarray(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC), np.float32
    )
    mix = (0.5 * stripes + 0.5 * blotches / 255.0)[..., None]
    # Greyish backgrounds (a faint tint), saturated shapes: foreground is learnable in minutes.
    colour_a, colour_b = (rng.uniform(30, 225) + rng.uniform(-20, 20, 3) for _ in range(2))
    image = colour_a * mix + colour_b * (1 - mix) + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    """A random hue at high saturation and brightness."""
    red, green, blue = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return np.array([red, green, blue], np.float32) * 255


def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    corners = 4 if kind == "square" else 3
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / corners),
            cy + radius * math.sin(angle + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    max_objects: int = 4,
    radius_range: tuple[float, float] = (0.12, 0.28),
) -> Scene:
    """Paint 1..max_objects shapes (later ones occlude earlier ones) on a textured background."""
    background = _textured_background(rng, height, width)
    image = background.copy()
    owner = np.full((height, width), -1, np.int32)  # which shape is visible at each pixel
    drawn_area, labels = [], []
    for index in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(SHAPE_NAMES)))
        radius = rng.uniform(*radius_range) * min(height, width)
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        kind = SHAPE_NAMES[label]
        if kind == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        else:
            draw.polygon(_shape_polygon(kind, cx, cy, radius, rng.uniform(0, math.pi)), fill=255)
        mask = np.asarray(canvas) > 127
        colour = _saturated_colour(rng)
        shade = colour + rng.normal(0, 10, (int(mask.sum()), 3))
        image[mask] = np.clip(shade, 0, 255).astype(np.uint8)
        owner[mask] = index
        drawn_area.append(mask.sum())
        labels.append(label)
    masks, kept_labels = [], []
    for index, (area, label) in enumerate(zip(drawn_area, labels)):
        visible = owner == index
        if visible.sum() >= MIN_VISIBLE_FRACTION * area:
            masks.append(visible)
            kept_labels.append(label)
        else:
            owner[visible] = -1  # too occluded to label: it becomes background, in both layouts
            image[visible] = background[visible]
    masks_array = np.stack(masks) if masks else np.zeros((0, height, width), bool)
    return Scene(image=image, masks=masks_array, labels=np.asarray(kept_labels, np.int64))


def _scenes(seed: int, count: int, size: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        # Mixed sizes and aspect ratios, as in real datasets.
        height, width = (int(size * rng.uniform(0.75, 1.0)) for _ in range(2))
        scenes.append(render_scene(rng, height, width))
    return scenes


def _coco_document(scenes: list[Scene], split: str) -> dict:
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        height, width = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "height": height, "width": width})
        for mask, label in zip(scene.masks, scene.labels):
            mask_utils = require("pycocotools.mask", "dense")
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_NAMES)]
    return {
        "info": {"description": f"sepvit synthetic shapes, {split}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _write_atomically(build, destination: Path) -> Path:
    """Build a dataset folder next to ``destination`` and move it in place only when complete."""
    destination = Path(destination)
    if destination.exists():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        build(staging)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not destination.exists():
            raise
    return destination


def write_coco(
    root: str | Path, num_train: int = 300, num_val: int = 60, size: int = 192, seed: int = 0
) -> Path:
    """Write the shapes dataset in COCO layout (images as PNG) under ``root``; kept if already there."""

    def build(folder: Path) -> None:
        for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
            scenes = _scenes(split_seed, count, size)
            (folder / split).mkdir()
            for image_id, scene in enumerate(scenes, start=1):
                Image.fromarray(scene.image).save(folder / split / f"{image_id:06d}.png")
            (folder / "annotations").mkdir(exist_ok=True)
            with open(folder / "annotations" / f"instances_{split}.json", "w") as file:
                json.dump(_coco_document(scenes, split), file)

    return _write_atomically(build, Path(root))


def write_ade20k(
    root: str | Path, num_train: int = 300, num_val: int = 60, size: int = 192, seed: int = 0
) -> Path:
    """Write the shapes dataset in ADE20K layout under ``root``; kept if already there.

    As in ADE20K, label value 0 means "unlabelled" and class ``k`` is stored as ``k + 1``;
    ``classes.txt`` names the classes in order.
    """

    def build(folder: Path) -> None:
        for split, count, split_seed in (("training", num_train, seed), ("validation", num_val, seed + 1)):
            (folder / "images" / split).mkdir(parents=True)
            (folder / "annotations" / split).mkdir(parents=True)
            for index, scene in enumerate(_scenes(split_seed, count, size), start=1):
                Image.fromarray(scene.image).save(folder / "images" / split / f"{index:06d}.jpg", quality=95)
                Image.fromarray(scene.class_map() + 1).save(
                    folder / "annotations" / split / f"{index:06d}.png"
                )
        (folder / "classes.txt").write_text("\n".join(SEGMENTATION_CLASS_NAMES) + "\n")

    return _write_atomically(build, Path(root))


def default_root(kind: str) -> Path:
    """Where the embedded dataset of ``kind`` ('coco' or 'ade20k') lives: $SEPVIT_DATA or ~/.cache/sepvit."""
    base = Path(os.environ.get("SEPVIT_DATA", Path.home() / ".cache" / "sepvit"))
    return base / f"synthetic-shapes-{kind}-v1"
