"""MobileViTv2 (Mehta & Rastegari, "Separable Self-attention for Mobile Vision Transformers", 2022).

Registered as ``sv_mobilevitv2_<width x 100>`` (``sv_mobilevitv2_050`` ... ``sv_mobilevitv2_200``); the
``sv_`` prefix keeps timm's own ``mobilevitv2_*`` loadable beside ours. A state dict of timm's
models loads through :func:`checkpoint_filter_fn` and gives the same outputs.

Layout: a 3x3 stride-2 stem, then five stages of inverted residual blocks (MobileNetV2 style, expand
ratio 2); stages 3-5 end with a MobileViTv2 block (depthwise 3x3 local mixing, 1x1 projection to
the transformer width, separable self-attention transformer layers on 2x2 patches, GroupNorm, 1x1
projection back). Feature strides 2, 4, 8, 16, 32.
"""

# No postponed annotations (``from __future__ import annotations``) here: torch.fx copies forward()'s
# annotations into the code it generates, and TorchScript cannot read a postponed one there.

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, ConvMlp, DropPath, GroupNorm1, make_divisible
from timm.models import (
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    register_notrace_module,
)
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from sepvit.layers.conv_norm import ConvNormAct
from sepvit.layers.linear_attention import LinearSelfAttention
from sepvit.models.state_dicts import build_with_weights, rename_key, unwrap_state_dict
from sepvit.utils.reparameterize import reparameterize

__all__ = ["MobileViTv2", "checkpoint_filter_fn"]

ConvNormSiLU = partial(ConvNormAct, act_layer=nn.SiLU)


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise kxk (may stride) -> 1x1 linear projection, residual when shapes match."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, expand_ratio: float = 2.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        mid_chs = make_divisible(in_chs * expand_ratio)
        self.conv_pw = ConvNormSiLU(in_chs, mid_chs, 1)
        self.conv_dw = ConvNormSiLU(mid_chs, mid_chs, 3, stride=stride, groups=mid_chs)
        self.conv_pwl = ConvNormAct(mid_chs, out_chs, 1)
        self.has_skip = in_chs == out_chs and stride == 1
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_pwl(self.conv_dw(self.conv_pw(x)))
        return x + self.drop_path(out) if self.has_skip else out


