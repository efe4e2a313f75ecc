"""Model creation, the timm recipe parts (optimizer, schedule, loss, mixup), and evaluation."""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sepvit.cli import CliError
from sepvit.train.distributed import DistContext, all_reduce

# Keyword arguments that only some timm models accept; dropped (with a note) when a model refuses them.
OPTIONAL_MODEL_KWARGS = ("img_size", "drop_path_rate")


def default_img_size(model_name: str) -> int:
    """The model's default input size (its pretrained config), 224 if it has none."""
    import timm

    check_model_name(model_name)
    cfg = timm.models.get_pretrained_cfg(model_name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def check_model_name(model_name: str) -> None:
    import timm

    import sepvit  # noqa: F401  (registers our models with timm)

    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CliError(f"unknown model {model_name!r} (not one of ours nor a timm model){hint}")


def create_model(
    model_name: str, num_classes: int, img_size: int | None = None, drop_path: float | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm-registered model; returns it and the keyword arguments it was built with."""
    import timm

    check_model_name(model_name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    while True:
        try:
            return timm.create_model(model_name, **kwargs), kwargs
        except TypeError as error:
            refused = next((k for k in OPTIONAL_MODEL_KWARGS if k in kwargs and k in str(error)), None)
            if refused is None:
                raise
            kwargs.pop(refused)


def data_config_for(model: nn.Module, img_size: int, crop_pct: float | str) -> dict[str, Any]:
    """timm's data config of the model at ``img_size`` (mean, std, interpolation, crop)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    config["input_size"] = (3, img_size, img_size)
    if crop_pct != "auto":
        config["crop_pct"] = float(crop_pct)
    return {
        "input_size": list(config["input_size"]),
        "interpolation": config["interpolation"],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "crop_pct": config["crop_pct"],
    }


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp``; ``auto`` is bf16 on a GPU that supports it, else none."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise CliError("--amp fp16 needs a GPU; use --amp bf16 on the CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Recipe:
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loss: nn.Module
    mixup: Any  # timm Mixup or None


# timm optimizer names that map to torch.optim classes with a fused CPU and CUDA implementation.
FUSED_OPTIMIZERS = ("adam", "adamw")


def build_recipe(
    model: nn.Module, config: dict[str, Any], num_classes: int, updates_per_epoch: int
) -> Recipe:
    """AdamW (no decay on ``no_weight_decay()`` tensors, norms, biases), cosine with warm-up, loss."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(
        model,
        opt=config["opt"],
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        filter_bias_and_bn=True,
        # One fused kernel instead of a loop over tensors: several times faster on CPU, where
        # PyTorch's default is the per-tensor loop.
        **({"fused": True} if config["opt"].lower() in FUSED_OPTIMIZERS else {}),
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=config["sched"],
        num_epochs=config["epochs"],
        warmup_epochs=config["warmup_epochs"],
        warmup_lr=config["warmup_lr"],
        min_lr=config["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    mixup = None
    if config["mixup"] > 0 or config["cutmix"] > 0:
        mixup = Mixup(
            mixup_alpha=config["mixup"],
            cutmix_alpha=config["cutmix"],
            prob=config["mixup_prob"],
            label_smoothing=config["smoothing"],
            num_classes=num_classes,
        )
        train_loss: nn.Module = SoftTargetCrossEntropy()
    elif config["smoothing"] > 0:
        train_loss = LabelSmoothingCrossEntropy(smoothing=config["smoothing"])
    else:
        train_loss = nn.CrossEntropyLoss()
    return Recipe(optimizer, scheduler, train_loss, mixup)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    context: DistContext,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    collect: bool = False,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 (%) over all processes; with ``collect``, this process's predictions."""
    model.eval()
    totals = np.zeros(4)  # loss sum, top-1 hits, top-5 hits, images
    predictions, targets = [], []
    for images, labels in loader:
        images = images.to(context.device, non_blocking=True)
        labels = labels.to(context.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(context.device, dtype):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        totals += [
            F.cross_entropy(logits, labels, reduction="sum").item(),
            hits[:, 0].sum().item(),
            hits.any(dim=1).sum().item(),
            labels.numel(),
        ]
        if collect:
            predictions.append(top[:, 0].cpu())
            targets.append(labels.cpu())
    loss_sum, top1, top5, count = all_reduce(totals.tolist(), context)
    count = max(count, 1)
    result: dict[str, Any] = {
        "loss": loss_sum / count,
        "top1": 100 * top1 / count,
        "top5": 100 * top5 / count,
        "count": int(count),
    }
    if collect:
        result["predictions"] = torch.cat(predictions).numpy() if predictions else np.zeros(0, int)
        result["targets"] = torch.cat(targets).numpy() if targets else np.zeros(0, int)
    return result
