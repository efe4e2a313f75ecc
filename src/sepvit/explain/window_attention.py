"""PSA's attention among windows (SepViT Eq. 4), read from a model while it classifies an image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from sepvit.layers import SeparableWindowAttention, grid_size


@dataclass(frozen=True)
class WindowAttention:
    """Attention among the windows of one PSA, averaged over heads: ``weights`` (N, N), row = query
    window, over a ``grid`` of (rows, cols) windows of ``window_pixels`` input pixels each."""

    weights: np.ndarray
    grid: tuple[int, int]
    window_pixels: int


def first_psa(model: nn.Module) -> SeparableWindowAttention | None:
    """The first block attention with PSA (the finest window grid), None if the model has none."""
    return next((m for m in model.modules() if isinstance(m, SeparableWindowAttention)), None)


@torch.no_grad()
def psa_window_attention(
    model: nn.Module, image: Tensor, attention: SeparableWindowAttention | None = None
) -> WindowAttention | None:
    """PSA's window-to-window attention in ``attention`` (by default the first block that has PSA), for
    one image (1, 3, H, W)."""
    attention = attention or first_psa(model)
    if attention is None:
        return None
    seen: dict[str, Tensor] = {}

    def keep_map(module: nn.Module, inputs: tuple) -> None:
        seen["map"] = inputs[0]

    def keep_tokens(module: nn.Module, inputs: tuple) -> None:
        seen["tokens"] = inputs[0]

    hooks = [
        attention.register_forward_pre_hook(keep_map),
        attention.psa.register_forward_pre_hook(keep_tokens),
    ]
    try:
        model.eval()(image)
    finally:
        for hook in hooks:
            hook.remove()
    height, width = seen["map"].shape[1:3]
    weights = attention.psa.attention_weights(seen["tokens"])[0].mean(dim=0)
    stride = image.shape[-2] / height
    return WindowAttention(
        weights.float().cpu().numpy(),
        grid_size(height, width, attention.window_size),
        round(stride * attention.window_size),
    )


def attention_heat(attention: WindowAttention, query: int, size: tuple[int, int]) -> np.ndarray:
    """The ``query`` window's attention over the image, (H, W) scaled to [0, 1] by its maximum."""
    rows, cols = attention.grid
    cells = attention.weights[query].reshape(rows, cols)
    block = np.ones((attention.window_pixels, attention.window_pixels), dtype=np.float32)
    heat = np.kron(cells, block)[: size[0], : size[1]]
    return heat / max(float(heat.max()), np.finfo(np.float32).tiny)


def strongest_window(attention: WindowAttention, heat: np.ndarray) -> int:
    """The window holding the most of a (H, W) map such as Grad-CAM's."""
    rows, cols = attention.grid
    side = attention.window_pixels
    padded = np.zeros((rows * side, cols * side), dtype=np.float32)
    height, width = min(heat.shape[0], rows * side), min(heat.shape[1], cols * side)
    padded[:height, :width] = heat[:height, :width]
    return int(padded.reshape(rows, side, cols, side).sum(axis=(1, 3)).argmax())
