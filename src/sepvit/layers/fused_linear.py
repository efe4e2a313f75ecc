"""Linear layers, the MLP, GELU and attention, in the forms :func:`sepvit.layers.prepare_for` picks.

Models are built with the plain forms (:class:`Linear`, :class:`Mlp`, :class:`Gelu`,
:class:`ScaledDotProductAttention`): PyTorch's own operators, so training, autocast, every dtype and
device, ``torch.compile``, TorchScript, ``torch.fx`` and the FLOP counter see ordinary layers. The
other forms are subclasses with the same parameters (state dicts never change) and another
``forward``; :func:`~sepvit.layers.prepare_for` swaps a model into one of them once:

* ``"cpu_inference"``: :class:`OneDnnLinear` and :class:`OneDnnMlp` run each linear as one oneDNN
  call with the bias, and the MLP's GELU, fused into the matrix product. ``nn.Linear`` on the CPU
  first copies the bias into every row of its output, then accumulates the product onto it, and a
  following GELU reads and writes the output once more: three passes over maps far larger than the
  caches (a 16 × 56 × 56 × 384 MLP hidden map is 77 MiB). The oneDNN operator is private
  (``torch.ops.mkldnn._linear_pointwise``) and has no autograd, so it runs only where it was probed
  to exist and agree with ``F.linear`` (per dtype), on CPU inputs of the weight's dtype, outside
  autocast, without autograd and outside ``torch.compile`` (which sees the plain form); anywhere
  else these layers compute the plain form.
* ``"export"``: :class:`ExportLinear`, :class:`ExportMlp`, :class:`ExportGelu` and
  :class:`ExportScaledDotProductAttention` are written in the forms ONNX Runtime fuses: a linear on
  a 2-D view is one ``Gemm`` with the bias inside (on more dimensions it is ``MatMul`` then ``Add``),
  queries, keys and values are separate products (no split of one wide output) of weights sliced
  from the qkv parameter, which :func:`sepvit.export.export_onnx` folds into initializers of their
  own (constant weights, as ONNX Runtime's int8 quantiser needs them), GELU is written in
  the operand order its Gelu fusion matches (the opset-18 exporter's own decomposition leaves five
  elementwise nodes), and attention is ``softmax(q kᵀ / √d) v``, whose key transpose ONNX Runtime
  folds into its ``FusedMatMul``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Linear):
    """``nn.Linear`` that also gives its output cut into equal parts (queries, keys, values)."""

    def forward_parts(self, x: Tensor, parts: int) -> list[Tensor]:
        """``self(x)`` split into ``parts`` along the last axis (views, no copy)."""
        return self.forward(x).chunk(parts, dim=-1)


class Gelu(nn.GELU):
    """Exact (erf) GELU."""


class Mlp(nn.Module):
    """The transformer MLP ``fc2(drop(GELU(fc1(x))))``, with timm's ``Mlp`` parameter names."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = Gelu()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class ScaledDotProductAttention(nn.Module):
    """``softmax(q kᵀ / √d) v``; ``attn_mask`` marks (True) the keys each query may attend to."""

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
    ) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


# ------------------------------------------------------------------------------------ CPU inference


@functools.cache
def onednn_linear_dtypes() -> frozenset[torch.dtype]:
    """Dtypes in which oneDNN's fused linear exists on this build and agrees with ``F.linear``.

    Probed once on small tensors, so that a PyTorch release that drops or changes the private
    operator leaves the plain layers in place instead of failing.
    """
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return frozenset()
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((5, 16), (24, 16), (24,)))
    working = set()
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        args = (x.to(dtype), weight.to(dtype), bias.to(dtype))
        try:
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                fused = torch.ops.mkldnn._linear_pointwise(*args, "gelu", [], "none")
        except RuntimeError:
            continue
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            expected = F.gelu(F.linear(*(a.float() for a in args)))
        if fused.shape == expected.shape and torch.allclose(
            fused.float(), expected, atol=tolerance, rtol=tolerance
        ):
            working.add(dtype)
    return frozenset(working)


def onednn_applies(x: Tensor, layer: nn.Linear) -> bool:
    """True where the fused oneDNN operator computes exactly what ``layer(x)`` would."""
    # Checked first, so that Dynamo traces no further: Inductor can lower the operator only for frozen
    # weights (its ``freezing`` option), and there it packs plain linears for its own kernels anyway.
    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == layer.weight.dtype
        and x.dtype in onednn_linear_dtypes()
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
    )


def onednn_linear(x: Tensor, layer: nn.Linear, activation: str = "none") -> Tensor:
    """``activation(layer(x))`` in one oneDNN call; ``activation`` is ``"none"`` or ``"gelu"`` (erf)."""
    return torch.ops.mkldnn._linear_pointwise(
        x, layer.weight, layer.bias, activation, [], "none" if activation == "gelu" else ""
    )


class OneDnnLinear(Linear):
    """:class:`Linear` whose inference runs with the bias fused into oneDNN's matrix product."""

    def forward(self, x: Tensor) -> Tensor:
        if onednn_applies(x, self):
            return onednn_linear(x, self)
        return F.linear(x, self.weight, self.bias)


class OneDnnMlp(Mlp):
    """:class:`Mlp` whose inference is two oneDNN calls: ``fc1`` with the GELU fused in, then ``fc2``."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and onednn_applies(x, self.fc1):
            return onednn_linear(onednn_linear(x, self.fc1, "gelu"), self.fc2)
        return super().forward(x)


# ------------------------------------------------------------------------------------------- export


class ExportLinear(Linear):
    """:class:`Linear` on a 2-D view (one ``Gemm``), its parts as separate products."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        flat = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return flat.view(*x.shape[:-1], flat.shape[-1])

    def forward_parts(self, x: Tensor, parts: int) -> list[Tensor]:
        flat = x.reshape(-1, x.shape[-1])
        width = self.out_features // parts
        projected = []
        for start in range(0, self.out_features, width):
            rows = slice(start, start + width)  # a slice, not chunk(): export_onnx folds it into a weight
            bias = None if self.bias is None else self.bias[rows]
            projected.append(F.linear(flat, self.weight[rows], bias).view(*x.shape[:-1], width))
        return projected


class ExportGelu(Gelu):
    """Exact GELU written as ``(x * 0.5) * (erf(x / √2) + 1)``, the order ONNX Runtime fuses into one Gelu."""

    def forward(self, x: Tensor) -> Tensor:
        return (x * 0.5) * (torch.erf(x / math.sqrt(2.0)) + 1.0)


class ExportMlp(Mlp):
    """:class:`Mlp` on one 2-D view for both layers, so that each is a ``Gemm``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


class ExportScaledDotProductAttention(ScaledDotProductAttention):
    """Attention as two products and a softmax: ONNX Runtime folds the transposed keys into its MatMul,
    which it cannot do with the exported SDPA (it scales the transposed keys first)."""

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
    ) -> Tensor:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
