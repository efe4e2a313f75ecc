"""Top-1 of a trained checkpoint in the precisions it is deployed in, on its held-out images with the
data, transform and metric of ``sepvit eval``: fp32 and bf16 in PyTorch (autocast on the fp32 model,
and the model cast to bf16), and int8 in ONNX Runtime behind the gate ``sepvit export --int8`` runs."""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sepvit.engine.description import RunDescription
from sepvit.errors import ConfigError
from sepvit.export.quantize import QuantizationReport

EVAL_BATCH = 64


class CastInputs(nn.Module):
    """``model`` in ``dtype``, fed inputs cast to it: a model cast as a whole, as ``.to(dtype)`` gives."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


@dataclass(frozen=True)
class PrecisionTop1:
    """Top-1 (%) of one checkpoint per precision, on ``images`` held-out images of ``data``."""

    data: str
    images: int
    top1: dict[str, float]  # "fp32", "bf16 autocast", "bf16 cast"


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, RunDescription, str]:
    """(model, run description, data) of a PyTorch checkpoint that names its data;
    :class:`~sepvit.errors.SepViTError` naming the problem otherwise."""
    from sepvit.classify.inference import load_model
    from sepvit.utils.onnx_runtime import OnnxClassifier

    model, description = load_model(str(path))
    if isinstance(model, OnnxClassifier):
        raise ConfigError(f"{path} is an ONNX file: pass the checkpoint it was exported from")
    data = description.data
    if not data:
        raise ConfigError(f"{path} does not name the data it was trained on")
    return model, description, data


def precision_top1(checkpoint: str | os.PathLike) -> PrecisionTop1:
    """Top-1 of ``checkpoint`` in fp32, bf16 autocast and bf16 cast, on the CPU."""
    from sepvit.classify.inference import held_out_loader
    from sepvit.classify.task import evaluate
    from sepvit.engine.distributed import single_process

    model, description, data = load_checkpoint(checkpoint)
    context = single_process("cpu")
    loader = held_out_loader(data, description, EVAL_BATCH, 0, context)
    metrics = {
        "fp32": evaluate(model, loader, context, collect=True),
        "bf16 autocast": evaluate(model, loader, context, torch.bfloat16),
        "bf16 cast": evaluate(CastInputs(model, torch.bfloat16), loader, context),
    }
    top1 = {precision: result["top1"] for precision, result in metrics.items()}
    return PrecisionTop1(data, int(metrics["fp32"]["count"]), top1)


def int8_top1(
    checkpoint: str | os.PathLike, calibration_images: int
) -> tuple[QuantizationReport, int, int, str]:
    """The gate of ``sepvit export CHECKPOINT --int8`` (default ``--max-drop``) on ``checkpoint``:
    (its report, calibration images, held-out images, data); :class:`~sepvit.errors.ExportError`
    when it refuses. Nothing is left on disk."""
    from sepvit.export import export_onnx
    from sepvit.export.calibration import quantize_on_data

    model, description, data = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="sepvit-int8-") as folder:
        exported = export_onnx(
            model, Path(folder) / "fp32.onnx", tuple(description.data_config["input_size"])
        )
        report, calibration_count, held_out_count = quantize_on_data(
            exported.path, Path(folder) / "int8.onnx", data, description.data_config, description.class_names,
            calibration_images,
        )  # fmt: skip
    return report, calibration_count, held_out_count, data
