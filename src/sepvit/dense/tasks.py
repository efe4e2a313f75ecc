"""Detection and segmentation as engine tasks: their data, models, losses and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sepvit.dense import synthetic
from sepvit.dense.config import (
    DETECT_RUN_DEFINING,
    SEGMENT_RUN_DEFINING,
    DenseConfig,
    DetectConfig,
    SegmentConfig,
)
from sepvit.dense.data import (
    ADE20KSegmentation,
    CocoDetection,
    SegmentationEvalDataset,
    collate_detection,
    collate_segmentation,
    detection_transforms,
    segmentation_transforms,
)
from sepvit.dense.detection import build_detection_model, evaluate_detection
from sepvit.dense.segmentation import build_segmentation_model, evaluate_segmentation
from sepvit.engine.description import RunDescription
from sepvit.engine.distributed import DistContext, barrier
from sepvit.engine.loop import Task, TaskKind
from sepvit.engine.optim import autocast
from sepvit.engine.reporting import log

# The embedded shapes dataset: image size and number of images per split.
SYNTHETIC_SIZE = {"images": 160, "train": 300, "val": 60}


def dataset_root(data: str | None, kind: str, announce: bool = True) -> Path:
    """``data``, or the embedded shapes dataset of ``kind`` ('coco' or 'ade20k'), written once."""
    if data is not None:
        return Path(data)
    writer = synthetic.write_coco if kind == "coco" else synthetic.write_ade20k
    root = synthetic.default_root(kind)
    if not root.exists() and announce:
        log(f"writing the embedded shapes dataset to {root}")
    return writer(
        root, num_train=SYNTHETIC_SIZE["train"], num_val=SYNTHETIC_SIZE["val"], size=SYNTHETIC_SIZE["images"]
    )


def _shared_root(data: str | None, kind: str, context: DistContext) -> Path:
    """Rank 0 writes the embedded dataset (when it is needed) before the others read it."""
    root = dataset_root(data, kind) if context.is_main else None
    barrier(context)
    return root or dataset_root(data, kind, announce=False)


class DenseTask(Task):
    """What detection and segmentation share: a backbone that may start from a classifier, a model
    that returns its losses, and evaluation on rank 0."""

    config: DenseConfig
    description: RunDescription

    @property
    def data_name(self) -> str:
        return Path(self.config.data).name if self.config.data else "shapes"  # the embedded dataset

    def _load_backbone(self, body: nn.Module, context: DistContext) -> None:
        path = self.config.pretrained_backbone
        if path is None:
            return
        from sepvit.dense.backbone import load_classification_checkpoint

        report = load_classification_checkpoint(body, self.config.model, path, self.description.input_size)
        if context.is_main:
            log(f"backbone {report.summary()}")

    def describe(self) -> RunDescription:
        return self.description

    def _description(self, input_size: tuple[int, int], **extras: Any) -> RunDescription:
        """The run's description once the training set is loaded; ``extras``: the task's options."""
        return RunDescription(
            task=self.kind.name,
            model=self.config.model,
            model_kwargs={},
            class_names=self.train_set.class_names,
            input_size=input_size,
            data=self.config.data,
            extras={"num_classes": self.train_set.num_classes, **extras},
        )

    def loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        losses = self._losses(model, batch, device)
        total = sum(losses.values())
        return total, {key: value.item() for key, value in losses.items()}

    def evaluate(
        self, model: nn.Module, context: DistContext, dtype: torch.dtype | None
    ) -> dict[str, float] | None:
        if not context.is_main:
            return None
        with autocast(context.device, dtype):
            return self._evaluate(model, context.device)


DETECT_METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50")


class DetectionTask(DenseTask):
    kind = TaskKind("detect", "sepvit detect train", DETECT_METRICS, DETECT_RUN_DEFINING)
    collate_fn = staticmethod(collate_detection)
    config: DetectConfig

    def setup(self, context: DistContext) -> None:
        config = self.config
        root = _shared_root(config.data, "coco", context)
        with_masks = config.arch == "maskrcnn"
        self.train_set = CocoDetection(root, config.train_split, detection_transforms(True), with_masks)
        self.val_set = CocoDetection(root, config.val_split)
        if config.limit_val is not None:
            self.val_set.image_ids = self.val_set.image_ids[: config.limit_val]
        min_sizes = [config.min_size]
        if config.multi_scale:
            min_sizes = list(range(config.min_size, round(0.6 * config.min_size) - 1, -32))[::-1]
        self.description = self._description(
            (config.min_size, config.max_size),
            arch=config.arch,
            category_ids=self.train_set.category_ids,
            train_min_sizes=min_sizes,
            max_size=config.max_size,
            fpn_channels=config.fpn_channels,
            rois_per_image=config.rois_per_image,
        )
        self.model = build_detection_model(self.description, config.drop_path)
        self._load_backbone(self.model.backbone.body, context)
        if not with_masks:
            self.metric_names = self.metric_names[:3]

    def _losses(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        images, targets = batch
        targets = [
            {k: v.as_subclass(torch.Tensor).to(device) for k, v in t.items() if k != "image_id"}
            for t in targets
        ]
        return model([image.to(device) for image in images], targets)

    def _evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        metrics = evaluate_detection(model, self.val_set, device, self.config.batch_size, self.config.workers)
        return {name: metrics[name] for name in self.metric_names}


class SegmentationTask(DenseTask):
    kind = TaskKind("segment", "sepvit segment train", ("mIoU", "mAcc", "aAcc"), SEGMENT_RUN_DEFINING)
    collate_fn = staticmethod(collate_segmentation)
    config: SegmentConfig

    def setup(self, context: DistContext) -> None:
        config = self.config
        root = _shared_root(config.data, "ade20k", context)
        num_classes = config.num_classes or (None if (root / "classes.txt").is_file() else 150)
        transforms = segmentation_transforms(True, config.crop_size, tuple(config.scale_range))
        self.train_set = ADE20KSegmentation(root, config.train_split, transforms, num_classes)
        val_set = ADE20KSegmentation(root, config.val_split, None, self.train_set.num_classes)
        self.val_set = SegmentationEvalDataset(val_set, config.crop_size)
        self.description = self._description(
            (config.crop_size, config.crop_size),
            head=config.head,
            crop_size=config.crop_size,
            head_channels=config.head_channels,
        )
        self.model = build_segmentation_model(self.description, config.drop_path)
        self._load_backbone(self.model.body, context)

    def _losses(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        images, labels = batch
        return model(images.to(device), labels.to(device))

    def _evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        val_set = self.val_set
        if self.config.limit_val is not None:
            val_set = torch.utils.data.Subset(val_set, range(min(self.config.limit_val, len(val_set))))
        return evaluate_segmentation(model, val_set, device, num_workers=self.config.workers)