class LinearTransformerLayer(nn.Module):
    """Pre-norm transformer layer: separable self-attention and a 1x1-conv MLP, GroupNorm(1)."""

    def __init__(
        self,
        dim: int,
        patch_size: tuple[int, int],
        mlp_ratio: float = 2.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.attn = LinearSelfAttention(dim, patch_size, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = GroupNorm1(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=nn.SiLU, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


@register_notrace_module  # a torch.fx leaf: resizing depends on the input size
class MobileViTv2Block(nn.Module):
    """Local (depthwise conv) then global (separable self-attention) representation of a map.

    The reference attends on the unfolded patches; GroupNorm with one group normalises over every
    element of a sample, so the unfolded and the NCHW layout give the same result and the block
    works on the NCHW map throughout. Maps that are not a multiple of the patch are first resized
    (bilinear, corners aligned) to the next multiple, as in the reference.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        transformer_ratio: float = 0.5,
        patch_size: int = 2,
        mlp_ratio: float = 2.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float | list[float] = 0.0,
    ) -> None:
        super().__init__()
        width = make_divisible(dim * transformer_ratio)
        self.patch_size = (patch_size, patch_size)
        drop_paths = drop_path if isinstance(drop_path, list) else [drop_path] * depth
        self.conv_dw = ConvNormSiLU(dim, dim, 3, groups=dim)
        self.proj_in = nn.Conv2d(dim, width, 1, bias=False)
        self.layers = nn.Sequential(
            *[
                LinearTransformerLayer(width, self.patch_size, mlp_ratio, attn_drop, proj_drop, drop_paths[i])
                for i in range(depth)
            ]
        )
        self.norm = GroupNorm1(width)
        self.proj_out = ConvNormAct(width, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        patch_h, patch_w = self.patch_size
        size = (math.ceil(height / patch_h) * patch_h, math.ceil(width / patch_w) * patch_w)
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        x = self.proj_in(self.conv_dw(x))
        x = self.norm(self.layers(x))
        return self.proj_out(x)


class MobileViTv2(nn.Module):
    """MobileViTv2 classifier; ``width_multiplier`` scales every channel count.

    Args:
        width_multiplier: 0.5 ... 2.0 in the paper.
        in_chans: input channels.
        num_classes: classes of the head (0: no classifier).
        global_pool: pooling of the head ('avg', 'max', ... or '' for none).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly over the blocks to this value.
        attn_drop_rate: dropout on the context scores.
        proj_drop_rate: dropout after the attention and MLP projections.
        patch_size: patch of the separable self-attention.
        mlp_ratio: hidden width of the transformer MLPs.
    """

    def __init__(
        self,
        width_multiplier: float = 1.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        patch_size: int = 2,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.output_fmt = "NCHW"
        self.grad_checkpointing = False
        channels = [int(c * width_multiplier) for c in (64, 128, 256, 384, 512)]
        num_residual = (1, 2, 1, 1, 1)  # inverted residual blocks per stage
        depths = (0, 0, 2, 4, 3)  # transformer layers of the stage's MobileViTv2 block
        strides = (1, 2, 2, 2, 2)

        stem_chs = int(32 * width_multiplier)
        self.stem = ConvNormSiLU(in_chans, stem_chs, 3, stride=2)
        num_blocks = sum(num_residual) + sum(d > 0 for d in depths)
        block_dpr = iter(torch.linspace(0, drop_path_rate, num_blocks, device="cpu").tolist())
        stages, in_chs, reduction = [], stem_chs, 2
        self.feature_info = []
        for i, (out_chs, repeats, depth, stride) in enumerate(zip(channels, num_residual, depths, strides)):
            blocks: list[nn.Module] = []
            for j in range(repeats):
                s = stride if j == 0 else 1
                blocks.append(InvertedResidual(in_chs, out_chs, s, drop_path=next(block_dpr)))
                in_chs = out_chs
            if depth:
                blocks.append(
                    MobileViTv2Block(
                        out_chs,
                        depth,
                        patch_size=patch_size,
                        mlp_ratio=mlp_ratio,
                        attn_drop=attn_drop_rate,
                        proj_drop=proj_drop_rate,
                        drop_path=next(block_dpr),
                    )
                )
            reduction *= stride
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def fuse(self) -> "MobileViTv2":
        """Deploy mode, in place: Conv+BN folded (see :func:`sepvit.utils.reparameterize`)."""
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
        """Stage outputs (strides 2, 4, 8, 16, 32) selected by ``indices``, and optionally the final map."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if not stop_early and not intermediates_only else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        for i, stage in enumerate(stages):
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
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
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.head.in_features = self.num_features
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# timm's ByobNet names -> ours, applied in order.
_TIMM_KEY_MAP = (
    (r"\.conv1_1x1\.", ".conv_pw."),
    (r"\.conv2_kxk\.", ".conv_dw."),
    (r"\.conv3_1x1\.", ".conv_pwl."),
    (r"\.conv_kxk\.", ".conv_dw."),
    (r"\.conv_1x1\.", ".proj_in."),
    (r"\.conv_proj\.", ".proj_out."),
    (r"\.transformer\.", ".layers."),
    (r"\.attn\.qkv_proj\.", ".attn.qkv."),
    (r"\.attn\.out_proj\.", ".attn.proj."),
)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Adapt a state dict of timm's ``mobilevitv2_*`` (or the official cvnets port) to ours.

    Our own state dicts pass unchanged. Training checkpoints are unwrapped (EMA weights first) and
    DDP's ``module.`` prefix is dropped (:func:`sepvit.models.state_dicts.unwrap_state_dict`).
    """
    state_dict = unwrap_state_dict(state_dict)
    if not any(".conv1_1x1." in k or ".transformer." in k for k in state_dict):
        return state_dict
    return {rename_key(key, _TIMM_KEY_MAP): value for key, value in state_dict.items()}


def _cfg(**kwargs) -> dict:
    # Preprocessing of the published weights (timm's mobilevitv2_* cfgs); any input size runs.
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 256, 256),
        "pool_size": (8, 8),
        "crop_pct": 0.888,
        "interpolation": "bicubic",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "fixed_input_size": False,
        "license": "cvnets-license",
        "paper_ids": "arXiv:2206.02680",
        "origin_url": "https://github.com/apple/ml-cvnets",
        **kwargs,
    }


WIDTHS = ("050", "075", "100", "125", "150", "175", "200")
# Widths with ImageNet-21k-pretrained weights fine-tuned on ImageNet-1k (at 256 and at 384).
_IN22K_WIDTHS = ("150", "175", "200")


def _hub(width: str, tag: str) -> str:
    return f"timm/mobilevitv2_{width}.{tag}"


# The weights of the paper's authors (apple/ml-cvnets), published on the Hugging Face hub in timm's
# format; the first tag of a model is its default.
default_cfgs = generate_default_cfgs(
    {
        **{f"sv_mobilevitv2_{w}.cvnets_in1k": _cfg(hf_hub_id=_hub(w, "cvnets_in1k")) for w in WIDTHS},
        **{
            f"sv_mobilevitv2_{w}.cvnets_in22k_ft_in1k": _cfg(hf_hub_id=_hub(w, "cvnets_in22k_ft_in1k"))
            for w in _IN22K_WIDTHS
        },
        **{
            f"sv_mobilevitv2_{w}.cvnets_in22k_ft_in1k_384": _cfg(
                hf_hub_id=_hub(w, "cvnets_in22k_ft_in1k_384"),
                input_size=(3, 384, 384),
                pool_size=(12, 12),
                crop_pct=1.0,
            )
            for w in _IN22K_WIDTHS
        },
    }
)

# ImageNet-1k top-1 (%) at 256 of the ImageNet-1k weights as the paper publishes them; the paper's
# summary this project ships gives no figure for the ImageNet-21k fine-tuned ones.
PUBLISHED_TOP1 = {
    f"sv_mobilevitv2_{w}.cvnets_in1k": top1
    for w, top1 in zip(WIDTHS, (70.18, 75.56, 78.09, 79.65, 80.38, 80.84, 81.17), strict=True)
}


def _create(variant: str, width_multiplier: float, pretrained: bool = False, **kwargs) -> MobileViTv2:
    return build_with_weights(
        MobileViTv2,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3, 4)),
        width_multiplier=width_multiplier,
        **kwargs,
    )


@register_model
def sv_mobilevitv2_050(pretrained: bool = False, **kwargs) -> MobileViTv2:
    return _create("sv_mobilevitv2_050", 0.5, pretrained, **kwargs)


@register_model
def sv_mobilevitv2_075(pretrained: bool = False, **kwargs) -> MobileViTv2:
    return _create("sv_mobilevitv2_075", 0.75, pretrained, **kwargs)


@register_model
def sv_mobilevitv2_100(pretrained: bool = False, **kwargs) -> MobileViTv2:
    return _create("sv_mobilevitv2_100", 1.0, pretrained, **kwargs)


@register_model
def sv_mobilevitv2_125(pretrained: bool = False, **kwargs) -> MobileViTv2:
    return _create("sv_mobilevitv2_125", 1.25, pretrained, **kwargs)


@register_model
def sv_mobilevitv2_150(pretrained: bool = False, **kwargs) -> MobileViTv2:
    return _create("sv_mobilevitv2_150", 1.5, pretrained, **kwargs)


@register_model
def sv_mobilevitv2_175(pretrained: bool = False, **kwargs) -> MobileViTv2:
    return _create("sv_mobilevitv2_175", 1.75, pretrained, **kwargs)


@register_model
def sv_mobilevitv2_200(pretrained: bool = False, **kwargs) -> MobileViTv2:
    return _create("sv_mobilevitv2_200", 2.0, pretrained, **kwargs)
