"""Linear layers whose inference runs fused: the bias, and the GELU after an MLP's first layer.

``nn.Linear`` on the CPU first copies the bias into every row of its output, then accumulates the
matrix product onto it, and a following GELU reads and writes the output once more: three passes
over maps that are far larger than the caches (a 16 × 56 × 56 × 384 MLP hidden map is 77 MiB).
oneDNN's linear applies the bias and the activation while it writes each output tile. The fused
path runs only where it is exact and invisible: CPU inference (no autograd, which the oneDNN op
lacks) outside tracing, compiling, exporting and dispatch modes such as the FLOP counter, so
MAC counts are those of the plain layers. The parameters are those of ``nn.Linear`` and
``timm.layers.Mlp``, so state dicts are unchanged.

Under ``torch.export`` (ONNX export) the layers are written in the forms ONNX Runtime fuses: a
linear on a 2-D view becomes one ``Gemm`` with the bias inside (on more dimensions it is ``MatMul``
then ``Add``), and GELU is written in the operand order that its Gelu fusion matches (the opset-18
exporter's own decomposition is not matched, which leaves five elementwise nodes per GELU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sepvit.layers.tracing import exporting

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN_LINEAR = _onednn_linear_available()


def use_fused_linear(x: Tensor) -> bool:
    """True where :class:`FusedLinear` and :class:`FusedMlp` take the oneDNN path for input ``x``."""
    return (
        _ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype in _FUSED_DTYPES
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
    )


def fused_linear(x: Tensor, layer: nn.Linear, activation: str = "none") -> Tensor:
    """``activation(layer(x))`` in one oneDNN call; ``activation`` is ``"none"`` or ``"gelu"`` (erf)."""
    return torch.ops.mkldnn._linear_pointwise(
        x, layer.weight, layer.bias, activation, [], "none" if activation == "gelu" else ""
    )


def linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """``layer(x)``: fused by oneDNN in CPU inference, a 2-D ``Gemm`` under export."""
    if use_fused_linear(x):
        return fused_linear(x, layer)
    if exporting():
        flat = F.linear(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)
        return flat.view(*x.shape[:-1], flat.shape[-1])
    return F.linear(x, layer.weight, layer.bias)


class FusedLinear(nn.Linear):
    """``nn.Linear`` whose inference runs with the bias fused into the matrix product."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self)


class Gelu(nn.GELU):
    """Exact (erf) GELU, written out under export as ``(x * 0.5) * (erf(x / √2) + 1)``.

    That order is the one ONNX Runtime fuses into a single Gelu node.
    """

    def forward(self, x: Tensor) -> Tensor:
        if exporting():
            return (x * 0.5) * (torch.erf(x / math.sqrt(2.0)) + 1.0)
        return super().forward(x)


class FusedMlp(nn.Module):
    """The transformer MLP ``fc2(drop(GELU(fc1(x))))`` with timm's ``Mlp`` parameter names.

    In CPU inference ``fc1`` and the GELU are one oneDNN call and ``fc2`` another.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = Gelu()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and use_fused_linear(x):
            return fused_linear(fused_linear(x, self.fc1, "gelu"), self.fc2)
        if exporting():  # one 2-D view for both layers, so each is a Gemm
            return self.mlp(x.reshape(-1, x.shape[-1])).view(x.shape)
        return self.mlp(x)

    def mlp(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
