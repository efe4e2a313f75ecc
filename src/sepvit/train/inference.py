"""``sepvit eval`` and ``sepvit predict``: a checkpoint's accuracy on a dataset, and its predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sepvit.cli import CliError
from sepvit.train import checkpoint as ckpt
from sepvit.train.data import (
    ImageDecodeError,
    ShardedSampler,
    TransformedImages,
    build_transforms,
    describe,
    load_image_sets,
    make_loader,
    open_image,
)
from sepvit.train.distributed import DistContext, choose_device
from sepvit.train.engine import amp_dtype, create_model, data_config_for, default_img_size, evaluate
from sepvit.train.plots import plot_confusion_matrix

PREDICT_BATCH = 64


def load_model(
    path: str, model_name: str | None = None, num_classes: int | None = None, img_size: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model a checkpoint describes, with its weights; ``model_name`` loads a plain state dict."""
    if model_name is None:
        state_dict, info = ckpt.read_checkpoint_info(path)
    else:
        state_dict, info = ckpt.read_weights(path)
    if info is not None and model_name is None:
        kwargs = info["model_kwargs"]
        model, _ = create_model(info["model"], len(info["classes"]), kwargs.get("img_size"))
        ckpt.load_strict(model, state_dict, path)
        return model.eval(), info
    if num_classes is None:
        num_classes = len(info["classes"]) if info else None
    if num_classes is None:
        raise CliError(f"{path} does not say how many classes it has: pass --num-classes")
    size = img_size or default_img_size(model_name)
    model, kwargs = create_model(model_name, num_classes, size)
    ckpt.load_strict(model, state_dict, path)
    info = {
        "model": model_name,
        "model_kwargs": kwargs,
        "classes": info["classes"] if info else [str(i) for i in range(num_classes)],
        "data": info["data"] if info else None,
        "data_config": data_config_for(model, size, "auto"),
    }
    return model.eval(), info


def _device(name: str) -> DistContext:
    return DistContext(0, 1, 0, choose_device(name))


def run_eval(
    path: str,
    data: str | None,
    batch_size: int,
    workers: int,
    device: str,
    amp: str,
    confusion_matrix: str | None,
    as_json: bool,
    model_name: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 and loss of a checkpoint on the validation images of ``data``."""
    model, info = load_model(path, model_name, num_classes, img_size)
    data = data or info.get("data")
    if not data:
        raise CliError("pass --data (digits or a folder): the checkpoint does not name its data")
    context = _device(device)
    data_config = info["data_config"]
    _, val_set = load_image_sets(data, data_config["input_size"][-1])
    if val_set.classes != info["classes"]:
        raise CliError(
            f"the classes of {data} ({len(val_set.classes)}) differ from the checkpoint's "
            f"({len(info['classes'])}): {val_set.classes[:10]} vs {info['classes'][:10]}"
        )
    if not as_json:
        print(describe(val_set, "val"), flush=True)
    dataset = TransformedImages(val_set, build_transforms({}, data_config, training=False))
    loader = make_loader(
        dataset,
        ShardedSampler(len(val_set.items), 0, 1, False),
        batch_size,
        workers,
        drop_last=False,
        pin_memory=context.device.type == "cuda",
    )
    model.to(context.device)
    try:
        metrics = evaluate(model, loader, context, amp_dtype(amp, context.device), collect=True)
    except ImageDecodeError as error:
        raise CliError(str(error)) from error
    result = {
        "checkpoint": str(path),
        "data": data,
        "images": metrics["count"],
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
    }
    if confusion_matrix:
        count = len(info["classes"])
        matrix = np.zeros((count, count), dtype=np.int64)
        np.add.at(matrix, (metrics["targets"], metrics["predictions"]), 1)
        result["confusion_matrix"] = str(
            plot_confusion_matrix(matrix, info["classes"], Path(confusion_matrix))
        )
    return result


def _load_for_prediction(image_path: str, transform) -> torch.Tensor:
    if not Path(image_path).is_file():
        raise CliError(f"image {image_path} does not exist")
    try:
        return transform(open_image(Path(image_path)))
    except ImageDecodeError as error:
        raise CliError(str(error)) from error


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
    model, info = load_model(path, model_name, num_classes, img_size)
    transform = build_transforms({}, info["data_config"], training=False)
    context = _device(device)
    model.to(context.device)
    chunks = []
    for start in range(0, len(images), PREDICT_BATCH):
        batch = [
            _load_for_prediction(image_path, transform)
            for image_path in images[start : start + PREDICT_BATCH]
        ]
        with torch.no_grad():
            chunks.append(model(torch.stack(batch).to(context.device)).float().softmax(dim=1).cpu())
    probabilities = torch.cat(chunks)
    k = min(top_k, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    return [
        {
            "image": image_path,
            "predictions": [
                {"class": info["classes"][index], "index": index, "probability": value}
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
