"""Reusable attention blocks, each mirroring its paper's equations."""

from sepvit.layers.cascaded_group_attention import CascadedGroupAttention
from sepvit.layers.fused_linear import FusedLinear, FusedMlp
from sepvit.layers.linear_attention import LinearSelfAttention
from sepvit.layers.separable_window_attention import (
    GlobalSelfAttention,
    PointwiseSelfAttention,
    SeparableWindowAttention,
    depthwise_self_attention,
)
from sepvit.layers.windows import grid_size, window_padding_mask, window_partition, window_reverse

__all__ = [
    "CascadedGroupAttention",
    "FusedLinear",
    "FusedMlp",
    "GlobalSelfAttention",
    "LinearSelfAttention",
    "PointwiseSelfAttention",
    "SeparableWindowAttention",
    "depthwise_self_attention",
    "grid_size",
    "window_padding_mask",
    "window_partition",
    "window_reverse",
]
