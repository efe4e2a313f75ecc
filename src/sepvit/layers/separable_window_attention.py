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
* The local-only baseline of the ablation study, :class:`LocalWindowAttention`: Eq. (1) inside each
  window and nothing among windows (no window token, no PSA), as a windowed transformer without
  shifted or grouped windows.
* The Swin baseline of the paper's Table 5 ("Swin-T + CPVT"): the same module on windows of the map
  cyclically shifted by half a window on alternate blocks (W-MSA / SW-MSA of Liu et al., Swin).

Inputs and outputs are channels-last maps (B, H, W, C) of any size: windows that overhang the map
are zero-padded, padded pixels are masked out of DSA (never attended to) and contribute nothing to
PSA (their values are zeroed), and are cropped away at the end. Eager code pads, masks and resizes
the window tokens only where a map needs it; a model prepared for a size-independent export
(:func:`sepvit.layers.prepare_for`) always does, as no-ops where nothing needs it, so that one
exported graph holds for every input size.

The linear layers and the attention kernel are the plain forms of :mod:`sepvit.layers.fused_linear`;
:func:`~sepvit.layers.prepare_for` swaps them for their CPU-inference or export forms, so the
code below is the one path of every form. ``torch.fx`` treats :class:`SeparableWindowAttention` as
a leaf (its window grid depends on the map size).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn

from sepvit.layers.fused_linear import Gelu, Linear, ScaledDotProductAttention
from sepvit.layers.windows import grid_size, window_padding_mask, window_partition, window_reverse

WindowToken = Literal["learnable", "zero"]
WindowRepresentation = Literal["token", "avgpool", "dwconv"]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(..., L, C) -> (..., heads, L, C / heads)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(-2, -3)


def merge_heads(x: Tensor) -> Tensor:
    """(..., heads, L, D) -> (..., L, heads * D)."""
    return x.transpose(-2, -3).flatten(-2)


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
    return torch.einsum("ih,bhwc,jw->bijc", [rows, tokens, cols])


def window_token_grid(tokens: Tensor | None, x: Tensor, window_size: int, always_resize: bool) -> Tensor:
    """Eq. (5)'s window tokens for the map ``x`` (B, H, W, C): (1, rows, cols, C) of its window grid.

    ``tokens`` (1, rows', cols', C) are resized bilinearly when the grids differ (or always, for a
    size-independent export); None stands for fixed zero tokens.
    """
    rows, cols = grid_size(x.shape[1], x.shape[2], window_size)
    if tokens is None:
        return x.new_zeros(1, rows, cols, x.shape[3])
    if always_resize or tokens.shape[1] != rows or tokens.shape[2] != cols:
        return resize_token_grid(tokens, (rows, cols))
    return tokens


# One node in torch.fx graphs, wherever it is called from (the grid depends on the map size).
torch.fx.wrap("window_token_grid")


class DepthwiseSelfAttention(nn.Module):
    """DSA, Eq. (1), over groups of tokens, and the output projection; the base of both block attentions."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attend = ScaledDotProductAttention()
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def depthwise(self, z: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``Attention(zW_Q, zW_K, zW_V) + z`` within each group: ``z`` (G, L, C) holds G groups of L
        tokens; ``key_mask`` (G, L) marks the tokens that may be attended to, or (G, L, L) the keys
        each query may attend to (None: all)."""
        q, k, v = self.qkv.forward_parts(z, 3)
        attn_mask: Tensor | None = None
        if key_mask is not None:
            attn_mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
        dropout_p = self.attn_drop if self.training else 0.0
        out = self.attend(
            split_heads(q, self.num_heads),
            split_heads(k, self.num_heads),
            split_heads(v, self.num_heads),
            attn_mask,
            dropout_p,
        )
        return merge_heads(out) + z

    def window_tokens_for(self, x: Tensor) -> Tensor | None:
        """Eq. (5)'s window tokens for the map ``x`` (1, rows, cols, C), before the block's LayerNorm;
        None where the block has none."""
        return None


class GlobalSelfAttention(DepthwiseSelfAttention):
    """Eq. (1) over the whole map, then the output projection: a block that holds a single window."""

    def forward(self, x: Tensor, window_tokens: Tensor | None = None) -> Tensor:
        """``x`` is LN(z), (B, H, W, C); there are no window tokens (``window_tokens`` is None)."""
        z = self.depthwise(x.flatten(1, 2))
        return self.proj_drop(self.proj(z)).view_as(x)


