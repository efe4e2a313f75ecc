"""Explainability: Grad-CAM overlays and the effective receptive field ("range", SepViT Figure 4)."""

from sepvit.explain.gradcam import grad_cam, overlay
from sepvit.explain.receptive_field import (
    centre_gradient,
    effective_receptive_field,
    outside_share,
    window_range,
)

__all__ = [
    "centre_gradient",
    "effective_receptive_field",
    "grad_cam",
    "outside_share",
    "overlay",
    "window_range",
]
