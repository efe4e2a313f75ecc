"""The one place where a model's layers get their fast or export forms: :func:`prepare_for`.

Models are built with the plain forms. ``prepare_for(model, form)`` swaps, once, every layer of
``sepvit.layers`` in ``model`` for its form (a subclass with the same parameters and another
``forward``, see :mod:`sepvit.layers.fused_linear`); layers of other libraries are left alone, so it
applies to any model. Nothing is decided per call except the oneDNN layers' guards (device, dtype,
autocast, autograd, ``torch.compile``), which fall back to the plain computation.
"""

from __future__ import annotations

from typing import Literal, TypeVar

from torch import nn

from sepvit.layers.fused_linear import (
    ExportGelu,
    ExportLinear,
    ExportMlp,
    ExportScaledDotProductAttention,
    Gelu,
    Linear,
    Mlp,
    OneDnnLinear,
    OneDnnMlp,
    ScaledDotProductAttention,
    onednn_linear_dtypes,
)
from sepvit.layers.separable_window_attention import LocalWindowAttention, SeparableWindowAttention

Form = Literal["plain", "cpu_inference", "export"]
FORMS: tuple[str, ...] = ("plain", "cpu_inference", "export")
ModuleT = TypeVar("ModuleT", bound=nn.Module)

_PLAIN = (Linear, Mlp, Gelu, ScaledDotProductAttention)
_SWAPS: dict[str, dict[type[nn.Module], type[nn.Module]]] = {
    "plain": {},
    "cpu_inference": {Linear: OneDnnLinear, Mlp: OneDnnMlp},
    "export": {
        Linear: ExportLinear,
        Mlp: ExportMlp,
        Gelu: ExportGelu,
        ScaledDotProductAttention: ExportScaledDotProductAttention,
    },
}


def _plain_class(module: nn.Module) -> type[nn.Module] | None:
    return next((cls for cls in type(module).__mro__ if cls in _PLAIN), None)


def prepare_for(model: ModuleT, form: Form, *, dynamic_size: bool = True) -> ModuleT:
    """Put ``model``'s layers in ``form``, in place, and return ``model``.

    * ``"plain"``: PyTorch's own operators (how models are built): training, autocast, any dtype
      and device, ``torch.compile``, TorchScript, ``torch.fx``, FLOP counting.
    * ``"cpu_inference"``: linears (and the MLP's first linear with its GELU) as single oneDNN calls
      with the bias fused in, where this PyTorch build has the operator for the input's dtype;
      elsewhere (autograd, autocast, ``torch.compile``, another device or dtype) the same layers
      compute the plain form.
    * ``"export"``: the forms ONNX Runtime fuses, for ``torch.export``; with ``dynamic_size`` the
      window code pads, masks and resizes at every size, so that one graph serves every input size
      (``dynamic_size=False`` gives the leaner graph of the traced size only).

    Parameters, buffers and state dicts are unchanged; prepare again with ``"plain"`` to undo.
    """
    if form not in _SWAPS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, not {form!r}")
    swaps = _SWAPS[form]
    if form == "cpu_inference" and not onednn_linear_dtypes():
        swaps = {}  # this PyTorch build has no working oneDNN linear: the plain layers stay
    for module in model.modules():
        plain = _plain_class(module)
        if plain is not None:
            # Same parameters and buffers, another forward: the subclasses add no state.
            module.__class__ = swaps.get(plain, plain)
        if isinstance(module, (SeparableWindowAttention, LocalWindowAttention)):
            module.size_independent = form == "export" and dynamic_size
    return model
