"""ONNX export of our models and timm's, verified against PyTorch in ONNX Runtime."""

from sepvit.export.onnx_export import (
    UNIVERSAL_OPERATORS,
    Comparison,
    ExportedModel,
    ExportError,
    ExportMismatchError,
    OperatorCensus,
    compare_outputs,
    default_tolerance,
    export_onnx,
    onnxruntime_session,
    operator_census,
    prepare_deploy,
)

__all__ = [
    "UNIVERSAL_OPERATORS",
    "Comparison",
    "ExportError",
    "ExportMismatchError",
    "ExportedModel",
    "OperatorCensus",
    "compare_outputs",
    "default_tolerance",
    "export_onnx",
    "onnxruntime_session",
    "operator_census",
    "prepare_deploy",
]
