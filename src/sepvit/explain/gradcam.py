"""Grad-CAM overlays (Selvaraju et al.) through the grad-cam library, for SepViT and timm models."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor, nn

from sepvit.utils.extras import require


def last_stage(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM weighs: the last stage (timm's ``stages`` or ``layers``)."""
    for name in ("stages", "layers"):
        stages = getattr(model, name, None)
        if stages is not None:
            return stages[-1]
    raise ValueError(f"{type(model).__name__} has no 'stages' or 'layers' for Grad-CAM to use")


def channels_first(features: int) -> Callable[[Tensor], Tensor]:
    """Grad-CAM's reshape of a stage's output to (B, C, H, W): the layout is read from where the
    ``features`` channels are, since a model's ``output_fmt`` describes its pooled-off features, not
    its stages (SepViT's stages give NCHW, Swin's NHWC)."""

    def reshape(x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2) if x.shape[1] != features and x.shape[-1] == features else x

    return reshape


def grad_cam(model: nn.Module, image: Tensor, target: int | None = None) -> np.ndarray:
    """Class activation map (H, W) in [0, 1] of one image (1, 3, H, W) for ``target`` (default: top-1)."""
    cams = require("pytorch_grad_cam", extra="explain")
    targets_module = require("pytorch_grad_cam.utils.model_targets", extra="explain")
    reshape = channels_first(model.num_features)
    targets = None if target is None else [targets_module.ClassifierOutputTarget(target)]
    with cams.GradCAM(
        model=model.eval(), target_layers=[last_stage(model)], reshape_transform=reshape
    ) as cam:
        return cam(input_tensor=image, targets=targets)[0]


def overlay(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``heat`` (H, W) in [0, 1] over an RGB image (H, W, 3) in [0, 1], as uint8 RGB."""
    image_utils = require("pytorch_grad_cam.utils.image", extra="explain")
    return image_utils.show_cam_on_image(rgb.astype(np.float32), heat, use_rgb=True)
