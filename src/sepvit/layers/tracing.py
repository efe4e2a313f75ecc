"""Whether ``torch.export`` is tracing: layers then write themselves in the forms ONNX Runtime fuses."""

from __future__ import annotations

import torch


def exporting() -> bool:
    """True while ``torch.export`` traces non-strictly, as :func:`sepvit.export.export_onnx` does.

    ``torch.compiler.is_exporting()`` alone also answers True inside ``torch.compile`` on some PyTorch
    releases (2.11 among them), which would give compiled models the export forms and a graph break.
    """
    return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()