def shifted_window_regions(
    height: int, width: int, window_size: int, shifts: tuple[int, int], device: torch.device
) -> Tensor:
    """Region of every pixel of the windows of a padded map rolled by ``-shifts``: (N, M*M) labels.

    Pixels may attend to each other only inside one region: as in Swin, the strips that the cyclic
    shift wraps around from the far edge are regions of their own, and padding (-1) is one more.
    """
    rows, cols = grid_size(height, width, window_size)
    labels = []
    for size, real, shift in (
        (rows * window_size, height, shifts[0]),
        (cols * window_size, width, shifts[1]),
    ):
        shifted = torch.arange(size, device=device)
        # Swin's three strips in shifted coordinates: [0, S-M), [S-M, S-s), [S-s, S).
        region = (shifted >= size - window_size).long() + (shifted >= size - shift).long()
        original = torch.roll(shifted, -shift)  # where each shifted pixel was before the roll
        labels.append(torch.where(original < real, region if shift else region * 0, -1))
    padding = (labels[0][:, None] < 0) | (labels[1][None, :] < 0)
    label = torch.where(padding, -1, labels[0][:, None] * 3 + labels[1][None, :])
    return window_partition(label[None, :, :, None], window_size)[0, :, :, 0]


@register_notrace_module  # the window grid and padding depend on the map size
class LocalWindowAttention(DepthwiseSelfAttention):
    """Eq. (1) inside each M×M window, then the output projection: no window token and no PSA, so no
    pixel sees anything outside its own window (the ablation study's local-only baseline).

    With ``shift_size`` s > 0 the windows are those of the map cyclically shifted by s pixels (Swin's
    SW-MSA; 0 is W-MSA): the map is padded, rolled, attended window by window with Swin's mask (the
    strips wrapped around from the far edge attend only among themselves) and rolled back. An axis
    with a single window is not shifted, as in Swin.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        shift_size: int = 0,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must lie in [0, window_size), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.size_independent = False  # as in SeparableWindowAttention

    def forward(self, x: Tensor, window_tokens: Tensor | None = None) -> Tensor:
        """``x`` is LN(z), (B, H, W, C); there are no window tokens (``window_tokens`` is None)."""
        batch, height, width, channels = x.shape
        size = self.window_size
        rows, cols = grid_size(height, width, size)
        shift_rows = self.shift_size if rows > 1 else 0
        shift_cols = self.shift_size if cols > 1 else 0
        if shift_rows or shift_cols:
            padded = F.pad(x, (0, 0, 0, cols * size - width, 0, rows * size - height))
            windows = window_partition(torch.roll(padded, (-shift_rows, -shift_cols), (1, 2)), size)
            regions = shifted_window_regions(height, width, size, (shift_rows, shift_cols), x.device)
            pair_mask = (regions[:, :, None] == regions[:, None, :]).repeat(batch, 1, 1)
            z = self.depthwise(windows.flatten(0, 1), pair_mask).view(batch, rows * cols, -1, channels)
            out = torch.roll(
                window_reverse(z, size, rows * size, cols * size), (shift_rows, shift_cols), (1, 2)
            )
            return self.proj_drop(self.proj(out[:, :height, :width]))
        windows = window_partition(x, size, self.size_independent)  # (B, N, P, C)
        key_mask: Tensor | None = None
        if self.size_independent or rows * size != height or cols * size != width:
            key_mask = window_padding_mask(height, width, size, x.device).repeat(batch, 1)
        z = self.depthwise(windows.flatten(0, 1), key_mask).view(batch, rows * cols, -1, channels)
        out = window_reverse(z, size, height, width, self.size_independent)
        return self.proj_drop(self.proj(out))


class PointwiseSelfAttention(nn.Module):
    """PSA, Eq. (2) and (4): attention among windows, queries and keys from the window tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.norm = nn.LayerNorm(dim)
        self.act = Gelu()
        self.qk = Linear(dim, dim * 2, bias=qkv_bias)
        self.attend = ScaledDotProductAttention()

    def queries_keys(self, window_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. (2): queries and keys (B, heads, N, C / heads) from GELU(LN(wt)) of (B, N, C)."""
        q, k = self.qk.forward_parts(self.act(self.norm(window_tokens)), 2)
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads)

    def attention_weights(self, window_tokens: Tensor) -> Tensor:
        """Eq. (4)'s softmax(QK^T / sqrt(d)) among the windows, (B, heads, N, N): what forward's
        fused kernel computes without showing, for inspection (``sepvit explain``)."""
        q, k = self.queries_keys(window_tokens)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)

    def forward(self, window_tokens: Tensor, windows: Tensor) -> Tensor:
        """``window_tokens`` (B, N, C) and ``windows`` (B, N, P, C) -> head-major (B, heads, N, P, C / heads).

        The result stays head-major, which saves a copy: the caller's window reverse is the one copy
        back to channels-last.
        """
        batch, num_windows, pixels, channels = windows.shape
        head_dim = channels // self.num_heads
        q, k = self.queries_keys(window_tokens)
        # Each head's values are its channel slice of every pixel of the window, flattened.
        v = windows.view(batch, num_windows, pixels, self.num_heads, head_dim).permute(0, 3, 1, 2, 4)
        v = v.reshape(batch, self.num_heads, num_windows, pixels * head_dim)
        # The scale is the DSA one (head_dim ** -0.5), which SDPA takes from the query width.
        dropout_p = self.attn_drop if self.training else 0.0
        out = self.attend(q, k, v, None, dropout_p) + v
        return out.view(batch, self.num_heads, num_windows, pixels, head_dim)


@register_notrace_module  # the window grid, padding and masks depend on the map size
class SeparableWindowAttention(DepthwiseSelfAttention):
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
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        if window_token not in ("learnable", "zero"):
            raise ValueError(f"window_token must be 'learnable' or 'zero', not {window_token!r}")
        if window_representation not in ("token", "avgpool", "dwconv"):
            raise ValueError(
                f"window_representation must be 'token', 'avgpool' or 'dwconv', not {window_representation!r}"
            )
        self.window_size = window_size
        self.window_representation = window_representation
        # True in a model prepared for a size-independent export: pad, mask and resize at every size.
        self.size_independent = False
        self.window_tokens = None
        if window_representation == "token" and window_token == "learnable":
            self.window_tokens = nn.Parameter(torch.zeros(1, *grid_size, dim))
        self.window_pool = None
        if window_representation == "dwconv":
            self.window_pool = nn.Conv2d(dim, dim, window_size, groups=dim)
        self.psa = PointwiseSelfAttention(dim, num_heads, qkv_bias, attn_drop)

    def window_tokens_for(self, x: Tensor) -> Tensor | None:
        """Eq. (5)'s ``wt`` for the map ``x``, (1, rows, cols, C), before the block's LayerNorm.

        Learnable tokens are resized to the map's window grid when it differs from the build grid;
        ``window_token="zero"`` gives zeros (so DSA sees LN(0), the norm's bias); the pooled
        representations have no token (None).
        """
        if self.window_representation != "token":
            return None
        return window_token_grid(self.window_tokens, x, self.window_size, self.size_independent)

    def pooled_representation(self, windows: Tensor, pixel_mask: Tensor | None) -> Tensor:
        """Table 6 alternatives to window tokens: (B, N, P, C) DSA output -> (B, N, C)."""
        if pixel_mask is not None:
            windows = windows * pixel_mask[:, :, None]
        if self.window_pool is not None:
            weight = self.window_pool.weight.flatten(1)  # (C, M*M): one M×M filter per channel
            return torch.einsum("bnpc,cp->bnc", [windows, weight]) + self.window_pool.bias
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
        rows, cols = grid_size(height, width, self.window_size)
        num_windows = rows * cols
        windows = window_partition(x, self.window_size, self.size_independent)  # (B, N, P, C)
        pixel_mask: Tensor | None = None
        if self.size_independent or rows * self.window_size != height or cols * self.window_size != width:
            pixel_mask = window_padding_mask(height, width, self.window_size, x.device)

        with_token = self.window_representation == "token"
        z = windows
        if with_token:
            if window_tokens is None:
                raise ValueError("window_representation='token' needs the normalised window tokens")
            tokens = window_tokens.to(x.dtype).reshape(1, num_windows, 1, channels)
            z = torch.cat((tokens.expand(batch, -1, -1, -1), windows), dim=2)  # Eq. (5)
        key_mask: Tensor | None = None
        if pixel_mask is not None:
            key_mask = F.pad(pixel_mask, (1, 0), value=True) if with_token else pixel_mask
            key_mask = key_mask.repeat(batch, 1)
        z = self.depthwise(z.flatten(0, 1), key_mask).view(batch, num_windows, -1, channels)

        if with_token:  # Eq. (7): Slice
            representation, windows = z[:, :, 0], z[:, :, 1:]
        else:
            windows = z
            representation = self.pooled_representation(windows, pixel_mask)
        if pixel_mask is not None:  # padded pixels must add nothing to other windows in PSA
            windows = windows * pixel_mask[:, :, None]
        out = window_reverse(
            self.psa(representation, windows), self.window_size, height, width, self.size_independent, True
        )
        return self.proj_drop(self.proj(out))
