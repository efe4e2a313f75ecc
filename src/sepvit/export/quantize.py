"""Static int8 quantisation of an exported ONNX model, with an accuracy gate.

ONNX Runtime's static quantiser writes a QDQ graph, calibrated by min-max on images the user names:
the inputs of every matrix product (Conv, Gemm, MatMul) pass through QuantizeLinear/DequantizeLinear
(weights signed int8 per output channel, activations unsigned int8 per tensor: the u8×s8 products
VNNI computes in one instruction), and ONNX Runtime runs those products as int8 kernels (QGemm,
QLinearConv, MatMulIntegerToFloat). Gemm and MatMul outputs stay float, and so do the elementwise
operators, softmax and LayerNorm: quantising them too adds a requantisation at every node and
breaks ONNX Runtime's Gelu fusion, which made the whole graph barely faster than fp32. Every weight
must be an initializer for the quantiser to treat it as one: :func:`~sepvit.export.export_onnx`
folds the q/k/v weights that the export form slices out of a qkv parameter into initializers.

The gate measures top-1 of the float and the int8 graph on held-out images. When int8 loses more
than ``max_drop`` points, the quantiser runs again with the nodes quantisation hurts most kept in
float (:func:`sensitive_nodes`: softmax and what takes its probabilities, LayerNorm, the residual
additions and the classifier head); if that still loses too much, nothing is written and
:class:`~sepvit.errors.ExportError` says by how much.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sepvit.errors import ExportError
from sepvit.utils.extras import require
from sepvit.utils.files import new_file_mode
from sepvit.utils.onnx_runtime import METADATA_KEY

SENSITIVE_OPERATORS = frozenset({"Softmax", "LayerNormalization"})  # besides residual adds and the head
PRODUCTS = ("Conv", "Gemm", "MatMul")  # the operators quantised
LAYOUT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Identity"})
# Operators of ONNX Runtime's optimised CPU graph that compute in int8.
INT8_KERNELS = frozenset(
    {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul",
     "QLinearSoftmax", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
     "QLinearLeakyRelu", "QLinearConcat", "QLinearReduceMean", "QAttention", "DynamicQuantizeMatMul",
     "MatMulIntegerToFloat", "NhwcQLinearConv"}
)  # fmt: skip
FLOAT_PRODUCTS = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "Einsum"})
KEPT_IN_FLOAT = "softmax and its products, LayerNorm, residual adds and the head"


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_int8` wrote and measured."""

    path: Path
    float_top1: float
    int8_top1: float
    kept_in_float: tuple[str, ...]  # names of the nodes the gate's second attempt left in float
    first_attempt_top1: float  # of the fully quantised graph (equal to int8_top1 when it passed)
    int8_kernels: dict[str, int] = field(default_factory=dict)  # in ONNX Runtime's optimised graph
    float_products: dict[str, int] = field(default_factory=dict)
    vnni: bool = False

    @property
    def drop(self) -> float:
        return self.float_top1 - self.int8_top1


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI int8 dot products (AVX512-VNNI or AVX-VNNI), from /proc/cpuinfo."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni"})


class _QuietRootLog:
    """Raises the root logger to ERROR for the duration of a ``with`` block."""

    def __enter__(self) -> None:
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc_info) -> None:
        logging.getLogger().setLevel(self.level)


