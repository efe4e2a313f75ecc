"""EfficientViT (MSRA; Liu et al., "EfficientViT: Memory Efficient Vision Transformer with Cascaded
Group Attention", CVPR 2023). Not the MIT model of the same name.

Registered as ``sv_efficientvit_m0`` ... ``sv_efficientvit_m5``; the ``sv_`` prefix keeps timm's own
``efficientvit_m*`` loadable beside ours. A state dict of timm's models loads through
:func:`checkpoint_filter_fn` and gives the same outputs.

Layout: a 16x patch embedding of four stride-2 3x3 Conv+BN, then three stages of sandwich blocks
(depthwise conv + FFN, cascaded group attention in 7x7 windows, depthwise conv + FFN); stages 2 and
3 start with an inverted-residual subsample (stride 2). Feature strides 16, 32, 64. Every
convolution is followed by BatchNorm, folded away by :meth:`EfficientViT.fuse`.
"""

# No postponed annotations (``from __future__ import annotations``) here: torch.fx copies forward()'s
# annotations into the code it generates, and TorchScript cannot read a postponed one there.

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import (
    DropPath,
    SelectAdaptivePool2d,
    SqueezeExcite,
    resize_rel_pos_bias_table_levit,
    to_2tuple,
    trunc_normal_,
)
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from sepvit.errors import ConfigError
from sepvit.layers.cascaded_group_attention import CascadedGroupAttention
from sepvit.layers.conv_norm import ConvNormAct
from sepvit.models.state_dicts import build_with_weights, rename_key, unwrap_state_dict
from sepvit.utils.reparameterize import fuse_bn_linear, reparameterize

__all__ = ["EfficientViT", "checkpoint_filter_fn"]

ConvNorm = ConvNormAct
ConvNormReLU = partial(ConvNormAct, act_layer=nn.ReLU)


def _zero_init_last(conv_norm: ConvNormAct) -> ConvNormAct:
    # Residual branches start as identity, as in the reference.
    nn.init.zeros_(conv_norm.bn.weight)
    return conv_norm


class FeedForward(nn.Module):
    """1x1 Conv+BN, ReLU, 1x1 Conv+BN."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.pw1 = ConvNormReLU(dim, hidden_dim, 1)
        self.pw2 = _zero_init_last(ConvNorm(hidden_dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pw2(self.pw1(x))


class ResidualConvFFN(nn.Module):
    """Depthwise 3x3 Conv+BN and an FFN, each with a residual: one slice of the sandwich."""

    def __init__(self, dim: int, drop_path: float = 0.0, zero_init: bool = True) -> None:
        super().__init__()
        dw = ConvNorm(dim, dim, 3, groups=dim)
        self.dw = _zero_init_last(dw) if zero_init else dw
        self.ffn = FeedForward(dim, 2 * dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.identity_in_dw = False  # deploy mode: the residual is folded into the depthwise kernel

    def forward(self, x: Tensor) -> Tensor:
        x = self.dw(x) if self.identity_in_dw else x + self.drop_path(self.dw(x))
        return x + self.drop_path(self.ffn(x))

    def fuse(self) -> "ResidualConvFFN":
        """Deploy mode: Conv+BN folded, and x + dw(x) made one depthwise conv (centre tap + 1)."""
        reparameterize(self, inplace=True)
        if not self.identity_in_dw:
            conv = self.dw.conv
            with torch.no_grad():
                conv.weight[:, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] += 1
            self.identity_in_dw = True
        return self


class PatchMerging(nn.Module):
    """Inverted residual with squeeze-excite and stride 2, without shortcut."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        hidden = 4 * dim
        self.conv1 = ConvNormReLU(dim, hidden, 1)
        self.conv2 = ConvNormReLU(hidden, hidden, 3, stride=2, groups=hidden)
        self.se = SqueezeExcite(hidden, 0.25)
        self.conv3 = ConvNorm(hidden, out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.se(self.conv2(self.conv1(x))))


class Subsample(nn.Module):
    """Between stages: conv+FFN at the input width, patch merging (stride 2), conv+FFN at the output."""

    def __init__(self, dim: int, out_dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pre = ResidualConvFFN(dim, drop_path, zero_init=False)
        self.merge = PatchMerging(dim, out_dim)
        self.post = ResidualConvFFN(out_dim, drop_path, zero_init=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.merge(self.pre(x)))


class SandwichBlock(nn.Module):
    """Conv+FFN, one cascaded-group-attention token mixer (windowed), Conv+FFN."""

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        window_resolution: int,
        kernels: Sequence[int],
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.local0 = ResidualConvFFN(dim, drop_path)
        self.mixer = CascadedGroupAttention(
            dim, key_dim, num_heads, dim / (key_dim * num_heads), window_resolution, kernels
        )
        self.local1 = ResidualConvFFN(dim, drop_path)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.local0(x)
        x = x + self.drop_path(self.mixer(x))
        return self.local1(x)


class EfficientViTStage(nn.Module):
    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        key_dim: int,
        num_heads: int,
        window_resolution: int,
        kernels: Sequence[int],
        subsample: bool,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        # drop_path: one rate per block, the subsample's first when there is one.
        self.downsample = Subsample(in_dim, dim, drop_path[0]) if subsample else nn.Identity()
        block_dpr = drop_path[1:] if subsample else drop_path
        self.blocks = nn.Sequential(
            *[
                SandwichBlock(dim, key_dim, num_heads, window_resolution, kernels, block_dpr[i])
                for i in range(depth)
            ]
        )
        self.grad_checkpointing = False

    def set_window_resolution(self, resolution: int) -> None:
        for block in self.blocks:
            block.mixer.set_resolution(resolution)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class BatchNormLinear(nn.Module):
    """BatchNorm1d, dropout, Linear: the classifier; folds into one Linear for deployment."""

    def __init__(self, in_features: int, out_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features)
        trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.drop(self.bn(x)))

    def fuse(self) -> nn.Linear:
        return fuse_bn_linear(self.bn, self.linear)


