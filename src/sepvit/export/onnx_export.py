"""ONNX export with verification: ``torch.export`` → ONNX, ``onnx.checker``, ONNX Runtime vs PyTorch.

The batch axis is always dynamic. Height and width are dynamic on request (``dynamic_size=True``):
the graph is traced with symbolic sizes. PyTorch specialises a traced size of 0 or 1, so a trace at
a size where some feature map is 1×1 (or a window grid a single window) is only valid near that
size; torch.export says so in the range it allows for height and width, and the trace is redone at
twice the size until that range is open-ended. A model whose graph truly depends on the input size
(fixed position tables) fails the ONNX Runtime comparison at the other check sizes and is exported
once per working size instead. The file appears at its path only once ``onnx.checker`` and the
ONNX Runtime comparison have passed; failures are :class:`ExportError` naming the operator and
module, or the input size ONNX Runtime could not run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sepvit.errors import ExportError
from sepvit.layers import prepare_for
from sepvit.utils.extras import require
from sepvit.utils.files import new_file_mode
from sepvit.utils.onnx_runtime import METADATA_KEY, onnxruntime_session

# Operators every ONNX runtime implements: dense algebra, elementwise math, normalisation, shape
# bookkeeping. Deliberately absent: gathers/scatters with index tensors (GatherND, ScatterND,
# GatherElements, ...), data-dependent control flow (If, Loop, NonZero), and anything outside the
# default domain.
UNIVERSAL_OPERATORS = frozenset(
    {
        # dense algebra and convolutions
        "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum",
        # elementwise
        "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Floor", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf",
        "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Gelu", "Min", "Max",
        "Where", "Equal", "Less", "Greater", "Not", "And", "IsNaN", "Cast",
        # normalisation, pooling, activations over an axis
        "Softmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization",
        "GroupNormalization", "ReduceMean", "ReduceSum", "ReduceMax", "GlobalAveragePool",
        "AveragePool", "MaxPool", "Resize",
        # layout and shape bookkeeping
        "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Pad",
        "Expand", "Tile", "Shape", "Constant", "ConstantOfShape", "Identity", "Range",
        # Gathers the census names apart from data gathers: dimensions out of a Shape, and one
        # slice at a constant scalar index (``x[:, 0]``)
        "Gather(shape)", "Gather(select)",
    }
)  # fmt: skip


class ExportMismatchError(ExportError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ExportedModel:
    """An ONNX file written by :func:`export_onnx` and what is known about its graph."""

    path: Path
    input_name: str
    input_shape: tuple[int | str, ...]  # ints for fixed axes, names for dynamic ones
    fp16: bool
    opset: int
    traced_size: tuple[int, int] | None = None  # (H, W) of the traced example
    comparisons: tuple[Comparison, ...] = ()  # ONNX Runtime vs PyTorch, checked before writing

    @property
    def dynamic_size(self) -> bool:
        return all(isinstance(dim, str) for dim in self.input_shape[2:])


@dataclass(frozen=True)
class Comparison:
    """ONNX Runtime against PyTorch on one input shape."""

    input_shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_reference: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class OperatorCensus:
    """Operator types of a graph (functions and subgraphs included) and those outside an allow-list."""

    counts: Counter = field(default_factory=Counter)
    allowed: frozenset[str] = UNIVERSAL_OPERATORS

    @property
    def unexpected(self) -> dict[str, int]:
        return {op: n for op, n in sorted(self.counts.items()) if op not in self.allowed}


def prepare_deploy(model: nn.Module) -> nn.Module:
    """Deploy (fused) copy of ``model``: its own ``fuse()`` when it has one, else
    :func:`sepvit.utils.reparameterize` (Conv+BN folding, children's ``fuse()``); ``model`` is kept."""
    from sepvit.utils import reparameterize

    if hasattr(model, "fuse"):
        return copy.deepcopy(model).eval().fuse()
    return reparameterize(model)


_TORCH_DIR = str(Path(torch.__file__).parent)


def _user_frame(error: BaseException) -> str:
    """The innermost traceback frame outside torch and the standard library, as ``file:line in fn``."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if "/torch/" not in frame.filename
        and "/lib/python" not in frame.filename.replace("site-packages", "")
    ]
    # torch.export reports the user's code in the message ("from user code: File ..., line ...").
    matches = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', str(error))
    if matches:
        filename, line, function = matches[-1]
        return f"{Path(filename).name}:{line} in {function}"
    if frames:
        return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}"
    return "unknown location"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _failing_node(program: torch.export.ExportedProgram, error: BaseException) -> str:
    """Name the operator (and the module that called it) that the ONNX translation stopped at."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    text = "\n".join(messages)
    match = re.search(r"target=([\w.:]+)", text) or re.search(r"OpOverload\(op='([\w.]+)'", text)
    if match is None:
        return "an operator the exporter could not name"
    target = match.group(1).removeprefix("torch.ops.")
    for node in program.graph.nodes:
        if node.op == "call_function" and str(node.target).removeprefix("torch.ops.").startswith(target):
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if stack:
                path, module_type = stack[-1]
                module_class = module_type if isinstance(module_type, str) else module_type.__name__
                path = re.sub(r"L\['self'\]\.?|L__self__\.?", "", str(path)) or "<model>"
                return f"operator {target} in module {path} ({module_class.rsplit('.', 1)[-1]})"
    return f"operator {target}"


MAX_TRACE_DOUBLINGS = 4
# Constant subgraphs up to this many values are folded into initializers. The exporter's own pass
# stops at 8192 input values, which leaves the q/k/v weights that the export form slices out of a
# qkv parameter as Slice outputs: ONNX Runtime folds them when it loads the graph, but its
# quantiser needs every weight to be an initializer already.
FOLD_LIMIT = 2**24


def check_shapes_for(
    input_shape: tuple[int, int, int], dynamic_size: bool, batch_sizes: Sequence[int] = (1, 3)
) -> list[tuple[int, int, int, int]]:
    """Inputs an export is compared on: each batch size at the export size and, for a dynamic-size
    export, other sizes too: double, a non-square one and (from 32 pixels up) a smaller one, none of
    them multiples of the export size, so that windows overhang and grids change."""
    channels, height, width = input_shape
    shapes = [(batch, channels, height, width) for batch in batch_sizes]
    if dynamic_size:
        sizes = [(2 * height, 2 * width), (height + height // 2 + 3, width + width // 3 + 5)]
        if min(height, width) >= 32:
            sizes.append((height // 2 + 1, width // 2 + 3))
        shapes += [(batch_sizes[0], channels, h, w) for h, w in sizes]
    return shapes


def _size_range_is_open(program: torch.export.ExportedProgram) -> bool:
    """Whether the guards of ``program`` leave height and width of its input unbounded above."""
    placeholder = [node for node in program.graph.nodes if node.op == "placeholder"][-1]
    for size in placeholder.meta["val"].shape[2:]:
        if not isinstance(size, torch.SymInt):
            return False  # specialised to the traced size
        bounds = program.range_constraints.get(size.node.expr)
        if bounds is None or float(bounds.upper) != math.inf:
            return False
    return True


def _trace(
    model: nn.Module, example: torch.Tensor, dynamic_size: bool, name: str
) -> tuple[torch.export.ExportedProgram, torch.Tensor]:
    """``torch.export`` of ``model``; for a dynamic size, at the first of the example's size and its
    doublings whose trace holds for every larger size (PyTorch specialises dimensions of size 1)."""
    from torch.export import Dim

    axes = {0: Dim("batch", min=1, max=4096)}
    if dynamic_size:
        axes.update({2: Dim.AUTO, 3: Dim.AUTO})
    for doubling in range(MAX_TRACE_DOUBLINGS + 1 if dynamic_size else 1):
        scale = 2**doubling
        traced = torch.randn(
            *example.shape[:2], *(scale * size for size in example.shape[2:]), dtype=example.dtype
        )
        try:
            program = torch.export.export(model, (traced,), dynamic_shapes=(axes,), strict=False)
        except Exception as error:
            raise ExportError(
                f"{name}: torch.export failed at {_user_frame(error)}: {_first_line(error)}"
            ) from error
        if not dynamic_size or _size_range_is_open(program):
            return program, traced
    raise ExportError(
        f"{name}: torch.export specialises height and width at every traced size up to "
        f"{tuple(traced.shape[2:])}; export it per size (without --dynamic-size)"
    )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int] = (3, 224, 224),
    *,
    dynamic_size: bool = False,
    fp16: bool = False,
    opset: int = 18,
    example_batch: int = 2,
    name: str | None = None,
    check_shapes: Sequence[tuple[int, ...]] | None = None,
    tolerance: float | None = None,
    metadata: dict | None = None,
) -> ExportedModel:
    """Export ``model`` (eval mode) to ONNX at ``path``, check it, and only then write it.

    The batch axis is dynamic (traced with ``example_batch`` > 1 so it is not specialised); height
    and width too when ``dynamic_size``. ``fp16`` exports a half-precision copy. Before the file
    appears at ``path`` (atomically), ``onnx.checker`` and ONNX Runtime check the graph: ONNX Runtime
    against ``model`` in PyTorch on ``check_shapes`` (default :func:`check_shapes_for`; ``()`` skips
    it) within ``tolerance`` (default :func:`default_tolerance`). ``metadata`` (JSON-serialisable) is
    stored in the file for ``sepvit eval``/``predict``. Raises :class:`ExportError` naming the failing
    operator, module or input (:class:`ExportMismatchError` above the tolerance), and
    :class:`~sepvit.errors.MissingExtraError` without the ``export`` extra; nothing is written then.
    """
    onnx = require("onnx", "export")
    require("onnxscript", "export")  # torch.onnx's exporter translates with it

    name = name or type(model).__name__
    path = Path(path)
    reference = model.eval()
    # The copy's layers take the forms ONNX Runtime fuses; a fixed-size export lets size-dependent
    # code (window padding and masks) drop what that size does not need.
    prepared = prepare_for(copy.deepcopy(model).eval(), "export", dynamic_size=dynamic_size)
    dtype = torch.float16 if fp16 else torch.float32
    prepared = prepared.to(dtype)
    example = torch.randn(example_batch, *input_shape, dtype=dtype)
    program, example = _trace(prepared, example, dynamic_size, name)
    optimizer = require("onnxscript.optimizer", "export")
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)  # it warns of every LayerNormalization it leaves alone
    try:
        onnx_program = torch.onnx.export(
            program, (example,), dynamo=True, opset_version=opset, input_names=["input"],
            output_names=["output"], verbose=False, optimize=True,
        )  # fmt: skip
        onnx_program.model = optimizer.optimize(
            onnx_program.model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT
        )
    except Exception as error:
        raise ExportError(
            f"{name}: ONNX translation failed on {_failing_node(program, error)}: {_first_line(error)}"
        ) from error
    finally:
        folding_log.setLevel(level)
    if check_shapes is None:
        check_shapes = check_shapes_for(input_shape, dynamic_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        onnx_program.save(tmp_name, external_data=False)
        proto = onnx.load(tmp_name, load_external_data=False)
        if metadata is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
            onnx.save(proto, tmp_name)
        onnx.checker.check_model(tmp_name, full_check=True)
        graph_input = proto.graph.input[0]
        shape = tuple(dim.dim_param or dim.dim_value for dim in graph_input.type.tensor_type.shape.dim)
        exported = ExportedModel(
            Path(tmp_name), graph_input.name, shape, fp16, opset, tuple(example.shape[2:])
        )  # fmt: skip
        comparisons = compare_outputs(reference, exported, check_shapes, tolerance) if check_shapes else []
        os.chmod(tmp_name, new_file_mode())  # mkstemp made it private; exports follow the umask
        os.replace(tmp_name, path)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{name}: onnx.checker rejected the graph: {_first_line(error)}") from error
    except ExportError as error:
        raise type(error)(f"{name}: {error}; nothing written to {path}") from error
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return dataclasses.replace(exported, path=path, comparisons=tuple(comparisons))


def default_tolerance(fp16: bool) -> float:
    """Absolute tolerance on outputs, scaled by ``max(1, max |reference|)`` in :func:`compare_outputs`."""
    return 2e-2 if fp16 else 1e-4


@torch.no_grad()
def compare_outputs(
    model: nn.Module,
    exported: ExportedModel,
    input_shapes: Sequence[tuple[int, ...]],
    tolerance: float | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> list[Comparison]:
    """Run ONNX Runtime and the fp32 PyTorch model on the same random inputs; one result per shape.

    Raises :class:`ExportMismatchError` when a difference exceeds ``tolerance × max(1, max |ref|)``
    and :class:`ExportError` when ONNX Runtime cannot run a shape.
    """
    session = onnxruntime_session(exported.path, device)
    tolerance = default_tolerance(exported.fp16) if tolerance is None else tolerance
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    results = []
    for shape in input_shapes:
        inputs = torch.randn(*shape, generator=generator)
        try:
            reference = model(inputs).float().numpy()
        except Exception as error:  # a size the model itself cannot take is no test of the graph
            message = f"PyTorch itself fails on input {tuple(shape)}: {_first_line(error)}"
            raise ExportError(message) from error
        feed = inputs.numpy().astype(np.float16 if exported.fp16 else np.float32)
        try:
            output = session.run(None, {exported.input_name: feed})[0].astype(np.float32)
        except Exception as error:
            raise ExportError(
                f"ONNX Runtime failed on input {tuple(shape)} (graph input {exported.input_shape}): "
                f"{_first_line(error)}"
            ) from error
        if output.shape != reference.shape:
            raise ExportMismatchError(
                f"input {tuple(shape)}: ONNX output {output.shape} vs {reference.shape}"
            )
        scale = max(1.0, float(np.abs(reference).max()))
        results.append(
            Comparison(tuple(shape), float(np.abs(output - reference).max()), scale, tolerance * scale)
        )
    failed = [result for result in results if not result.passed]
    if failed:
        worst = max(failed, key=lambda result: result.max_abs_diff)
        raise ExportMismatchError(
            f"ONNX Runtime differs from PyTorch on input {worst.input_shape}: max abs difference "
            f"{worst.max_abs_diff:.3g} > tolerance {worst.tolerance:.3g}"
        )
    return results


def operator_census(path: str | os.PathLike, allowed: frozenset[str] = UNIVERSAL_OPERATORS) -> OperatorCensus:
    """Count operator types over the graph, its subgraphs and local functions.

    Non-default domains are prefixed (``com.microsoft::FusedMatMul``) so they never pass the
    allow-list by accident. A Gather that picks dimensions out of a ``Shape`` is counted as
    ``Gather(shape)`` and one that takes a single slice at a constant scalar index as
    ``Gather(select)``, apart from gathers with index tensors (lookup tables, index tricks).
    """
    onnx = require("onnx", "export")
    proto = onnx.load(str(path), load_external_data=False)
    counts: Counter = Counter()
    scalar_constants = {tensor.name for tensor in proto.graph.initializer if not tensor.dims}

    def visit(nodes) -> None:
        shape_outputs = {output for node in nodes if node.op_type == "Shape" for output in node.output}
        scalars = scalar_constants | {
            node.output[0]
            for node in nodes
            if node.op_type == "Constant" and node.attribute and not node.attribute[0].t.dims
            and node.attribute[0].name == "value"
        }  # fmt: skip
        for node in nodes:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            op_type = node.op_type
            if op_type == "Gather" and not domain and node.input[0] in shape_outputs:
                op_type = "Gather(shape)"
            elif op_type == "Gather" and not domain and node.input[1] in scalars:
                op_type = "Gather(select)"
            counts[f"{domain}::{op_type}" if domain else op_type] += 1
            for attribute in node.attribute:
                if attribute.g.node:
                    visit(attribute.g.node)
                for graph in attribute.graphs:
                    visit(graph.node)

    visit(proto.graph.node)
    for function in proto.functions:
        visit(function.node)
    return OperatorCensus(counts, allowed)
