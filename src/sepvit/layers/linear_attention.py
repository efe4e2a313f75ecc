"""Separable self-attention of MobileViTv2, linear in the number of tokens.

For k tokens ``x`` (rows) of width d, one latent token scores every token and the scores weight the
keys into a single context vector, which gates the ReLU of the values:

    c_s = softmax(x W_I)                 context scores, (k,), W_I: (d, 1)
    c_v = sum_i c_s(i) (x W_K)(i)        context vector, (d,)
    y   = (ReLU(x W_V) * c_v) W_O        broadcast over the k tokens

Only element-wise products and one reduction over the tokens: O(k d) time and memory.

MobileViTv2 unfolds a feature map into non-overlapping ``p_h x p_w`` patches and attends among the
pixels that sit at the same position inside their patch (one token set per patch position). This
module does that on the NCHW map itself: a free view splits H into (patches, p_h) and W into
(patches, p_w), so no unfold / fold copies are made.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.models import register_notrace_module
from torch import Tensor, nn


@register_notrace_module  # a torch.fx leaf: it checks the input size against the patch
class LinearSelfAttention(nn.Module):
    """Separable self-attention over an NCHW map, one token set per position inside a patch.

    Args:
        dim: channels d of the input and output.
        patch_size: (p_h, p_w); the input height and width must be multiples of it. ``(1, 1)``
            attends among all pixels of the map.
        attn_drop: dropout on the context scores.
        proj_drop: dropout on the output.
        bias: biases of the input and output projections.
    """

    def __init__(
        self,
        dim: int,
        patch_size: tuple[int, int] = (2, 2),
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.patch_size = tuple(patch_size)
        # One 1x1 projection gives the score (W_I), the keys (W_K) and the values (W_V).
        self.qkv = nn.Conv2d(dim, 1 + 2 * dim, kernel_size=1, bias=bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        patch_h, patch_w = self.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(f"feature map {height}x{width} is not a multiple of the patch {self.patch_size}")
        grid_h, grid_w = height // patch_h, width // patch_w
        scores, keys, values = self.qkv(x).split([1, self.dim, self.dim], dim=1)

        # Scores: softmax over the patches, separately for each position inside a patch.
        scores = scores.reshape(batch, grid_h, patch_h, grid_w, patch_w).permute(0, 2, 4, 1, 3)
        scores = scores.reshape(batch, patch_h * patch_w, grid_h * grid_w).softmax(dim=-1)
        scores = self.attn_drop(scores)
        scores = scores.view(batch, 1, patch_h, patch_w, grid_h, grid_w).permute(0, 1, 4, 2, 5, 3)

        split = (batch, self.dim, grid_h, patch_h, grid_w, patch_w)
        context = (keys.reshape(split) * scores).sum(dim=(2, 4), keepdim=True)
        out = F.relu(values).reshape(split) * context
        out = self.proj(out.view(batch, self.dim, height, width))
        return self.proj_drop(out)
