"""Convolution, BatchNorm and an activation: timm's ``ConvNormAct`` with the functional ops called directly.

The parameters and their names are those of timm's ``ConvNormAct`` (``conv.weight``, ``bn.*``), so
state dicts of either load into the other. In eval mode the norm is one ``F.batch_norm`` call:
timm's ``BatchNormAct2d`` and ``nn.BatchNorm2d`` spend about as long in Python checks as a small
map's convolution takes, which at batch 1 adds up over a model's hundred-odd convolutions. Training
runs ``nn.BatchNorm2d`` itself (running statistics and ``num_batches_tracked`` update as usual).
:meth:`ConvNormAct.fuse` gives the deploy form, :class:`ConvAct`, with the norm folded into the
convolution and the same ``conv.*`` names.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class ConvNormAct(nn.Module):
    """Conv2d (no bias, 'same' padding for odd kernels), BatchNorm2d, then ``act_layer`` (or none).

    Args:
        in_chs, out_chs: channels.
        kernel_size: odd kernel side.
        stride: stride of the convolution.
        groups: convolution groups (``in_chs`` for depthwise).
        act_layer: activation class taking ``inplace`` (``nn.ReLU``, ``nn.SiLU``), applied in place
            as timm does; None for none.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.training:
            x = self.bn(x)
        else:
            bn = self.bn
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return self.act(x)

    def fuse(self) -> ConvAct:
        """Deploy form: the norm (eval statistics) folded into the convolution."""
        return ConvAct(fuse_conv_bn_eval(self.conv.eval(), self.bn.eval()), self.act)


class ConvAct(nn.Module):
    """A convolution with bias and an activation: :class:`ConvNormAct` with its norm folded."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))
