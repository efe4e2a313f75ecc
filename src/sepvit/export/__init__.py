"""ONNX export of our models and timm's, verified against PyTorch in ONNX Runtime."""

from sepvit.export.onnx_export import (
    UNIVERSAL_OPERATORS,
    Comparison,
    ExportedModel,
    ExportError,
    ExportMismatchError,
    OperatorCensus,
    check_shapes_for,
    compare_outputs,
    default_tolerance,
    export_onnx,
    onnxruntime_session,
    operator_census,
    prepare_deploy,
)
from sepvit.export.quantize import (
    QuantizationReport,
    kernel_census,
    quantize_int8,
    quantize_qdq,
    sensitive_nodes,
)

__all__ = [
    "UNIVERSAL_OPERATORS",
    "Comparison",
    "ExportError",
    "ExportMismatchError",
    "ExportedModel",
    "OperatorCensus",
    "QuantizationReport",
    "check_shapes_for",
    "compare_outputs",
    "default_tolerance",
    "export_onnx",
    "kernel_census",
    "onnxruntime_session",
    "operator_census",
    "prepare_deploy",
    "quantize_int8",
    "quantize_qdq",
    "sensitive_nodes",
]
