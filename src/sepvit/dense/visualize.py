"""Predictions drawn over their input image: boxes and instance masks, or a colour-coded class map."""

from __future__ import annotations

import colorsys

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


def palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct, saturated colours (golden-ratio hue steps)."""
    colours = []
    for index in range(count):
        red, green, blue = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 0.95)
        colours.append((int(red * 255), int(green * 255), int(blue * 255)))
    return colours


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def draw_detections(
    image: torch.Tensor,
    prediction: dict[str, torch.Tensor],
    class_names: list[str],
    score_threshold: float = 0.5,
) -> torch.Tensor:
    """(3, H, W) uint8: ``image`` in [0, 1] with masks (if any), boxes and "class score" labels."""
    keep = prediction["scores"] >= score_threshold
    labels = prediction["labels"][keep].cpu()
    colours = palette(len(class_names))
    box_colours = [colours[int(label) - 1] for label in labels]
    canvas = _to_uint8(image)
    if "masks" in prediction and keep.any():
        masks = prediction["masks"][keep][:, 0].cpu() > 0.5
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=box_colours)
    captions = [
        f"{class_names[int(label) - 1]} {float(score):.2f}"
        for label, score in zip(labels, prediction["scores"][keep])
    ]
    if keep.any():
        canvas = draw_bounding_boxes(
            canvas, prediction["boxes"][keep].cpu(), captions, colors=box_colours, width=2
        )
    return canvas


def draw_class_map(
    image: torch.Tensor, class_map: torch.Tensor, num_classes: int, alpha: float = 0.6
) -> torch.Tensor:
    """(3, H, W) uint8: ``image`` in [0, 1] under a colour-coded (H, W) class map."""
    masks = class_map.cpu()[None] == torch.arange(num_classes)[:, None, None]
    return draw_segmentation_masks(_to_uint8(image), masks, alpha=alpha, colors=palette(num_classes))
