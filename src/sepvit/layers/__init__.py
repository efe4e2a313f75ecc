"""Reusable attention blocks, each mirroring its paper's equations, and the forms they run in."""

from sepvit.layers.cascaded_group_attention import CascadedGroupAttention
from sepvit.layers.forms import FORMS, prepare_for
from sepvit.layers.fused_linear import Gelu, Linear, Mlp, ScaledDotProductAttention
from sepvit.layers.linear_attention import LinearSelfAttention
from sepvit.layers.separable_window_attention import (
    DepthwiseSelfAttention,
    GlobalSelfAttention,
    LocalWindowAttention,
    PointwiseSelfAttention,
    SeparableWindowAttention,
)
from sepvit.layers.windows import grid_size, window_padding_mask, window_partition, window_reverse

__all__ = [
    "FORMS",
    "CascadedGroupAttention",
    "DepthwiseSelfAttention",
    "Gelu",
    "GlobalSelfAttention",
    "Linear",
    "LinearSelfAttention",
    "LocalWindowAttention",
    "Mlp",
    "PointwiseSelfAttention",
    "ScaledDotProductAttention",
    "SeparableWindowAttention",
    "grid_size",
    "prepare_for",
    "window_padding_mask",
    "window_partition",
    "window_reverse",
]
