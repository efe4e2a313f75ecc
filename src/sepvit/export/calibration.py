"""Images for int8 quantisation: calibration batches from a dataset's training images, and top-1 of
an ONNX file on its held-out (validation) images, with the transform and metric of ``sepvit eval``;
:func:`quantize_on_data` puts them together behind the gate, as ``sepvit export --int8`` runs it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sepvit.classify.data import (
    ClassificationImages,
    ImageSet,
    check_classes,
    eval_transform,
    load_image_sets,
)
from sepvit.errors import ConfigError
from sepvit.export.quantize import QuantizationReport, quantize_int8

CALIBRATION_SEED = 0


def calibration_and_held_out(
    data: str, data_config: dict[str, Any], classes: list[str], count: int
) -> tuple[ImageSet, ImageSet]:
    """``count`` training images of ``data`` drawn at random (fixed seed, every class likely present)
    for calibration, and its validation images to measure top-1 on."""
    if count < 1:
        raise ConfigError(f"--calibration-images must be at least 1, not {count}")
    train, held_out = load_image_sets(data, data_config["input_size"][-1])
    check_classes(data, held_out.classes, classes, "model's")
    chosen = np.random.default_rng(CALIBRATION_SEED).permutation(len(train.items))[:count]
    subset = ImageSet(
        train.classes, [train.items[i] for i in chosen], [train.labels[i] for i in chosen], train.skipped
    )
    return subset, held_out


def image_batches(
    image_set: ImageSet, data_config: dict[str, Any], batch_size: int = 32
) -> Iterator[np.ndarray]:
    """The images of ``image_set`` through the evaluation transform, as float32 (N, C, H, W) arrays."""
    images = ClassificationImages(image_set, eval_transform(data_config))
    for start in range(0, len(images), batch_size):
        batch = [images[index][0] for index in range(start, min(start + batch_size, len(images)))]
        yield torch.stack(batch).numpy()


def onnx_top1(path: str | os.PathLike, image_set: ImageSet, data_config: dict[str, Any]) -> float:
    """Top-1 (%) of the ONNX classifier at ``path`` on ``image_set``, as ``sepvit eval`` measures it."""
    from sepvit.classify.task import classification_loader, evaluate
    from sepvit.engine.distributed import single_process
    from sepvit.utils.onnx_runtime import OnnxClassifier

    context = single_process("cpu")
    loader = classification_loader(
        ClassificationImages(image_set, eval_transform(data_config)), 64, 0, context
    )
    return evaluate(OnnxClassifier(path), loader, context)["top1"]


def quantize_on_data(
    float_model: str | os.PathLike,
    output: str | os.PathLike,
    data: str,
    data_config: dict[str, Any],
    classes: list[str],
    calibration_images: int,
    max_drop: float = 1.0,
) -> tuple[QuantizationReport, int, int]:
    """:func:`~sepvit.export.quantize_int8` of ``float_model`` to ``output``, calibrated on
    ``calibration_images`` training images of ``data`` and gated on its validation images; returns
    the report and how many calibration and held-out images it used."""
    calibration, held_out = calibration_and_held_out(data, data_config, classes, calibration_images)
    report = quantize_int8(
        float_model,
        output,
        lambda: image_batches(calibration, data_config),
        lambda path: onnx_top1(path, held_out, data_config),
        max_drop,
    )
    return report, len(calibration.items), len(held_out.items)
