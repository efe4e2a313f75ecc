"""Parameter and multiply-accumulate counts in the convention of the papers.

Papers in this field report "FLOPs" that are multiply-accumulates (MACs) over convolutions, linear
layers and matrix products. ``torch.utils.flop_counter`` counts two FLOPs per MAC, so the total is
halved. Attention is forced onto the math path so that fused kernels are counted too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those that require a gradient)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _example_input(model: nn.Module, input_size: tuple[int, ...], batch_size: int) -> torch.Tensor:
    """Zeros of ``input_size`` on the device and in the floating dtype of ``model``'s parameters."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(batch_size, *input_size, device=device, dtype=dtype)


@torch.no_grad()
def count_macs(
    model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224), batch_size: int = 1
) -> int:
    """Multiply-accumulates of one forward pass in eval mode, attention included."""
    inputs = _example_input(model, input_size, batch_size)
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_training_macs(
    model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224), batch_size: int = 1
) -> int:
    """Multiply-accumulates of one training step without the optimiser: forward in train mode and
    backward (gradients of the weights and of the activations), attention included. Buffers (batch
    norm statistics) are restored afterwards and gradients reset to ``None``."""
    inputs = _example_input(model, input_size, batch_size)
    was_training = model.training
    buffers = [buffer.clone() for buffer in model.buffers()]
    model.train()
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(inputs).float().mean().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
    return counter.get_total_flops() // 2