class EfficientViT(nn.Module):
    """EfficientViT (MSRA) classifier.

    Args:
        img_size: input size the attention windows are built for: a stage's window is
            ``min(window_size, stage resolution)``. Other sizes run too (windows are padded);
            :meth:`set_input_size` rebuilds the windows and resamples the attention biases.
        in_chans: input channels.
        num_classes: classes of the head (0: no classifier).
        embed_dim, depth, num_heads, key_dim, window_size: per stage.
        kernels: depthwise kernel on the queries, per head.
        global_pool: pooling of the head ('' for none: with ``num_classes=0`` the model then
            returns the final (B, C, H, W) map).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth on every residual branch, rising linearly over the blocks.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (64, 128, 192),
        depth: Sequence[int] = (1, 2, 3),
        num_heads: Sequence[int] = (4, 4, 4),
        key_dim: Sequence[int] = (16, 16, 16),
        window_size: Sequence[int] = (7, 7, 7),
        kernels: Sequence[int] = (5, 5, 5, 5),
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = "NCHW"
        self.window_size = tuple(window_size)
        self.patch_embed = nn.Sequential(
            ConvNormReLU(in_chans, embed_dim[0] // 8, 3, stride=2),
            ConvNormReLU(embed_dim[0] // 8, embed_dim[0] // 4, 3, stride=2),
            ConvNormReLU(embed_dim[0] // 4, embed_dim[0] // 2, 3, stride=2),
            ConvNorm(embed_dim[0] // 2, embed_dim[0], 3, stride=2),
        )
        # The maps are channels-last; dense kxk kernels stored so too are not converted on every call.
        self.patch_embed.to(memory_format=torch.channels_last)
        # Stochastic depth per block (the subsample of a stage counts as its first block).
        num_blocks = [d + (i > 0) for i, d in enumerate(depth)]
        dpr = torch.linspace(0, drop_path_rate, sum(num_blocks), device="cpu").split(num_blocks)
        resolutions = self._window_resolutions(img_size)
        stages, in_dim, reduction = [], embed_dim[0], 16
        self.feature_info = []
        for i in range(len(embed_dim)):
            stages.append(
                EfficientViTStage(
                    in_dim,
                    embed_dim[i],
                    depth[i],
                    key_dim[i],
                    num_heads[i],
                    resolutions[i],
                    kernels,
                    subsample=i > 0,
                    drop_path=dpr[i].tolist(),
                )
            )
            reduction *= 2 if i > 0 else 1
            in_dim = embed_dim[i]
            self.feature_info.append(dict(num_chs=in_dim, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_dim
        self.reset_classifier(num_classes, global_pool)

    def _window_resolutions(self, img_size: int | tuple[int, int]) -> list[int]:
        # The shorter side sets the windows, as in the reference.
        resolution = min(to_2tuple(img_size)) // 16
        out = []
        for i, window in enumerate(self.window_size):
            if i > 0:
                resolution = (resolution - 1) // 2 + 1
            out.append(min(window, resolution))
        return out

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Build the attention windows for ``img_size``; biases are resampled where a window changes."""
        for stage, resolution in zip(self.stages, self._window_resolutions(img_size)):
            stage.set_window_resolution(resolution)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {k for k in self.state_dict() if "attention_biases" in k}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.linear if isinstance(self.head, BatchNormLinear) else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none) on ``global_pool`` ('' for none; None: keep)."""
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        if num_classes > 0 and not pool_type:
            raise ConfigError("a classifier needs pooled features: global_pool='' requires num_classes=0")
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = nn.Identity()
        if num_classes > 0:
            like = next(self.parameters())  # the new head takes the model's device and dtype
            head = BatchNormLinear(self.head_hidden_size, num_classes, self.drop_rate)
            self.head = head.to(device=like.device, dtype=like.dtype).train(self.training)

    def fuse(self) -> "EfficientViT":
        """Deploy mode, in place: Conv+BN and the head's BN+Linear folded."""
        return reparameterize(self, inplace=True)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (strides 16, 32, 64) selected by ``indices``, and optionally the final map."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early or intermediates_only else self.stages
        intermediates = []
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        pruned_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if pruned_end:  # the features now end at the last kept stage; a head sized for the old end goes
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.patch_embed(x.contiguous(memory_format=torch.channels_last)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# timm's names -> ours, applied in order.
_TIMM_KEY_MAP = (
    (r"^patch_embed\.conv(\d)\.", lambda m: f"patch_embed.{int(m.group(1)) - 1}."),
    (r"\.downsample\.res1\.0\.m\.", ".downsample.pre.dw."),
    (r"\.downsample\.res1\.1\.m\.", ".downsample.pre.ffn."),
    (r"\.downsample\.patchmerge\.", ".downsample.merge."),
    (r"\.downsample\.res2\.0\.m\.", ".downsample.post.dw."),
    (r"\.downsample\.res2\.1\.m\.", ".downsample.post.ffn."),
    (r"\.dw0\.m\.", ".local0.dw."),
    (r"\.ffn0\.m\.", ".local0.ffn."),
    (r"\.dw1\.m\.", ".local1.dw."),
    (r"\.ffn1\.m\.", ".local1.ffn."),
    (r"\.mixer\.m\.attn\.", ".mixer."),
)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: EfficientViT) -> dict[str, Tensor]:
    """Adapt a state dict of timm's ``efficientvit_m*`` (or our own) to ``model``.

    Attention biases whose window differs from the model's are resampled (bicubic); training
    checkpoints are unwrapped as :func:`sepvit.models.state_dicts.unwrap_state_dict` does.
    """
    target = model.state_dict()
    out = {}
    for key, value in unwrap_state_dict(state_dict).items():
        if key.endswith("attention_bias_idxs"):
            continue
        key = rename_key(key, _TIMM_KEY_MAP)
        if key.endswith("attention_biases") and key in target and value.shape != target[key].shape:
            value = resize_rel_pos_bias_table_levit(value.T, target[key].shape[::-1]).T.contiguous()
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    # Preprocessing of the published weights (timm's efficientvit_m* cfgs); any input size runs.
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (4, 4),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.0.conv",
        "classifier": "head.linear",
        "fixed_input_size": False,
        "license": "mit",
        "paper_ids": "arXiv:2305.07027",
        "origin_url": "https://github.com/microsoft/Cream/tree/main/EfficientViT",
        **kwargs,
    }


