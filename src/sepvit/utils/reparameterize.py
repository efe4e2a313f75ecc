"""Deploy mode: fold BatchNorm into the neighbouring convolution or linear layer.

In eval mode a BatchNorm is an affine map per channel, so it merges into the weights of a
convolution before it (Conv+BN) or of a linear layer after it (BN+Linear), removing one pass over
the activations per norm. The folded model gives the same outputs in eval mode and can no longer
be trained as before (the norms' statistics are gone).
"""

from __future__ import annotations

import copy

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fuse_bn_linear(bn: nn.BatchNorm1d, linear: nn.Linear) -> nn.Linear:
    """One Linear equal to ``linear(bn(x))`` with ``bn`` in eval mode."""
    with torch.no_grad():
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        fused = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
        fused.weight.copy_(linear.weight * scale[None, :])
        fused.bias.copy_(linear.weight @ shift + (linear.bias if linear.bias is not None else 0))
    return fused.to(linear.weight.dtype)


def _fuse_children(module: nn.Module) -> None:
    conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
    if isinstance(conv, nn.Conv2d) and type(bn) in (nn.BatchNorm2d, BatchNormAct2d):
        # timm's ConvNormAct and similar: `conv` then `bn`, the BN possibly carrying an activation.
        module.conv = fuse_conv_bn_eval(conv, bn)
        if isinstance(bn, BatchNormAct2d):
            module.bn = bn.act if isinstance(bn.drop, nn.Identity) else nn.Sequential(bn.drop, bn.act)
        else:
            module.bn = nn.Identity()
    for name, child in module.named_children():
        if hasattr(child, "fuse") and not isinstance(child, nn.Conv2d):
            # Modules that know how to fold themselves return their deploy replacement.
            setattr(module, name, child.fuse())
        else:
            _fuse_children(child)


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Deploy form of ``model`` in eval mode: Conv+BN and BN+Linear folded.

    Folds every module holding a ``conv`` (Conv2d) followed by a ``bn`` (BatchNorm2d, or timm's
    BatchNormAct2d whose activation is kept), and replaces every child that has a ``fuse()`` method
    by what it returns (timm's convention). Works on any model built from timm's ConvNormAct.

    Args:
        model: the model; it is switched to eval mode.
        inplace: fold ``model`` itself instead of a deep copy.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    _fuse_children(model)
    return model
