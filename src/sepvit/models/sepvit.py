"""SepViT: Separable Vision Transformer (Li et al., https://arxiv.org/abs/2203.15380).

A four-stage hierarchy. Each stage starts with an overlapping patch merging (a strided convolution and
LayerNorm), runs its SepViT blocks and adds a conditional position encoding (a 3×3 depthwise
convolution plus identity) after its first block. A block is pre-norm: depthwise separable
self-attention (DSA inside M×M windows, each with a window token, then PSA among the windows) or, on
alternate blocks of stages 2 and 3, grouped self-attention (the same with 2M×2M windows), followed by
an MLP. The head is LayerNorm, global average pooling and a linear classifier.

Input size. The models take any input size. Windows that overhang a feature map are zero-padded and
the padded pixels are masked out of attention. The block structure is fixed when the model is built,
from the window grid at ``img_size`` (224 by default): a block whose feature map fits in one window
there has no window token and no PSA (plain global attention, as in the paper's 224 models) and keeps
attending over its whole map at any input size; the other blocks own one learnable window token per
window of that grid. When an input gives another window grid (another resolution, or a detection
image), the token grid is resized bilinearly to it, as position embeddings are, so every window
starts from the learned token of its relative position; at the build grid the tokens are used
unchanged. Build with ``img_size`` set to the working resolution (e.g. ``(800, 1333)`` for detection)
to give every block that has several windows there its own PSA; :func:`checkpoint_filter_fn` then
resizes a 224 checkpoint's window tokens to the new grid.
"""

import contextlib
import math
from collections.abc import Mapping

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sepvit.layers import (
    GlobalSelfAttention,
    LocalWindowAttention,
    Mlp,
    SeparableWindowAttention,
    grid_size,
)
from sepvit.layers.separable_window_attention import WindowRepresentation, WindowToken, resize_token_grid
from sepvit.models.state_dicts import build_with_weights, rename_key, unwrap_state_dict

__all__ = ["SepViT", "SepViTBlock", "checkpoint_filter_fn", "parse_block_plan"]

# The paper's notation for the blocks of each stage (Table 7): D = DSSA with M×M windows,
# G = GSA with 2M×2M windows, "D&G" = alternating, starting with D.
DEFAULT_BLOCK_PLAN = "D,D&G,D&G,D"
# What the blocks with several windows run: SepViT's DSSA/GSA, or the ablation study's baselines,
# attention inside each window only ("local") or Swin's alternating plain and shifted windows.
WINDOW_ATTENTIONS = ("separable", "local", "shifted")


