"""``sepvit eval`` and ``sepvit predict``: a checkpoint's accuracy on a dataset, and its predictions.

An ONNX file written by ``sepvit export`` from a checkpoint (fp32, fp16 or int8) stands in for the
checkpoint: its metadata names the classes, data and preprocessing, and ONNX Runtime computes the
logits, so an export is measured with the same data, transform and metric as its model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sepvit.classify.data import (
    ImageSet,
    check_classes,
    describe,
    eval_transform,
    evaluation_images,
    load_classification_data,
)
from sepvit.classify.models import build_classifier, data_config_for, describe_classifier
from sepvit.classify.task import classification_loader, evaluate
from sepvit.data_io import open_image
from sepvit.engine import checkpoint as ckpt
from sepvit.engine.description import RunDescription
from sepvit.engine.distributed import DistContext, single_process
from sepvit.engine.optim import amp_dtype
from sepvit.engine.reporting import log
from sepvit.engine.shards import ShardSet
from sepvit.errors import CheckpointError, ConfigError
from sepvit.models import default_input_size
from sepvit.models.input_sizes import check_input_size
from sepvit.runs import load_run
from sepvit.utils.onnx_runtime import OnnxClassifier
from sepvit.utils.plots import pyplot, save_figure

PREDICT_BATCH = 64


def load_model(
    path: str,
    model_name: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    classes: list[str] | None = None,
) -> tuple[nn.Module, RunDescription]:
    """The classifier of a run's checkpoint (:func:`sepvit.runs.load_run`); ``model_name`` loads a
    plain state dict (whose class names are ``classes`` when given, else 0..N-1). An ``.onnx`` file
    gives an :class:`~sepvit.utils.onnx_runtime.OnnxClassifier` and the description ``sepvit export``
    stored."""
    if Path(path).suffix.lower() == ".onnx":
        return load_onnx_model(
            path, model_name is not None or num_classes is not None or img_size is not None
        )
    if model_name is None:
        return load_run(path, "classify")
    state_dict, description = ckpt.read_weights(path)
    ckpt.check_finite(state_dict, f"checkpoint {path}")
    if num_classes is None:
        num_classes = len(description.class_names) if description else (len(classes) if classes else None)
    if num_classes is None:
        raise ConfigError(f"{path} does not say how many classes it has: pass --num-classes")
    size = check_input_size(model_name, (img_size,))[0] if img_size else default_input_size(model_name)[-1]
    model, kwargs = build_classifier(model_name, num_classes, size)
    ckpt.load_strict(model, state_dict, path)
    if description:
        names = description.class_names
    elif classes is not None and len(classes) == num_classes:
        names = list(classes)
    else:
        names = [str(i) for i in range(num_classes)]
    data = description.data if description else None
    return model.eval(), describe_classifier(
        model_name, kwargs, names, data_config_for(model, size, "auto"), data
    )


def load_onnx_model(path: str, plain_options: bool = False) -> tuple[nn.Module, RunDescription]:
    """An ONNX classifier exported from a checkpoint, and that checkpoint's description."""
    from sepvit.utils.onnx_runtime import read_metadata

    if plain_options:
        raise ConfigError("--model, --num-classes and --img-size are for plain state dicts, not ONNX files")
    if not Path(path).is_file():
        raise CheckpointError(f"ONNX file {path} does not exist")
    metadata = read_metadata(path)
    description = None if metadata is None else RunDescription.from_metadata(metadata, path)
    if description is None or description.task != "classify" or description.data_config is None:
        raise CheckpointError(
            f"{path} does not say what it classifies (no sepvit metadata of a classifier): export it "
            "from a classification checkpoint, sepvit export RUN/best.safetensors"
        )
    return OnnxClassifier(path), description


