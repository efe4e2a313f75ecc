"""How far a model looks: the effective receptive field, measured from input gradients.

For each image, the features at the centre of a stage's output map are summed and back-propagated to
the input; the absolute gradient, summed over colour channels, is the centre unit's sensitivity to
every input pixel. Its share outside the ``window`` × ``window`` pixels around the centre (by default
one first-stage attention window) is the "range" of Figure 4 in the SepViT paper, as a number: 0 for a
model that sees only the centre window, larger the more it gathers from the rest of the image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def centre_gradient(model: nn.Module, images: Tensor, stage: int = -2) -> Tensor:
    """|∂ (centre features of ``stage``) / ∂ input|, summed over channels: (B, H, W)."""
    images = images.detach().clone().requires_grad_(True)
    (features,) = model.forward_intermediates(images, indices=[stage], intermediates_only=True)
    rows, cols = features.shape[-2:]  # intermediates are NCHW in timm's contract
    features[:, :, rows // 2, cols // 2].sum().backward()
    return images.grad.abs().sum(dim=1)


def outside_share(gradient: Tensor, window: int) -> Tensor:
    """Per image, the share of gradient mass outside the centred ``window`` × ``window`` pixels: (B,)."""
    height, width = gradient.shape[-2:]
    top, left = (height - window) // 2, (width - window) // 2
    inside = gradient[:, top : top + window, left : left + window].sum(dim=(1, 2))
    total = gradient.sum(dim=(1, 2)).clamp_min(torch.finfo(gradient.dtype).tiny)
    return 1 - inside / total


def effective_receptive_field(model: nn.Module, images: Tensor, window: int, stage: int = -2) -> float:
    """Mean share of the centre unit's input-gradient mass outside the centre window (see module doc)."""
    was_training = model.training
    model.eval()
    try:
        return outside_share(centre_gradient(model, images, stage), window).mean().item()
    finally:
        model.train(was_training)
