"""Options of ``sepvit detect train`` and ``sepvit segment train``, and their recipes (presets).

Without ``--data`` the ``synthetic`` preset applies (the embedded shapes dataset, a small recipe
that trains in minutes on a CPU); with ``--data`` the paper's recipe does (mmdetection's 1×
schedule; mmsegmentation's Semantic FPN 80k / UperNet 160k iterations expressed in ADE20K epochs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from sepvit.engine.config import TrainConfig, option


@dataclasses.dataclass
class DenseConfig(TrainConfig):
    """What detection and segmentation share; defaults differ from classification's."""

    data: str | None = option(
        None, "dataset root (default: the embedded shapes dataset)", group="data", metavar="DIR"
    )
    train_split: str = option("train", "training split", group="data")
    val_split: str = option("val", "validation split", group="data")
    pretrained_backbone: str | None = option(
        None, "classification checkpoint of the backbone (ours, a timm state dict, an official one)",
        group="model", metavar="CKPT",
    )  # fmt: skip
    model: str = option("sepvit_tiny", "backbone: any timm model with features_only", group="model")
    drop_path: float = option(
        0.2, "stochastic depth rate of the backbone", group="model", low=0, high=1, high_open=True
    )
    batch_size: int = option(2, "images per process and step", group="data", low=1)
    epochs: int = option(12, "number of epochs", group="optimization", low=1)
    lr: float = option(1e-4, "peak learning rate", group="optimization", low=0, low_open=True)
    weight_decay: float = option(1e-3, "AdamW weight decay", group="optimization", low=0)
    sched: str = option(
        "multistep", "timm learning-rate schedule (multistep, poly, cosine, ...)", group="optimization"
    )
    warmup_epochs: float = option(0.0, "linear warm-up epochs", group="optimization", low=0)
    warmup_steps: int | None = option(500, "linear warm-up in optimizer steps", group="optimization", low=0)
    warmup_lr: float = option(1e-7, "learning rate at the start of warm-up", group="optimization", low=0)
    min_lr: float = option(0.0, "learning rate at the end of the schedule", group="optimization", low=0)
    clip_grad: float | None = option(
        None, "clip the gradient norm to this", group="optimization", low=0, low_open=True
    )
    model_ema: bool = option(
        False, "keep an EMA of the weights (timm ModelEmaV3), evaluated too", group="optimization"
    )


@dataclasses.dataclass
class DetectConfig(DenseConfig):
    INPUT_SIDES: ClassVar[tuple[str, ...]] = ("min_size", "max_size")

    arch: Literal["retinanet", "maskrcnn"] = option(
        "retinanet", "detector", group="model", choices=("retinanet", "maskrcnn")
    )
    train_split: str = option("train2017", "COCO split to train on", group="data")
    val_split: str = option("val2017", "COCO split to evaluate on", group="data")
    min_size: int = option(800, "shorter side of resized images", group="data", low=1)
    max_size: int = option(1333, "longest allowed longer side", group="data", low=1)
    multi_scale: bool = option(False, "train with shorter sides 0.6-1.0 × --min-size", group="data")
    fpn_channels: int = option(256, "FPN width", group="model", low=2)
    rois_per_image: int = option(
        512, "Mask R-CNN: proposals sampled per training image", group="model", low=1
    )


@dataclasses.dataclass
class SegmentConfig(DenseConfig):
    INPUT_SIDES: ClassVar[tuple[str, ...]] = ("crop_size",)

    head: Literal["fpn", "upernet"] = option("fpn", "decode head", group="model", choices=("fpn", "upernet"))
    train_split: str = option("training", "ADE20K split to train on", group="data")
    val_split: str = option("validation", "ADE20K split to evaluate on", group="data")
    num_classes: int | None = option(
        None, "number of classes (default: classes.txt, else 150)", group="data", low=1
    )
    crop_size: int = option(
        512, "training crop; evaluation resizes the shorter side to it", group="data", low=32
    )
    scale_range: tuple[float, float] = option(
        (0.5, 2.0), "multi-scale training: random rescale range (1 1 turns it off)", group="data", low=0,
        low_open=True, ordered=True, nargs=2, metavar=("LOW", "HIGH"),
    )  # fmt: skip
    head_channels: int | None = option(
        None, "decode head width (default 128 FPN, 512 UperNet)", group="model", low=1
    )
    epochs: int = option(64, "number of epochs", group="optimization", low=1)
    batch_size: int = option(4, "images per process and step", group="data", low=1)
    weight_decay: float = option(1e-4, "AdamW weight decay", group="optimization", low=0)
    sched: str = option(
        "poly", "timm learning-rate schedule (poly, multistep, cosine, ...)", group="optimization"
    )
    decay_rate: float = option(
        0.9, "poly: the power; multistep: the lr factor", group="optimization", low=0, low_open=True
    )
    warmup_steps: int | None = option(0, "linear warm-up in optimizer steps", group="optimization", low=0)


# Options that define a run: a resumed run refuses other values for them.
DENSE_RUN_DEFINING = ("model", "data", "train_split", "batch_size", "accum_steps", "seed", "limit_train")
DETECT_RUN_DEFINING = (
    *DENSE_RUN_DEFINING,
    "arch",
    "min_size",
    "max_size",
    "multi_scale",
    "fpn_channels",
    "rois_per_image",
)
SEGMENT_RUN_DEFINING = (*DENSE_RUN_DEFINING, "head", "num_classes", "crop_size", "head_channels")

DETECT_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},  # the defaults: mmdetection's 1× schedule
    "synthetic": dict(
        model="sepvit_lite",
        epochs=10,
        batch_size=8,
        lr=5e-4,
        weight_decay=1e-4,
        warmup_steps=50,
        decay_milestones=(8, 9),
        min_size=128,
        max_size=128,
        fpn_channels=64,
        rois_per_image=128,
        drop_path=0.0,
        train_split="train",
        val_split="val",
    ),
}
SEGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "paper-fpn": {},  # the defaults: Semantic FPN, 80k iterations
    "paper-upernet": dict(
        head="upernet",
        epochs=127,
        batch_size=2,
        lr=6e-5,
        weight_decay=1e-2,
        warmup_steps=1500,
        decay_rate=1.0,
        drop_path=0.3,
    ),
    "synthetic": dict(
        model="sepvit_lite",
        epochs=10,
        batch_size=8,
        lr=1e-3,
        weight_decay=1e-4,
        warmup_steps=30,
        decay_rate=1.0,
        crop_size=128,
        head_channels=64,
        drop_path=0.0,
    ),
}