def _calibration_reader(batches: Iterable[np.ndarray], input_name: str):
    quantization = require("onnxruntime.quantization", "export")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds: Iterator[dict[str, np.ndarray]] = (
                {input_name: np.ascontiguousarray(batch, dtype=np.float32)} for batch in batches
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    return Reader()


def sensitive_nodes(model_path: str | os.PathLike) -> list[str]:
    """Names of the nodes the gate's second attempt keeps in float: softmax and the products that
    take its probabilities, LayerNorm, residual additions (both operands computed, unlike a bias)
    and the head (the products nearest the graph's output)."""
    onnx = require("onnx", "export")
    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {tensor.name for tensor in graph.initializer}
    constants |= {output for node in graph.node if node.op_type == "Constant" for output in node.output}
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names = [
        node.name
        for node in graph.node
        if node.op_type in SENSITIVE_OPERATORS
        or (node.op_type == "Add" and not constants.intersection(node.input))
    ]

    def after(node) -> list:
        return [consumer for output in node.output for consumer in consumers.get(output, [])]

    def before(node) -> list:
        return [producers.get(name) for name in node.input if name not in constants]

    def products_from(pending: list, step) -> list[str]:
        """The products reached from the nodes ``pending`` through layout nodes, by ``step``."""
        found, seen = [], set()
        while pending:
            node = pending.pop()
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in PRODUCTS:
                found.append(node.name)
            elif node.op_type in LAYOUT:
                pending.extend(step(node))
        return found

    for node in graph.node:
        if node.op_type == "Softmax":
            names += products_from(after(node), after)
    names += products_from([producers.get(output.name) for output in graph.output], before)
    return list(dict.fromkeys(names))


def quantize_qdq(
    source: str | os.PathLike,
    target: str | os.PathLike,
    calibration: Iterable[np.ndarray],
    exclude: Sequence[str] = (),
) -> None:
    """Static QDQ quantisation of ``source`` to ``target``: per-channel int8 weights, uint8
    activations calibrated (min-max) on ``calibration``'s float32 batches; ``exclude`` names nodes
    left in float. The ``"sepvit"`` metadata (for ``sepvit eval``/``predict``) is carried over."""
    onnx = require("onnx", "export")
    quantization = require("onnxruntime.quantization", "export")
    proto = onnx.load(str(source), load_external_data=False)
    try:
        with _QuietRootLog():  # the quantiser warns through the root logger, e.g. of LayerNorm weights
            quantization.quantize_static(
                str(source),
                str(target),
                _calibration_reader(calibration, proto.graph.input[0].name),
                quant_format=quantization.QuantFormat.QDQ,
                op_types_to_quantize=list(PRODUCTS),
                per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                nodes_to_exclude=list(exclude),
                extra_options={
                    "ActivationSymmetric": False,
                    "WeightSymmetric": True,
                    # float outputs: the next operator takes them as they are (Gelu stays one node)
                    "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
                },
            )
    except (ValueError, RuntimeError) as error:  # e.g. no calibration data, a graph it cannot quantise
        raise ExportError(f"ONNX Runtime's quantiser failed: {' '.join(str(error).split())}") from error
    metadata = [prop for prop in proto.metadata_props if prop.key == METADATA_KEY]
    if metadata:
        quantized = onnx.load(str(target), load_external_data=False)
        quantized.metadata_props.extend(metadata)
        onnx.save(quantized, str(target))


def kernel_census(model_path: str | os.PathLike) -> tuple[dict[str, int], dict[str, int]]:
    """(int8 kernels, float matrix products) in ONNX Runtime's optimised CPU graph of ``model_path``."""
    onnx = require("onnx", "export")
    ort = require("onnxruntime", "export")
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(folder) / "optimised.onnx")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        counts = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    int8 = {op: n for op, n in sorted(counts.items()) if op in INT8_KERNELS}
    products = {op: n for op, n in sorted(counts.items()) if op in FLOAT_PRODUCTS}
    return int8, products


def quantize_int8(
    float_model: str | os.PathLike,
    output: str | os.PathLike,
    calibration: Callable[[], Iterable[np.ndarray]],
    evaluate: Callable[[Path], float],
    max_drop: float = 1.0,
) -> QuantizationReport:
    """Quantise ``float_model`` to ``output`` if its top-1 drops by at most ``max_drop`` points.

    ``calibration()`` yields float32 input batches (N, C, H, W), preprocessed as for inference;
    ``evaluate(path)`` returns the top-1 (in %) of the ONNX file at ``path`` on held-out images.
    When the fully quantised graph loses more than ``max_drop``, a second attempt keeps
    :func:`sensitive_nodes` in float. ``output`` is written only when the gate passes (atomically);
    otherwise :class:`ExportError` gives both drops and nothing is left behind.
    """
    if not max_drop >= 0:  # NaN too
        raise ExportError(f"--max-drop must be a non-negative number of points, not {max_drop}")
    float_model, output = Path(float_model), Path(output)
    float_top1 = evaluate(float_model)
    output.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        drops = []
        for exclude in ([], sensitive_nodes(float_model)):
            quantize_qdq(float_model, temporary, calibration(), exclude)
            int8_top1 = evaluate(temporary)
            drops.append(float_top1 - int8_top1)
            if float_top1 - int8_top1 <= max_drop:
                int8, products = kernel_census(temporary)
                os.chmod(temporary, new_file_mode())  # mkstemp made it private; exports follow the umask
                os.replace(temporary, output)
                return QuantizationReport(
                    output, float_top1, int8_top1, tuple(exclude), float_top1 - drops[0], int8, products,
                    cpu_has_vnni(),
                )  # fmt: skip
        raise ExportError(
            f"int8 loses {drops[0]:.2f} points of top-1 ({float_top1:.2f}% in float), and {drops[1]:.2f} "
            f"with {KEPT_IN_FLOAT} in float; --max-drop is {max_drop:g}: nothing written to {output}"
        )
    finally:
        temporary.unlink(missing_ok=True)