_VARIANTS = {
    "m0": dict(embed_dim=(64, 128, 192), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(5, 5, 5, 5)),
    "m1": dict(embed_dim=(128, 144, 192), depth=(1, 2, 3), num_heads=(2, 3, 3), kernels=(7, 5, 3, 3)),
    "m2": dict(embed_dim=(128, 192, 224), depth=(1, 2, 3), num_heads=(4, 3, 2), kernels=(7, 5, 3, 3)),
    "m3": dict(embed_dim=(128, 240, 320), depth=(1, 2, 3), num_heads=(4, 3, 4), kernels=(5, 5, 5, 5)),
    "m4": dict(embed_dim=(128, 256, 384), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(7, 5, 3, 3)),
    "m5": dict(embed_dim=(192, 288, 384), depth=(1, 3, 4), num_heads=(3, 3, 4), kernels=(7, 5, 3, 3)),
}


# ImageNet-1k weights of the paper's authors, published on the Hugging Face hub in timm's format.
default_cfgs = generate_default_cfgs(
    {f"sv_efficientvit_{v}.r224_in1k": _cfg(hf_hub_id=f"timm/efficientvit_{v}.r224_in1k") for v in _VARIANTS}
)

# ImageNet-1k top-1 (%) of those weights as the paper publishes them in its table of models.
PUBLISHED_TOP1 = {
    f"sv_efficientvit_{v}.r224_in1k": top1
    for v, top1 in zip(_VARIANTS, (63.2, 68.4, 70.8, 73.4, 74.3, 77.1), strict=True)
}


def _create(variant: str, pretrained: bool = False, **kwargs) -> EfficientViT:
    model_args = dict(_VARIANTS[variant.rsplit("_", 1)[-1]], **kwargs)
    return build_with_weights(
        EfficientViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2)),
        **model_args,
    )


@register_model
def sv_efficientvit_m0(pretrained: bool = False, **kwargs) -> EfficientViT:
    return _create("sv_efficientvit_m0", pretrained, **kwargs)


@register_model
def sv_efficientvit_m1(pretrained: bool = False, **kwargs) -> EfficientViT:
    return _create("sv_efficientvit_m1", pretrained, **kwargs)


@register_model
def sv_efficientvit_m2(pretrained: bool = False, **kwargs) -> EfficientViT:
    return _create("sv_efficientvit_m2", pretrained, **kwargs)


@register_model
def sv_efficientvit_m3(pretrained: bool = False, **kwargs) -> EfficientViT:
    return _create("sv_efficientvit_m3", pretrained, **kwargs)


@register_model
def sv_efficientvit_m4(pretrained: bool = False, **kwargs) -> EfficientViT:
    return _create("sv_efficientvit_m4", pretrained, **kwargs)


@register_model
def sv_efficientvit_m5(pretrained: bool = False, **kwargs) -> EfficientViT:
    return _create("sv_efficientvit_m5", pretrained, **kwargs)
