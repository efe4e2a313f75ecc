"""Window partitioning of channels-last feature maps, with padding for maps that are not a multiple
of the window size.

Windows are numbered row-major over the window grid, pixels row-major inside a window. Maps whose
height or width is not a multiple of the window size are padded at the bottom and right; the padded
pixels are marked in :func:`window_padding_mask` so that attention can ignore them.

Padding and cropping run only where a map needs them, unless ``size_independent`` asks for them at
every size (as no-ops where nothing needs padding): a graph traced that way, for a size-independent
export, holds for every input size, not only the traced one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def grid_size(height: int, width: int, window_size: int) -> tuple[int, int]:
    """Number of windows along each axis once the map is padded to a multiple of the window."""
    # Non-negative operands only: an exported graph's integer division truncates, Python's floors.
    return (height + window_size - 1) // window_size, (width + window_size - 1) // window_size


def window_partition(x: Tensor, window_size: int, size_independent: bool = False) -> Tensor:
    """(B, H, W, C) -> (B, num_windows, window_size**2, C), zero-padding the bottom and right edges."""
    batch, height, width, channels = x.shape
    grid_h, grid_w = grid_size(height, width, window_size)
    pad_h, pad_w = grid_h * window_size - height, grid_w * window_size - width
    if size_independent or pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    x = x.view(batch, grid_h, window_size, grid_w, window_size, channels).transpose(2, 3)
    return x.reshape(batch, grid_h * grid_w, window_size * window_size, channels)


def window_reverse(
    windows: Tensor,
    window_size: int,
    height: int,
    width: int,
    size_independent: bool = False,
    heads_first: bool = False,
) -> Tensor:
    """Inverse of :func:`window_partition`: (B, num_windows, window_size**2, C) -> (B, H, W, C).

    ``heads_first`` takes the windows head-major, (B, heads, num_windows, window_size**2, C / heads),
    and moves the heads back beside their channels in the same single copy.
    """
    grid_h, grid_w = grid_size(height, width, window_size)
    if heads_first:  # (B, heads, gh, gw, M, M, d) -> (B, gh, M, gw, M, heads, d)
        x = windows.unflatten(3, (window_size, window_size)).unflatten(2, (grid_h, grid_w))
        x = x.permute(0, 2, 4, 3, 5, 1, 6)
    else:  # (B, gh, gw, M, M, C) -> (B, gh, M, gw, M, C)
        x = windows.unflatten(2, (window_size, window_size)).unflatten(1, (grid_h, grid_w)).transpose(2, 3)
    x = x.reshape(windows.shape[0], grid_h * window_size, grid_w * window_size, -1)
    if size_independent or grid_h * window_size != height or grid_w * window_size != width:
        x = x[:, :height, :width]
    return x


def window_padding_mask(height: int, width: int, window_size: int, device: torch.device) -> Tensor:
    """Boolean (num_windows, window_size**2): True for real pixels, False for padding."""
    grid_h, grid_w = grid_size(height, width, window_size)
    rows = (torch.arange(grid_h * window_size, device=device) < height).view(grid_h, 1, window_size, 1)
    cols = (torch.arange(grid_w * window_size, device=device) < width).view(1, grid_w, 1, window_size)
    return (rows & cols).reshape(grid_h * grid_w, window_size * window_size)
