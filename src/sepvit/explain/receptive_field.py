"""How far a model looks: the effective receptive field, measured from input gradients.

For each image, the features at the centre of a stage's output map are summed and back-propagated to
the input; the absolute gradient, summed over colour channels, is the centre unit's sensitivity to
every input pixel. Its share outside the ``window`` × ``window`` pixels around the centre (by default
one first-stage attention window) is the "range" of Figure 4 in the SepViT paper, as a number: 0 for a
model that sees only the centre window, larger the more it gathers from the rest of the image.

:func:`window_range` fixes the geometry for windowed models whose first stage has an 8×8 grid of
windows (SepViT and Swin at any size, as at 224 px): the square is three first-stage windows wide,
centred on the window of the centre unit, so the reach of the convolutions around a window (patch
embedding, position encoding: up to 7 px beyond a window of 8 px at 64-px inputs) stays inside it
and what lies outside came through attention among windows; it is taken after the first stage
(where only SepViT's PSA reaches other windows) and after the third.
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


def outside_share(gradient: Tensor, window: int, cell: int | None = None) -> Tensor:
    """Per image, the share of gradient mass outside a ``window`` × ``window`` square: (B,).

    The square is centred on the image or, given ``cell``, on the middle of the cell of a
    ``cell``-px grid from the top-left corner that holds the centre pixel: the attention window of
    the centre unit in a windowed model (on an even grid of windows none is centred).
    """
    height, width = gradient.shape[-2:]
    middle_row, middle_col = height / 2, width / 2
    if cell is not None:
        middle_row = height // 2 // cell * cell + cell / 2
        middle_col = width // 2 // cell * cell + cell / 2
    top, left = max(int(middle_row - window / 2), 0), max(int(middle_col - window / 2), 0)
    inside = gradient[:, top : top + window, left : left + window].sum(dim=(1, 2))
    total = gradient.sum(dim=(1, 2)).clamp_min(torch.finfo(gradient.dtype).tiny)
    return (1 - inside / total).clamp_min(0)  # rounding may leave -1e-8 for a share of 0


def effective_receptive_field(
    model: nn.Module, images: Tensor, window: int, stage: int = -2, cell: int | None = None
) -> float:
    """Mean share of the centre unit's input-gradient mass outside the centre window (see module doc
    and :func:`outside_share`)."""
    was_training = model.training
    model.eval()
    try:
        return outside_share(centre_gradient(model, images, stage), window, cell).mean().item()
    finally:
        model.train(was_training)


RANGE_STAGES = {"stage1": 0, "stage3": -2}
RANGE_WINDOWS = 3  # the side of the square, in first-stage windows


def window_range(
    model: nn.Module, images: Tensor, cell: int | None = None, stages: dict[str, int] | None = None
) -> dict[str, float]:
    """The effective receptive field after each of ``stages`` (name -> stage index; by default after
    stages 1 and 3), outside a square three first-stage windows wide centred on the centre unit's
    window. ``cell``: a first-stage window in pixels (by default an eighth of the input width: an
    8 × 8 window grid, as at 224 px)."""
    cell = cell or images.shape[-1] // 8
    return {
        name: effective_receptive_field(model, images, RANGE_WINDOWS * cell, stage, cell)
        for name, stage in (stages or RANGE_STAGES).items()
    }
