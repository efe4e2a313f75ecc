"""Options of ``sepvit train`` (classification): the typed configuration, presets and size recipes.

Options whose default is ``auto`` are filled in from the model size (drop path, weight decay,
warm-up, gradient clipping), the data (flips, crop), the machine (mixed precision, workers) and
the batch (learning rate). The resolved configuration is saved with each run as ``config.yaml``
and can be passed back with ``--config``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, ClassVar, Literal

from sepvit.classify.data import DIGITS_DATA
from sepvit.engine.config import AUTO, TrainConfig, option


@dataclasses.dataclass
class ClassifyConfig(TrainConfig):
    INPUT_SIDES: ClassVar[tuple[str, ...]] = ("img_size",)

    data: str = option(
        "digits",
        "'digits' (scikit-learn's bundled 8×8 digits, 80/20 stratified split with random_state=0; "
        "val is the test split), 'digits-val' (digits' train split alone, split again the same way, "
        "for choosing a recipe without the test images), a folder with train/<class>/* and "
        "val/<class>/* images, WebDataset shards (wds:DIR, a folder with _info.json, or a brace pattern "
        "such as shards/train-{000000..000127}.tar) or a Hugging Face dataset (hfds:NAME or a "
        "save_to_disk folder)",
        group="data",
        metavar="DIGITS|DIR|SHARDS|HFDS",
    )
    val_data: str | None = option(
        None,
        "validation shards, when --data names training shards without an _info.json val split beside them",
        group="data",
        metavar="SHARDS",
    )
    img_size: int | Literal["auto"] = option(
        AUTO,
        "input size in pixels; also the size the model's window grid is built for (auto: the "
        "model's default, 224 for ours)",
        group="data",
        low=1,
    )
    # -- augmentation
    aa: str = option(
        "rand-m9-mstd0.5-inc1", "timm auto-augment policy (RandAugment by default); 'none' turns it off",
        group="augmentation",
    )  # fmt: skip
    scale: tuple[float, float] = option(
        (0.08, 1.0), "random-resized-crop area range", group="augmentation", low=0, low_open=True, high=1,
        ordered=True, nargs=2, metavar=("MIN", "MAX"),
    )  # fmt: skip
    ratio: tuple[float, float] = option(
        (3 / 4, 4 / 3), "random-resized-crop aspect-ratio range (1 1 keeps the shape)", group="augmentation",
        low=0, low_open=True, ordered=True, nargs=2, metavar=("MIN", "MAX"),
    )  # fmt: skip
    hflip: float | Literal["auto"] = option(
        AUTO, "horizontal flip probability (auto: 0 for digits, 0.5 for folders)", group="augmentation",
        low=0, high=1,
    )  # fmt: skip
    reprob: float = option(0.25, "random erasing probability", group="augmentation", low=0, high=1)
    mixup: float = option(0.8, "mixup alpha (0 turns mixup off)", group="augmentation", low=0)
    cutmix: float = option(1.0, "cutmix alpha (0 turns cutmix off)", group="augmentation", low=0)
    mixup_prob: float = option(
        1.0, "probability of applying mixup or cutmix to a batch", group="augmentation", low=0, high=1
    )
    smoothing: float = option(0.1, "label smoothing", group="augmentation", low=0, high=1, high_open=True)
    crop_pct: float | Literal["auto"] = option(
        AUTO, "centre-crop fraction at evaluation (auto: 1.0 for digits, the model's default for folders)",
        group="augmentation", low=0, low_open=True, high=1,
    )  # fmt: skip
    # -- model
    pretrained: str | None = option(
        None,
        "fine-tune from pretrained weights: timm's published weights of --model (no FILE; from the "
        "Hugging Face cache or hub), or a local FILE (a checkpoint of ours, a timm state dict, an "
        "official SepViT checkpoint); the classifier is replaced when the class count differs",
        group="model",
        nargs="?",
        const="timm",
        metavar="FILE",
    )
    # -- optimisation
    lr_base: float = option(
        1e-3, "learning rate at lr_base_size images per step, scaled linearly to the effective batch "
        "(used when --lr is not given)",
        group="optimization", low=0, low_open=True,
    )  # fmt: skip
    lr_base_size: int = option(1024, "global batch size that lr_base refers to", group="optimization", low=1)


# Options that define a run: a resumed run refuses other values for them.
RUN_DEFINING = (
    "model",
    "data",
    "val_data",
    "img_size",
    "batch_size",
    "accum_steps",
    "seed",
    "limit_train",
    "pretrained",
)

PRESETS: dict[str, dict[str, Any]] = {
    # sepvit_lite with the paper's 7×7 windows on the 8×8 digits upsampled to 28 px: stage 1's 7×7
    # tokens fill one window exactly (at 32 px, 8×8 tokens left a row and a column in windows of
    # their own, and cost more). Sized for under 3 minutes on 2 CPU cores: batches of 64 (small
    # batches leave the cores idle), a moderate peak learning rate, random resized crops and one
    # geometric RandAugment op per image (timm's 'weights' choice: mostly rotations, shears and
    # shifts, which handwriting varies by), no mixup (it slowed learning), drop path 0.1, and EMA
    # weights, which the demo evaluates. The cosine schedule ends at a fifth of its peak and the
    # EMA's warm-up power is 0.85, so the EMA averages the last 20 or so epochs of weights that
    # still move (timm's default 2/3 averages about five nearly identical ones, as the learning
    # rate reaches zero); 0.999 is a ceiling. Evaluation zooms in as the training crops do (centre
    # crop of 0.875 of the image enlarged to 32 px): on digits-val that cut the errors of 16 trained
    # models by 30% (docs/training.md). Chosen on the digits-val split. Validating every tenth epoch
    # instead of every one saves a few seconds and changes no weight (evaluation draws no random
    # numbers the training uses).
    "digits-demo": {
        "model": "sepvit_lite",
        "data": "digits",
        "img_size": 28,
        "epochs": 60,
        "batch_size": 64,
        "lr": 1.5e-3,
        "warmup_epochs": 1,
        "aa": "rand-m5-n1-mstd0.5-tweights",
        "scale": (0.85, 1.0),
        "reprob": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "smoothing": 0.1,
        "crop_pct": 0.875,
        "drop_path": 0.1,
        "model_ema": True,
        "ema_decay": 0.999,
        "ema_warmup_power": 0.85,
        "min_lr": 3e-4,
        "amp": "none",
        "val_interval": 10,
    },
}

# Recipe defaults by model size (paper settings where the paper gives them); first match wins.
SIZE_RECIPES: list[tuple[str, dict[str, Any]]] = [
    ("sepvit_lite*", {"drop_path": 0.1, "weight_decay": 0.05, "warmup_epochs": 5}),
    ("sepvit_tiny*", {"drop_path": 0.2, "weight_decay": 0.05, "warmup_epochs": 5}),
    ("sepvit_small*", {"drop_path": 0.3, "weight_decay": 0.05, "warmup_epochs": 5}),
    ("sepvit_base*", {"drop_path": 0.5, "weight_decay": 0.1, "warmup_epochs": 20}),
    ("*efficientvit_m*", {"drop_path": 0.0, "weight_decay": 0.025, "warmup_epochs": 5, "clip_grad": 0.02}),
    ("*mobilevitv2*", {"drop_path": 0.0, "weight_decay": 0.05, "warmup_epochs": 5}),
    ("*", {"drop_path": 0.1, "weight_decay": 0.05, "warmup_epochs": 5}),
]


def effective_batch(config: ClassifyConfig, world_size: int) -> int:
    return config.batch_size * config.accum_steps * world_size


def apply_recipe_defaults(config: ClassifyConfig, world_size: int) -> ClassifyConfig:
    """Fill ``auto`` options from the model size, the data and the batch; returns a new config."""
    recipe = dict(next(r for pattern, r in SIZE_RECIPES if fnmatch.fnmatch(config.model, pattern)))
    recipe["warmup_epochs"] = min(recipe["warmup_epochs"], config.epochs // 10)
    recipe.setdefault("clip_grad", None)
    changes = {key: value for key, value in recipe.items() if getattr(config, key) == AUTO}
    is_digits = config.data in DIGITS_DATA
    if config.hflip == AUTO:
        changes["hflip"] = 0.0 if is_digits else 0.5
    if config.lr is None:  # the linear rule the papers' recipes state their learning rate with
        changes["lr"] = config.lr_base * effective_batch(config, world_size) / config.lr_base_size
    if is_digits and config.crop_pct == AUTO:
        changes["crop_pct"] = 1.0
    return dataclasses.replace(config, **changes)