def parse_block_plan(plan: str, depths: tuple[int, ...], window_size: int) -> list[list[int]]:
    """Window size of every block, from a plan in the paper's notation such as ``"D,D&G,D&G,D"``."""
    stage_plans = [part.strip().upper() for part in plan.split(",")]
    if len(stage_plans) != len(depths):
        raise ValueError(f"block plan {plan!r} has {len(stage_plans)} stages, the model has {len(depths)}")
    sizes = {"D": window_size, "G": 2 * window_size}
    window_sizes = []
    for stage_plan, depth in zip(stage_plans, depths):
        kinds = stage_plan.split("&")
        if not all(kind in sizes for kind in kinds):
            raise ValueError(f"block plan {plan!r}: each stage is D, G or an alternation such as D&G")
        window_sizes.append([sizes[kinds[i % len(kinds)]] for i in range(depth)])
    return window_sizes


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch merging: a strided convolution, then LayerNorm; NCHW in, NHWC out."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConditionalPositionEncoding(nn.Module):
    """CPE / PEG (Chu et al.): a 3×3 depthwise convolution added to its input; NHWC in and out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SepViTBlock(nn.Module):
    """SepViT block, Eq. (5)–(9): ``x + Attn(LN(Concat(x, wt)))`` then ``x + MLP(LN(x))``, on NHWC maps.

    The attention is :class:`SeparableWindowAttention` (DSSA, or GSA for a 2M window) when the map at
    the build size holds several windows (``grid_size`` > 1×1), else :class:`GlobalSelfAttention`;
    ``window_attention="local"`` puts :class:`LocalWindowAttention` (no window token, no PSA) in place of
    the former, ``"shifted"`` the same on windows shifted by ``shift_size`` pixels (Swin's SW-MSA).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        grid_size: tuple[int, int] = (8, 8),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        window_token: WindowToken = "learnable",
        window_representation: WindowRepresentation = "token",
        window_attention: str = "separable",
        shift_size: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if tuple(grid_size) == (1, 1):
            self.attn = GlobalSelfAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        elif window_attention in ("local", "shifted"):
            shift = shift_size if window_attention == "shifted" else 0
            self.attn = LocalWindowAttention(
                dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, shift
            )
        else:
            self.attn = SeparableWindowAttention(
                dim,
                num_heads,
                window_size,
                tuple(grid_size),
                qkv_bias,
                attn_drop,
                proj_drop,
                window_token,
                window_representation,
            )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # Eq. (5)-(6): the window tokens are normalised by norm1 together with the pixels (LayerNorm is
        # per token, so normalising them apart is the same), and DSA's shortcut carries LN(wt) on.
        tokens = self.attn.window_tokens_for(x)
        normed_tokens = None if tokens is None else self.norm1(tokens)
        x = x + self.drop_path1(self.attn(self.norm1(x), normed_tokens))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SepViTStage(nn.Module):
    """Patch merging, the blocks, and the position encoding after the first block.

    NCHW in, NCHW out: the blocks work on channels-last maps and the output is their NCHW view (a
    ``channels_last`` tensor, no copy), which the next stage's convolution takes as it is.
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        num_heads: int,
        window_sizes: list[int],
        feature_size: tuple[int, int],
        first_stage: bool,
        drop_rate: float,
        drop_path_rates: list[float],
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = OverlapPatchEmbed(in_chans, dim, 7 if first_stage else 3, 4 if first_stage else 2)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            SepViTBlock(
                dim,
                num_heads,
                window_size,
                grid_size(*feature_size, window_size),
                proj_drop=drop_rate,
                drop_path=rate,
                shift_size=window_size // 2 if index % 2 else 0,  # Swin: every second block shifted
                **block_kwargs,
            )
            for index, (window_size, rate) in enumerate(zip(window_sizes, drop_path_rates))
        )
        self.pos_embed = ConditionalPositionEncoding(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos_drop(self.downsample(x))
        for index, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if index == 0:
                x = self.pos_embed(x)
        return x.permute(0, 3, 1, 2)


class SepViT(nn.Module):
    """Separable Vision Transformer.

    Args:
        img_size: input size the window grids (and so the window tokens) are built for; any input
            size runs (see the module docstring for what the window tokens do at other sizes).
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: ``"avg"`` or ``""`` (no pooling).
        embed_dims, depths, num_heads: per stage.
        window_size: M, the DSSA window; GSA uses 2M.
        block_plan: blocks of each stage in the paper's notation (Table 7), e.g. ``"D,D&G,D&G,D"``
            (default), ``"D,D,D,D"`` (DSSA only) or ``"D,G&D,G&D,D"``.
        window_token: ``"learnable"`` or ``"zero"`` (Table 5).
        window_representation: ``"token"``, ``"avgpool"`` or ``"dwconv"`` (Table 6).
        window_attention: what the blocks with several windows run: ``"separable"`` (SepViT's DSSA
            and GSA), or the ablation study's baselines: ``"local"`` (attention inside each window,
            nothing among windows: no window tokens, no PSA) or ``"shifted"`` (Swin's W-MSA and, on
            every second block of a stage, SW-MSA shifted by half a window: with SepViT's stem,
            merging and position encoding, the paper's "Swin + CPVT"). The plan's window sizes still
            apply (``block_plan="D,D,D,D"`` gives M×M windows throughout).
        mlp_ratio, qkv_bias: block options.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after patch merging, projections, MLP and
            before the classifier; attention dropout; stochastic depth, rising linearly to this rate.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (96, 192, 384, 768),
        depths: tuple[int, ...] = (1, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        block_plan: str = DEFAULT_BLOCK_PLAN,
        window_token: WindowToken = "learnable",
        window_representation: WindowRepresentation = "token",
        window_attention: str = "separable",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', not {global_pool!r}")
        if window_attention not in WINDOW_ATTENTIONS:
            raise ValueError(
                f"window_attention must be one of {', '.join(WINDOW_ATTENTIONS)}, not {window_attention!r}"
            )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = "NHWC"  # of forward_features, as timm's Swin
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.img_size = to_2tuple(img_size)
        self.block_plan = block_plan
        window_sizes = parse_block_plan(block_plan, depths, window_size)
        # Stochastic depth rises linearly over all blocks (plain floats: the model may be built on "meta").
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        first_block = [sum(depths[:i]) for i in range(len(depths))]

        self.stages = nn.Sequential()
        self.feature_info = []
        in_dim, height, width = in_chans, *self.img_size
        for index, (dim, heads) in enumerate(zip(embed_dims, num_heads)):
            stride = 4 if index == 0 else 2
            height, width = (height - 1) // stride + 1, (width - 1) // stride + 1
            self.stages.append(
                SepViTStage(
                    in_dim,
                    dim,
                    heads,
                    window_sizes[index],
                    (height, width),
                    index == 0,
                    drop_rate,
                    rates[first_block[index] : first_block[index] + depths[index]],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    window_token=window_token,
                    window_representation=window_representation,
                    window_attention=window_attention,
                    attn_drop=attn_drop_rate,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**index, module=f"stages.{index}"))
            in_dim = dim

        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Window tokens, norms and biases: excluded from weight decay."""
        return {
            name
            for name, param in self.named_parameters()
            if name.endswith("window_tokens") or param.ndim <= 1
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stages\.0\.downsample",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.(?:downsample|pos_embed)", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none) on the current features, pooled by
        ``global_pool`` (``"avg"``, or ``""`` for the map; None keeps the current pooling)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        reference = next(self.parameters())
        head = ClassifierHead(
            self.num_features, num_classes, self.global_pool, self.drop_rate, input_fmt="NHWC"
        )
        self.head = head.to(reference.device, reference.dtype).train(self.training)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs as NCHW maps (strides 4, 8, 16, 32), and the final features unless only those.

        ``indices``: the last n stages if an int, all if None, else the stages listed; ``norm`` applies
        the final norm to the last stage's map; ``stop_early`` runs no stage after the last one taken.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', not {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        intermediates = []
        index = 0
        for index, stage in enumerate(self.stages):
            if stop_early and index > max_index:
                break
            x = stage(x)
            if index in take_indices:
                feature = (
                    self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if norm and index == last else x
                )
                intermediates.append(feature.contiguous())
        if intermediates_only:
            return intermediates
        x = x.permute(0, 2, 3, 1)
        if index == last:  # the final norm is sized for (and applied to) the last stage only
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        pruned_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normed last-stage features (B, H/32, W/32, C), channels last."""
        return self.norm(self.stages(x).permute(0, 2, 3, 1))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# Key renames from the official implementation (github.com/liwei109/SepViT) to this one.
_OFFICIAL_KEY_RENAMES = (
    (r"^patch_embeds\.(\d+)\.", r"stages.\1.downsample."),
    (r"^pos_block\.(\d+)\.proj\.0\.", r"stages.\1.pos_embed.proj."),
    (r"^blocks\.(\d+)\.(\d+)\.win_tokens$", r"stages.\1.blocks.\2.attn.window_tokens"),
    (r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.attn\.DSA_qkv\.", ".attn.qkv."),
    (r"\.attn\.win_tokens_norm\.", ".attn.psa.norm."),
    (r"\.attn\.PSA_qk\.", ".attn.psa.qk."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)


def resize_window_tokens(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Window tokens (1, gh, gw, C) (or the official (1, N, 1, C) on a square grid) -> (1, *grid, C)."""
    if tokens.ndim == 4 and tokens.shape[2] == 1 and tokens.shape[1] != 1:
        side = math.isqrt(tokens.shape[1])
        tokens = tokens.reshape(1, side, tokens.shape[1] // side, tokens.shape[-1])
    if tuple(tokens.shape[1:3]) == tuple(grid):
        return tokens
    return resize_token_grid(tokens.float(), tuple(grid)).to(tokens.dtype)


def checkpoint_filter_fn(state_dict: Mapping[str, object], model: SepViT) -> dict[str, Tensor]:
    """Adapt a SepViT checkpoint (ours or the official one) to ``model``.

    Accepts a bare state dict or one wrapped under ``model`` / ``state_dict`` / ``state_dict_ema``,
    with or without a DDP ``module.`` prefix; renames the official implementation's keys; resizes
    window tokens to the model's window grids. Keys the model lacks are kept, so that loading reports
    them.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(key.startswith("patch_embeds.") for key in state_dict):
        state_dict = {rename_key(key, _OFFICIAL_KEY_RENAMES): value for key, value in state_dict.items()}
    model_state = model.state_dict()
    return {
        key: resize_window_tokens(value, model_state[key].shape[1:3])
        if key.endswith("window_tokens") and key in model_state
        else value
        for key, value in state_dict.items()
    }


def _create_sepvit(
    variant: str,
    pretrained: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> SepViT:
    """``device`` (``"meta"`` builds without storage) and ``dtype`` are timm's factory options."""
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", (0, 1, 2, 3)), feature_cls="getter")
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_with_weights(
            SepViT,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=feature_cfg,
            **kwargs,
        )
    return model if dtype is None else model.to(dtype)


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.downsample.proj",
        "classifier": "head.fc",
        "paper_ids": "arXiv:2203.15380",
        "paper_name": "SepViT: Separable Vision Transformer",
        "origin_url": "https://github.com/liwei109/SepViT",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "sepvit_lite.untrained": _cfg(),
        "sepvit_tiny.untrained": _cfg(),
        "sepvit_small.untrained": _cfg(),
        "sepvit_base.untrained": _cfg(),
    }
)

_VARIANTS = {
    "sepvit_lite": dict(embed_dims=(32, 64, 128, 256), depths=(1, 2, 6, 2), num_heads=(1, 2, 4, 8)),
    "sepvit_tiny": dict(embed_dims=(96, 192, 384, 768), depths=(1, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "sepvit_small": dict(embed_dims=(96, 192, 384, 768), depths=(1, 2, 14, 2), num_heads=(3, 6, 12, 24)),
    "sepvit_base": dict(embed_dims=(128, 256, 512, 1024), depths=(1, 2, 14, 2), num_heads=(4, 8, 16, 32)),
}


def _build(variant: str, pretrained: bool, kwargs: dict) -> SepViT:
    return _create_sepvit(variant, pretrained, **{**_VARIANTS[variant], **kwargs})


@register_model
def sepvit_lite(pretrained: bool = False, **kwargs) -> SepViT:
    """SepViT-Lite: 3.7M params, 0.6 GMACs at 224 (paper Table 9)."""
    return _build("sepvit_lite", pretrained, kwargs)


@register_model
def sepvit_tiny(pretrained: bool = False, **kwargs) -> SepViT:
    """SepViT-T: 31.2M params, 4.5 GMACs at 224, 82.7% ImageNet top-1 (paper Table 2)."""
    return _build("sepvit_tiny", pretrained, kwargs)


@register_model
def sepvit_small(pretrained: bool = False, **kwargs) -> SepViT:
    """SepViT-S: 46.6M params, 7.5 GMACs at 224, 83.6% ImageNet top-1 (paper Table 2)."""
    return _build("sepvit_small", pretrained, kwargs)


@register_model
def sepvit_base(pretrained: bool = False, **kwargs) -> SepViT:
    """SepViT-B: 82.3M params, 13.1 GMACs at 224, 84.2% ImageNet top-1 (paper Table 2)."""
    return _build("sepvit_base", pretrained, kwargs)