def held_out_loader(
    data: str,
    description: RunDescription,
    batch_size: int,
    workers: int,
    context: DistContext,
    val_set: ImageSet | ShardSet | None = None,
    quiet: bool = True,
) -> DataLoader:
    """The validation images of ``data`` (``val_set`` when already loaded), checked against the classes
    of the run ``description`` describes and transformed as its preprocessing says: what ``sepvit
    eval`` measures on."""
    data_config = description.data_config
    if val_set is None:
        _, val_set = load_classification_data(data, None, data_config["input_size"][-1])
    check_classes(data, val_set.classes, description.class_names, "checkpoint's")
    if not quiet:
        log(describe(val_set, "val"))
    return classification_loader(
        evaluation_images(val_set, eval_transform(data_config)), batch_size, workers, context
    )


def run_eval(
    path: str,
    data: str | None,
    batch_size: int,
    workers: int,
    device: str,
    amp: str,
    confusion_matrix: str | None,
    quiet: bool,
    model_name: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 and loss of a checkpoint on the validation images of ``data``."""
    if model_name is not None and not data:
        raise ConfigError("pass --data (digits or a folder) with --model: a plain state dict names no data")
    val_set = None
    if model_name is not None:
        # A plain state dict has no class names: the data's folders give them.
        _, val_set = load_classification_data(data, None, img_size or default_input_size(model_name)[-1])
    classes = list(val_set.classes) if val_set else None
    model, description = load_model(path, model_name, num_classes, img_size, classes)
    if isinstance(model, OnnxClassifier) and amp != "none":
        raise ConfigError("--amp applies to checkpoints: an ONNX graph computes in its own precision")
    data = data or description.data
    if not data:
        raise ConfigError("pass --data (digits or a folder): the checkpoint does not name its data")
    context = single_process(device)
    loader = held_out_loader(data, description, batch_size, workers, context, val_set, quiet)
    model.to(context.device)
    metrics = evaluate(model, loader, context, amp_dtype(amp, context.device), collect=True)
    result = {
        "checkpoint": str(path),
        "data": data,
        "images": metrics["count"],
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
    }
    if confusion_matrix:
        count = len(description.class_names)
        matrix = np.zeros((count, count), dtype=np.int64)
        np.add.at(matrix, (metrics["targets"], metrics["predictions"]), 1)
        result["confusion_matrix"] = str(
            plot_confusion_matrix(matrix, description.class_names, Path(confusion_matrix))
        )
    return result


def run_predict(
    path: str,
    images: list[str],
    top_k: int,
    device: str,
    model_name: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> list[dict[str, Any]]:
    """The ``top_k`` classes and probabilities of each image file."""
    model, description = load_model(path, model_name, num_classes, img_size)
    transform = eval_transform(description.data_config)
    context = single_process(device)
    model.to(context.device)
    chunks = []
    for start in range(0, len(images), PREDICT_BATCH):
        batch = [transform(open_image(image_path)) for image_path in images[start : start + PREDICT_BATCH]]
        with torch.no_grad():
            chunks.append(model(torch.stack(batch).to(context.device)).float().softmax(dim=1).cpu())
    probabilities = torch.cat(chunks)
    k = min(top_k, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    return [
        {
            "image": image_path,
            "predictions": [
                {"class": description.class_names[index], "index": index, "probability": value}
                for value, index in zip(row_values.tolist(), row_indices.tolist())
            ],
        }
        for image_path, row_values, row_indices in zip(images, values, indices)
    ]


def format_predictions(results: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return json.dumps(results, indent=2)
    return "\n".join(
        f"{result['image']}: "
        + ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in result["predictions"])
        for result in results
    )


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    """Counts of (true class, predicted class), annotated when there are few classes."""
    plt = pyplot()
    size = max(4.0, 0.45 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(classes))
    axis.set_xticks(ticks, classes, rotation=90 if len(classes) > 10 else 0)
    axis.set_yticks(ticks, classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(classes) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            color = "white" if count > threshold else "black"
            axis.text(col, row, str(count), ha="center", va="center", fontsize=8, color=color)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return path
