"""Image classification as an engine task: digits, image folders, shards or Hugging Face datasets,
timm models, mixup, top-1/top-5."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sepvit.classify.config import RUN_DEFINING, ClassifyConfig, apply_recipe_defaults, effective_batch
from sepvit.classify.data import (
    ClassificationImages,
    ClassifySample,
    describe,
    eval_transform,
    evaluation_images,
    limit,
    load_classification_data,
    train_transform,
)
from sepvit.classify.models import build_classifier, data_config_for, describe_classifier
from sepvit.engine.checkpoint import load_pretrained
from sepvit.engine.config import AUTO
from sepvit.engine.data import ShardedSampler, make_loader
from sepvit.engine.description import RunDescription
from sepvit.engine.distributed import DistContext, all_reduce
from sepvit.engine.loop import Task, TaskKind
from sepvit.engine.optim import autocast
from sepvit.engine.reporting import log
from sepvit.engine.shards import ShardSet, ShardStream
from sepvit.models import default_input_size


class ClassificationTask(Task):
    kind = TaskKind("classify", "sepvit train", ("top1", "top5", "loss"), RUN_DEFINING)
    config: ClassifyConfig

    def __init__(self, config: ClassifyConfig, architecture: dict[str, Any] | None = None) -> None:
        """``architecture``: keyword arguments of the model's factory beyond the configuration's
        (widths, window size, ablation options); saved with the checkpoints, which rebuild it."""
        super().__init__(config)
        self.architecture = architecture or {}

    def resolve(self, config: ClassifyConfig, world_size: int) -> ClassifyConfig:
        if config.lr is None:
            self.lr_rule = (
                f"--lr-base {config.lr_base:g} × effective batch {effective_batch(config, world_size)} / "
                f"{config.lr_base_size} (linear rule)"
            )
        config = apply_recipe_defaults(config, world_size)
        if config.img_size == AUTO:
            config = config.replace(img_size=default_input_size(config.model)[-1])
        return config

    def setup(self, context: DistContext) -> None:
        config = self.config
        train_set, val_set = load_classification_data(config.data, config.val_data, config.img_size)
        self.classes = list(train_set.classes)
        val_set = limit(val_set, config.limit_val)
        if context.is_main:
            log(describe(train_set, "train"))
            log(describe(val_set, "val"))
        from_timm = config.pretrained == "timm"
        self.model, self.model_kwargs = build_classifier(
            config.model,
            len(self.classes),
            config.img_size,
            config.drop_path,
            pretrained=from_timm,
            architecture=self.architecture,
        )
        if config.pretrained and not from_timm:
            report = load_pretrained(self.model, config.pretrained)
            if context.is_main:
                log(f"fine-tuning {report.summary()}")
        elif from_timm and context.is_main:
            log(f"fine-tuning from timm's pretrained {config.model}")
        size = self.model_kwargs.get("img_size", config.img_size)  # as built: may be (H, W)
        self.data_config = data_config_for(self.model, size, config.crop_pct)
        augment = train_transform(
            self.data_config, config.aa, config.scale, config.ratio, config.hflip, config.reprob
        )
        if isinstance(train_set, ShardSet):
            self.train_set = ShardStream(
                train_set, ClassifySample(augment, train_set.num_classes), train=True, seed=config.seed
            )
        else:
            self.train_set = ClassificationImages(train_set, augment)
        evaluated = evaluation_images(val_set, eval_transform(self.data_config))
        self.val_loader = classification_loader(evaluated, config.batch_size, config.workers, context)
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                prob=config.mixup_prob,
                label_smoothing=config.smoothing,
                num_classes=len(self.classes),
            )
        self.train_loss = training_loss(self.mixup is not None, config.smoothing)

    def loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = (tensor.to(device, non_blocking=True) for tensor in batch)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.train_loss(model(images), labels), {}

    def evaluate(self, model: nn.Module, context: DistContext, dtype: torch.dtype | None) -> dict[str, float]:
        return evaluate(model, self.val_loader, context, dtype, self.config.channels_last)

    def describe(self) -> RunDescription:
        return describe_classifier(
            self.config.model, self.model_kwargs, self.classes, self.data_config, self.config.data
        )


def training_loss(mixup: bool, smoothing: float) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup:
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def classification_loader(
    dataset: ClassificationImages | ShardStream, batch_size: int, workers: int, context: DistContext
) -> DataLoader:
    """This process's share of an evaluation set, in order; every image in exactly one process."""
    if isinstance(dataset, ShardStream):
        dataset.configure(context.rank, context.world_size, workers)
        sampler = None
    else:
        sampler = ShardedSampler(len(dataset), context.rank, context.world_size, False)
    return make_loader(
        dataset, sampler, batch_size, workers, drop_last=False, pin_memory=context.device.type == "cuda"
    )


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
    }
    if collect:
        result["count"] = int(count)
        result["predictions"] = torch.cat(predictions).numpy() if predictions else np.zeros(0, int)
        result["targets"] = torch.cat(targets).numpy() if targets else np.zeros(0, int)
    return result
