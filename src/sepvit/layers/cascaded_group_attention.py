"""Cascaded group attention of EfficientViT (MSRA), in local windows, with attention biases.

Each of the h heads attends over its own split X_i of the channels, and head i also sees what head
i-1 produced (the cascade), which deepens the network without extra parameters:

    X'_i = X_i + Y_{i-1}   (i > 1),     X'_1 = X_1
    Y_i  = softmax((DW(X'_i W^Q_i)) (X'_i W^K_i)^T / sqrt(d_k) + B_i) (X'_i W^V_i)
    out  = Concat(Y_1, ..., Y_h) W^P        (ReLU before the projection)

W^Q, W^K, W^V are 1x1 Conv+BN, DW a depthwise Conv+BN on the queries (a different kernel per head),
B_i a learned bias per relative offset (|dy|, |dx|) inside the window. Attention runs in
non-overlapping windows of ``resolution x resolution`` pixels; maps that are not a multiple of it
are zero-padded at the bottom and right, as in the reference. :meth:`set_resolution` changes the
window and resamples the biases (bicubic) so trained weights carry over to other input sizes.

The layer is scriptable, and a leaf for ``torch.fx`` (its window count depends on the input size),
as timm's ``LocalWindowAttention`` is.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import resize_rel_pos_bias_table_levit
from timm.models import register_notrace_module
from torch import Tensor, nn

from sepvit.layers.conv_norm import ConvNormAct


def relative_offset_index(resolution: int, device: torch.device | None = None) -> Tensor:
    """(N, N) index of the offset (|dy|, |dx|) between the pixels of a window, N = resolution**2."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
    ).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).abs()
    return (offsets[0] * resolution + offsets[1]).to(device)


@register_notrace_module
class CascadedGroupAttention(nn.Module):
    """Windowed cascaded group attention on an NCHW map.

    Args:
        dim: input and output channels; split evenly among the heads.
        key_dim: width of each head's queries and keys.
        num_heads: heads h.
        attn_ratio: value width per head over ``key_dim``.
        resolution: window side in pixels (the attention biases cover its offsets).
        kernels: depthwise kernel size on the queries, one per head.
    """

    # Inference biases per device (constant there). A run-time annotation (this module has no
    # postponed annotations) so that TorchScript knows the type of the empty dict.
    _bias_cache: dict[str, Tensor]

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4.0,
        resolution: int = 7,
        kernels: Sequence[int] = (5, 5, 5, 5),
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.resolution = resolution
        head_dim = dim // num_heads
        self.qkvs = nn.ModuleList(
            ConvNormAct(head_dim, 2 * key_dim + self.val_dim, 1) for _ in range(num_heads)
        )
        self.dws = nn.ModuleList(
            ConvNormAct(key_dim, key_dim, kernels[i], groups=key_dim) for i in range(num_heads)
        )
        self.proj = nn.Sequential(nn.ReLU(), ConvNormAct(self.val_dim * num_heads, dim, 1))
        nn.init.zeros_(self.proj[1].bn.weight)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", relative_offset_index(resolution), persistent=False)
        self._bias_cache: dict[str, Tensor] = {}

    def set_resolution(self, resolution: int) -> None:
        """Use windows of ``resolution`` pixels; the biases are resampled to the new offsets."""
        if resolution == self.resolution:
            return
        with torch.no_grad():
            biases = resize_rel_pos_bias_table_levit(
                self.attention_biases.T, (resolution * resolution, self.num_heads)
            ).T.contiguous()
        self.attention_biases = nn.Parameter(biases, requires_grad=self.attention_biases.requires_grad)
        self.attention_bias_idxs = relative_offset_index(resolution, self.attention_bias_idxs.device)
        self.resolution = resolution
        self._bias_cache = {}

    def train(self, mode: bool = True) -> "CascadedGroupAttention":
        self._bias_cache = {}
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._bias_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._bias_cache = {}  # new biases loaded in eval mode must not meet the old ones' cache
        super()._load_from_state_dict(*args, **kwargs)

    def attention_bias(self) -> Tensor:
        """(heads, N, N) biases of the window; cached for inference (eval mode, no gradient), where
        they are constant."""
        if self.training or torch.is_grad_enabled() or torch.jit.is_tracing():
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(self.attention_biases.device)
        if key not in self._bias_cache:
            self._bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs].detach()
        return self._bias_cache[key]

    def attend(self, x: Tensor) -> Tensor:
        """Cascaded group attention of windows (B, C, r, r), r = ``resolution``."""
        batch, _, height, width = x.shape
        splits = x.chunk(self.num_heads, dim=1)
        bias = self.attention_bias().to(x.dtype)
        outputs = []
        feat = splits[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + splits[i]
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            # One GEMM adds the biases (baddbmm); with channels-last maps the flattening is free.
            attn = torch.baddbmm(bias[i], q.flatten(2).transpose(1, 2), k.flatten(2), alpha=self.scale)
            feat = torch.bmm(attn.softmax(dim=-1), v.flatten(2).transpose(1, 2))  # (B, HW, C)
            feat = feat.transpose(1, 2).view(batch, self.val_dim, height, width)
            outputs.append(feat)
        return self.proj(torch.cat(outputs, dim=1))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        r = self.resolution
        if height == r and width == r:
            return self.attend(x)
        # Windows are cut from the channels-last view (free for channels-last maps) and handed to
        # attend() as channels-last (B * num_windows, C, r, r) maps; row-major as in the reference.
        x = x.permute(0, 2, 3, 1)
        pad_h, pad_w = (r - height % r) % r, (r - width % r) % r
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        grid_h, grid_w = (height + pad_h) // r, (width + pad_w) // r
        x = x.reshape(batch, grid_h, r, grid_w, r, channels).transpose(2, 3)
        windows = x.reshape(batch * grid_h * grid_w, r, r, channels).permute(0, 3, 1, 2)
        out = self.attend(windows).permute(0, 2, 3, 1).reshape(batch, grid_h, grid_w, r, r, channels)
        out = out.transpose(2, 3).reshape(batch, grid_h * r, grid_w * r, channels)
        return out[:, :height, :width].permute(0, 3, 1, 2)
