"""Depthwise separable self-attention of SepViT (Li et al., "SepViT: Separable Vision Transformer").

* DSA, Eq. (1), (3), (5) and (6): multi-head self-attention inside each M×M window over its pixel
  tokens and the window's token, both through the block's first LayerNorm, plus that normalised
  input: ``Attention(zW_Q, zW_K, zW_V) + z`` with ``z = LN(Concat(pixels, wt))``; the slice of
  Eq. (7) hands the normalised-then-attended token on to PSA.
* PSA, Eq. (2), (4) and (7): the window tokens, through LayerNorm and GELU, give queries and keys;
  the DSA feature maps of every window are the values, with no projection; attention runs among the
  N windows and adds its input: ``Attention(GELU(LN(wt))W_Q, GELU(LN(wt))W_K, z) + z``.
* GSA is the same module with windows of 2M×2M (neighbouring windows spliced into one).
* A block whose map holds a single window has no window token and no PSA: Eq. (1) over the whole
  map, which :class:`GlobalSelfAttention` implements.

Inputs and outputs are channels-last maps (B, H, W, C) of any size: windows that overhang the map
are zero-padded, padded pixels are masked out of DSA (never attended to) and contribute nothing to
PSA (their values are zeroed), and are cropped away at the end.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepvit.layers.fused_linear import FusedLinear, Gelu
from sepvit.layers.tracing import exporting
from sepvit.layers.windows import (
    grid_size,
    shape_independent_graph,
    window_padding_mask,
    window_partition,
    window_reverse,
)

WindowToken = Literal["learnable", "zero"]
WindowRepresentation = Literal["token", "avgpool", "dwconv"]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(..., L, C) -> (..., heads, L, C / heads)."""
    *batch, length, channels = x.shape
    return x.view(*batch, length, num_heads, channels // num_heads).transpose(-2, -3)


def project_heads(x: Tensor, layer: nn.Linear, parts: int, num_heads: int) -> tuple[Tensor, ...]:
    """``layer(x)`` cut into ``parts`` (queries, keys, ...), each head-major: (..., heads, L, C / heads).

    ``x`` is (..., L, C). Under export each part is its own 2-D product (an ONNX ``Gemm``), which
    spares ONNX Runtime the copy that splitting one wide output costs.
    """
    if exporting():
        flat = x.reshape(-1, x.shape[-1])
        width = layer.out_features // parts
        projected = []
        for start in range(0, layer.out_features, width):
            rows = slice(start, start + width)  # a slice, not chunk(): the exporter folds it into a weight
            bias = None if layer.bias is None else layer.bias[rows]
            part = F.linear(flat, layer.weight[rows], bias).view(*x.shape[:-1], width)
            projected.append(split_heads(part, num_heads))
        return tuple(projected)
    out = layer(x).view(*x.shape[:-1], parts, num_heads, -1)  # (..., L, parts, heads, C / heads)
    return out.movedim(-3, 0).transpose(-2, -3).unbind(0)


def merge_heads(x: Tensor) -> Tensor:
    """(..., heads, L, D) -> (..., L, heads * D)."""
    *batch, heads, length, head_dim = x.shape
    return x.transpose(-2, -3).reshape(*batch, length, heads * head_dim)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """``softmax(q kᵀ / √d) v``, with ``attn_mask`` marking (True) the keys each query may attend to.

    Runs PyTorch's fused kernels, except under ``torch.export``: there it is written out as two
    products and a softmax, which ONNX Runtime runs faster than the exported SDPA (it folds the
    transposed keys into its MatMul, and the graph has a fifth fewer nodes).
    """
    if not exporting():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def depthwise_self_attention(
    z: Tensor,
    qkv: nn.Linear,
    num_heads: int,
    key_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """DSA, Eq. (1): ``Attention(zW_Q, zW_K, zW_V) + z`` over the tokens of each group.

    ``z`` is (G, L, C) for G independent groups (windows) of L tokens; ``key_mask`` (G, L) marks the
    tokens that may be attended to (None: all of them).
    """
    q, k, v = project_heads(z, qkv, 3, num_heads)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)
    return merge_heads(out) + z


def linear_resize_matrix(new_size: int, old_size: int, device: torch.device) -> Tensor:
    """(new, old) weights of 1-D linear resizing, as ``F.interpolate(mode="linear", align_corners=False)``.

    Built from ``arange`` and comparisons, so that an exported graph resizes at any size with plain
    MatMul (ONNX Resize fails on sizes computed at run time).
    """
    position = ((torch.arange(new_size, device=device) + 0.5) * old_size / new_size - 0.5).clamp(min=0)
    low = position.floor().clamp(max=old_size - 1)
    high = (low + 1).clamp(max=old_size - 1)
    weight_high = position - low
    source = torch.arange(old_size, device=device)[None, :]
    return (source == low[:, None]) * (1 - weight_high[:, None]) + (source == high[:, None]) * weight_high[
        :, None
    ]


def resize_token_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bilinear resizing of a token grid (B, rows, cols, C) to ``grid``, as position embeddings are."""
    rows = linear_resize_matrix(grid[0], tokens.shape[1], tokens.device).to(tokens.dtype)
    cols = linear_resize_matrix(grid[1], tokens.shape[2], tokens.device).to(tokens.dtype)
    return torch.einsum("ih,bhwc,jw->bijc", rows, tokens, cols)


class GlobalSelfAttention(nn.Module):
    """Eq. (1) over the whole map, then the output projection: a block that holds a single window."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = FusedLinear(dim, dim * 3, bias=qkv_bias)
        self.proj = FusedLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def window_tokens_for(self, height: int, width: int) -> Tensor | None:
        """A single-window block has no window token."""
        return None

    def forward(self, x: Tensor, window_tokens: Tensor | None = None) -> Tensor:
        """``x`` is LN(z), (B, H, W, C); ``window_tokens`` is always None here."""
        batch, height, width, channels = x.shape
        dropout_p = self.attn_drop if self.training else 0.0
        z = depthwise_self_attention(
            x.reshape(batch, height * width, channels), self.qkv, self.num_heads, dropout_p=dropout_p
        )
        return self.proj_drop(self.proj(z)).view(batch, height, width, channels)


class PointwiseSelfAttention(nn.Module):
    """PSA, Eq. (2) and (4): attention among windows, queries and keys from the window tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.norm = nn.LayerNorm(dim)
        self.act = Gelu()
        self.qk = FusedLinear(dim, dim * 2, bias=qkv_bias)

    def forward(self, window_tokens: Tensor, windows: Tensor) -> Tensor:
        """``window_tokens`` (B, N, C) and ``windows`` (B, N, P, C) -> head-major (B, heads, N, P, C / heads).

        The result stays head-major, which saves a copy: the caller's window reverse is the one copy
        back to channels-last.
        """
        batch, num_windows, pixels, channels = windows.shape
        head_dim = channels // self.num_heads
        q, k = project_heads(self.act(self.norm(window_tokens)), self.qk, 2, self.num_heads)
        # Each head's values are its channel slice of every pixel of the window, flattened.
        v = windows.view(batch, num_windows, pixels, self.num_heads, head_dim).permute(0, 3, 1, 2, 4)
        v = v.reshape(batch, self.num_heads, num_windows, pixels * head_dim)
        # The scale is the DSA one (head_dim ** -0.5), which SDPA takes from the query width.
        out = scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0) + v
        return out.view(batch, self.num_heads, num_windows, pixels, head_dim)


class SeparableWindowAttention(nn.Module):
    """Depthwise separable self-attention (DSSA; GSA with a 2M window), Eq. (5)–(8) up to the residual.

    Args:
        dim: channels.
        num_heads: heads of both DSA and PSA.
        window_size: M; windows are M×M pixels.
        grid_size: window grid (rows, cols) of the input size the model is built for; the learnable
            window tokens have one vector per cell of it. On a map with another grid the tokens are
            resized bilinearly, as position embeddings are, so each window starts from the token of
            its relative position; on the build grid they are used as they are.
        window_token: ``"learnable"`` (zero-initialised parameters) or ``"zero"`` (fixed zeros), Table 5.
        window_representation: how PSA gets each window's global representation (Table 6):
            ``"token"`` (window tokens through DSA), ``"avgpool"`` (mean of the window's DSA output)
            or ``"dwconv"`` (an M×M depthwise convolution over the window's DSA output).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        grid_size: tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_token: WindowToken = "learnable",
        window_representation: WindowRepresentation = "token",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if window_token not in ("learnable", "zero"):
            raise ValueError(f"window_token must be 'learnable' or 'zero', not {window_token!r}")
        if window_representation not in ("token", "avgpool", "dwconv"):
            raise ValueError(
                f"window_representation must be 'token', 'avgpool' or 'dwconv', not {window_representation!r}"
            )
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.window_representation = window_representation
        self.qkv = FusedLinear(dim, dim * 3, bias=qkv_bias)
        self.window_tokens = None
        if window_representation == "token" and window_token == "learnable":
            self.window_tokens = nn.Parameter(torch.zeros(1, *grid_size, dim))
        self.window_pool = None
        if window_representation == "dwconv":
            self.window_pool = nn.Conv2d(dim, dim, window_size, groups=dim)
        self.psa = PointwiseSelfAttention(dim, num_heads, qkv_bias, attn_drop)
        self.proj = FusedLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def window_tokens_for(self, height: int, width: int) -> Tensor | None:
        """Eq. (5)'s ``wt`` for a (height, width) map, (1, rows, cols, C), before the block's LayerNorm.

        Learnable tokens are resized to the map's window grid when it differs from the build grid;
        ``window_token="zero"`` gives zeros (so DSA sees LN(0), the norm's bias); the pooled
        representations have no token (None).
        """
        if self.window_representation != "token":
            return None
        grid = grid_size(height, width, self.window_size)
        if self.window_tokens is None:
            return self.qkv.weight.new_zeros(1, grid[0], grid[1], self.qkv.in_features)
        if shape_independent_graph() or tuple(self.window_tokens.shape[1:3]) != grid:
            return resize_token_grid(self.window_tokens, grid)
        return self.window_tokens

    def pooled_representation(self, windows: Tensor, pixel_mask: Tensor | None) -> Tensor:
        """Table 6 alternatives to window tokens: (B, N, P, C) DSA output -> (B, N, C)."""
        if pixel_mask is not None:
            windows = windows * pixel_mask[:, :, None]
        if self.window_pool is not None:
            weight = self.window_pool.weight.flatten(1)  # (C, M*M): one M×M filter per channel
            return torch.einsum("bnpc,cp->bnc", windows, weight) + self.window_pool.bias
        if pixel_mask is None:
            return windows.mean(dim=2)
        return windows.sum(dim=2) / pixel_mask.sum(dim=1, keepdim=True)

    def forward(self, x: Tensor, window_tokens: Tensor | None = None) -> Tensor:
        """Eq. (5)–(8) up to the block residual, on the block's LayerNorm outputs.

        ``x`` is LN(z), (B, H, W, C); ``window_tokens`` is LN(wt), (1, rows, cols, C), of
        :meth:`window_tokens_for` (None for the pooled representations). LayerNorm acts token by
        token, so LN(Concat(z, wt)) of Eq. (5)–(6) is Concat(LN(z), LN(wt)).
        """
        batch, height, width, channels = x.shape
        grid = grid_size(height, width, self.window_size)
        num_windows = grid[0] * grid[1]
        windows = window_partition(x, self.window_size)  # (B, N, P, C)
        padded = grid[0] * self.window_size != height or grid[1] * self.window_size != width
        pixel_mask = None
        if shape_independent_graph() or padded:
            pixel_mask = window_padding_mask(height, width, self.window_size, x.device)

        with_token = self.window_representation == "token"
        z = windows
        if with_token:
            if window_tokens is None:
                raise ValueError("window_representation='token' needs the normalised window tokens")
            tokens = window_tokens.to(x.dtype).reshape(1, num_windows, 1, channels).expand(batch, -1, -1, -1)
            z = torch.cat((tokens, windows), dim=2)  # Eq. (5)
        key_mask = None
        if pixel_mask is not None:
            key_mask = F.pad(pixel_mask, (1, 0), value=True) if with_token else pixel_mask
            key_mask = key_mask.repeat(batch, 1)
        dropout_p = self.attn_drop if self.training else 0.0
        z = depthwise_self_attention(z.flatten(0, 1), self.qkv, self.num_heads, key_mask, dropout_p)
        z = z.view(batch, num_windows, -1, channels)

        if with_token:  # Eq. (7): Slice
            window_tokens, windows = z[:, :, 0], z[:, :, 1:]
        else:
            windows = z
            window_tokens = self.pooled_representation(windows, pixel_mask)
        if pixel_mask is not None:  # padded pixels must add nothing to other windows in PSA
            windows = windows * pixel_mask[:, :, None]
        out = window_reverse(
            self.psa(window_tokens, windows), self.window_size, height, width, heads_first=True
        )
        return self.proj_drop(self.proj(out))
