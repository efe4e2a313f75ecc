"""Grad-CAM overlays (Selvaraju et al.) through the grad-cam library, for SepViT and timm models."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor, nn

from sepvit.utils.extras import require

MIN_CAM_SIDE = 4  # a map of fewer cells a side is too coarse to say where the evidence is


def cam_stage(model: nn.Module, height: int, width: int) -> tuple[nn.Module, int]:
    """The stage whose output Grad-CAM weighs, and its channels: the deepest one (of the model's
    ``feature_info``) whose map at a ``height`` × ``width`` input is at least 4 × 4, else the first."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no feature_info for Grad-CAM to find its stages")
    chosen = info[0]
    for stage in info:
        rows, cols = -(-height // stage["reduction"]), -(-width // stage["reduction"])
        if min(rows, cols) >= MIN_CAM_SIDE:
            chosen = stage
    return model.get_submodule(chosen["module"]), chosen["num_chs"]


def channels_first(features: int) -> Callable[[Tensor], Tensor]:
    """Grad-CAM's reshape of a stage's output to (B, C, H, W): the layout is read from where the
    ``features`` channels are, since a model's ``output_fmt`` describes its pooled-off features, not
    its stages (SepViT's stages give NCHW, Swin's NHWC)."""

    def reshape(x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2) if x.shape[1] != features and x.shape[-1] == features else x

    return reshape


def grad_cam(model: nn.Module, image: Tensor, target: int | None = None) -> np.ndarray:
    """Class activation map (H, W) in [0, 1] of one image (1, 3, H, W) for ``target`` (default: top-1),
    from the deepest stage whose map is at least 4 × 4 (:func:`cam_stage`)."""
    cams = require("pytorch_grad_cam", extra="explain")
    targets_module = require("pytorch_grad_cam.utils.model_targets", extra="explain")
    stage, channels = cam_stage(model, *image.shape[-2:])
    targets = None if target is None else [targets_module.ClassifierOutputTarget(target)]
    with cams.GradCAM(
        model=model.eval(), target_layers=[stage], reshape_transform=channels_first(channels)
    ) as cam:
        return cam(input_tensor=image, targets=targets)[0]


def overlay(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``heat`` (H, W) in [0, 1] over an RGB image (H, W, 3) in [0, 1], as uint8 RGB."""
    image_utils = require("pytorch_grad_cam.utils.image", extra="explain")
    return image_utils.show_cam_on_image(rgb.astype(np.float32), heat, use_rgb=True)
