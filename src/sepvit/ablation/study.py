"""What the ablation study trains: the variants of the paper's Tables 5–7, two baselines, the protocols.

Every model is built at a structurally faithful small scale: stride-4 patches and windows of a
sixteenth of the input side (64-px inputs with 2×2 windows, GSA 4×4, in the reduced protocol; 128 px
with 4×4 windows, GSA 8×8, in the full one), so the window grids of the four stages are 8×8, 4×4, 2×2
and 1×1, as in the paper's 224-px models with 7×7 windows; the blocks that are DSSA, GSA or
single-window (global attention) are the same ones.
All variants share the protocol's width, depth and heads and one training recipe.

Variants (``VARIANTS``): the paper's final SepViT (``sepvit``: plan ``D,D&G,D&G,D``, learnable window
tokens), Table 5's steps (``dssa``: DSSA alone with zero window tokens; ``dssa-gsa``: with GSA, zero
tokens), Table 6's window representations (``avgpool``, ``dwconv``), Table 7's other block plans
(``plan-dddd``, ``plan-d-d-dg-d``, ``plan-d-gd-gd-d``, learnable tokens), the local-only baseline
(``local``: attention inside each window, nothing among windows) and a Swin-style baseline (``swin``:
timm's SwinTransformer with 4×4 patches and the same windows, width, depth and heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sepvit.ablation.tasks import TASKS, TaskSpec
from sepvit.errors import ConfigError

DATA_SEED = 0  # the task images are the same for every variant and seed
SEPVIT_FACTORY = "sepvit_lite"  # widths, depths and heads are the protocol's
SWIN_FACTORY = "swin_tiny_patch4_window7_224"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)  # SepViT constructor options
    factory: str = SEPVIT_FACTORY


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("sepvit", "SepViT: D,D&G,D&G,D, learnable window tokens (Tables 5-7)"),
        Variant(
            "dssa",
            "DSSA only, zero window tokens (Table 5)",
            {"block_plan": "D,D,D,D", "window_token": "zero"},
        ),
        Variant("dssa-gsa", "DSSA + GSA, zero window tokens (Table 5)", {"window_token": "zero"}),
        Variant(
            "avgpool",
            "window representation by average pooling (Table 6)",
            {"window_representation": "avgpool"},
        ),
        Variant(
            "dwconv",
            "window representation by depthwise convolution (Table 6)",
            {"window_representation": "dwconv"},
        ),
        Variant("plan-dddd", "plan D,D,D,D, learnable tokens (Table 7)", {"block_plan": "D,D,D,D"}),
        Variant("plan-d-d-dg-d", "plan D,D,D&G,D (Table 7)", {"block_plan": "D,D,D&G,D"}),
        Variant("plan-d-gd-gd-d", "plan D,G&D,G&D,D (Table 7)", {"block_plan": "D,G&D,G&D,D"}),
        Variant(
            "local",
            "local-only: attention inside windows, no PSA or GSA",
            {"block_plan": "D,D,D,D", "local_only": True},
        ),
        Variant("swin", "Swin-style: timm SwinTransformer, shifted windows", factory=SWIN_FACTORY),
    )
}


@dataclass(frozen=True)
class Protocol:
    """Data sizes, model size, recipe and seeds of one run of the study."""

    name: str
    sizes: dict[str, int]  # canvases per split: train, val, test
    epochs: int
    seeds: tuple[int, ...]
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    batch_size: int
    lr: float
    control_variants: tuple[str, ...] | None  # variants also trained on the single-digit task (None: all)
    erf_images: int  # test images the effective receptive field is averaged over
    img_size: int = 64
    window_size: int = 2  # 64 px / stride 4 = 16-px maps: an 8×8 grid of 2×2 windows, as 56 / 7 at 224 px
    digit_scale: int = 3  # 24-px digits on 64 px: three eighths of the canvas

    def task_spec(self, task: str) -> TaskSpec:
        """The canvases of ``task`` at this protocol's size (digits 3/8 of the canvas wide, moved by up
        to 1/8 of it; fragments of clutter in proportion to the area)."""
        return TaskSpec(
            task=task,
            canvas=self.img_size,
            scale=self.digit_scale,
            clutter=6 * (self.img_size // 64) ** 2,
            jitter=self.img_size // 8,
            seed=DATA_SEED,
        )

    def architecture(self, variant: Variant) -> dict[str, Any]:
        """The factory's keyword arguments for ``variant`` at this protocol's size."""
        common = {"img_size": self.img_size, "window_size": self.window_size, "depths": self.depths}
        if variant.factory == SWIN_FACTORY:
            return {**common, "embed_dim": self.embed_dims[0], "num_heads": self.num_heads}
        return {**common, "embed_dims": self.embed_dims, "num_heads": self.num_heads, **variant.options}

    def recipe(self) -> dict[str, Any]:
        """The training options every variant shares (``ClassifyConfig`` fields).

        No augmentation that would move, cut or mirror digits out of their places (no crops, flips,
        RandAugment, erasing, mixup or cutmix), label smoothing, AdamW with a cosine schedule, no EMA
        (the runs are too short for it), best weights chosen on the validation split.
        """
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": 0.05,
            "warmup_epochs": min(1.0, self.epochs / 10),
            "drop_path": 0.1,
            "clip_grad": 5.0,
            "aa": "none",
            "scale": (1.0, 1.0),
            "hflip": 0.0,
            "reprob": 0.0,
            "mixup": 0.0,
            "cutmix": 0.0,
            "smoothing": 0.1,
            "crop_pct": 1.0,
            "model_ema": False,
            "tensorboard": False,
            "log_interval": 1000,
            "img_size": self.img_size,
        }

    def plan(
        self,
        tasks: tuple[str, ...] | None = None,
        variants: tuple[str, ...] | None = None,
        seeds: tuple[int, ...] | None = None,
    ) -> list[tuple[str, str, int]]:
        """(task, variant, seed) of every run, seed-major so that a partial study covers all variants."""
        for name in variants or ():
            if name not in VARIANTS:
                raise ConfigError(f"unknown variant {name!r}; the variants are {', '.join(VARIANTS)}")
        for name in tasks or ():
            if name not in TASKS:
                raise ConfigError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
        runs = []
        for seed in seeds or self.seeds:
            for task in tasks or TASKS:
                chosen = variants or tuple(VARIANTS)
                if task == "single" and self.control_variants is not None:
                    chosen = tuple(v for v in chosen if v in self.control_variants)
                runs.extend((task, variant, seed) for variant in chosen)
        return runs


# Control-task variants in the reduced protocol: the final model and the two baselines.
REDUCED_CONTROL = ("sepvit", "local", "swin")

PROTOCOLS: dict[str, Protocol] = {
    # Seconds per run, for tests: a few images, one epoch, a tiny width.
    "smoke": Protocol(
        name="smoke",
        sizes={"train": 96, "val": 48, "test": 48},
        epochs=1,
        seeds=(0,),
        embed_dims=(8, 16, 32, 64),
        depths=(1, 2, 2, 1),
        num_heads=(1, 2, 4, 8),
        batch_size=16,
        lr=1e-3,
        control_variants=None,
        erf_images=2,
    ),
    # About 1.5 hours on the 2-core CPU with --jobs 2 (two one-thread runs side by side; docs/ablations.md).
    "reduced": Protocol(
        name="reduced",
        sizes={"train": 4000, "val": 500, "test": 1000},
        epochs=20,
        seeds=(0, 1, 2),
        embed_dims=(16, 32, 64, 128),
        depths=(1, 2, 6, 2),
        num_heads=(1, 2, 4, 8),
        batch_size=32,
        lr=2e-3,
        control_variants=REDUCED_CONTROL,
        erf_images=16,
    ),
    # For a GPU (--device cuda): 128 px with 4×4 windows (the geometry), SepViT-Lite's width,
    # more data and epochs, five seeds, every variant.
    "full": Protocol(
        name="full",
        sizes={"train": 10000, "val": 1000, "test": 2000},
        epochs=60,
        seeds=(0, 1, 2, 3, 4),
        embed_dims=(32, 64, 128, 256),
        depths=(1, 2, 6, 2),
        num_heads=(1, 2, 4, 8),
        batch_size=128,
        lr=2e-3,
        control_variants=None,
        erf_images=64,
        img_size=128,
        window_size=4,
        digit_scale=6,
    ),
}
