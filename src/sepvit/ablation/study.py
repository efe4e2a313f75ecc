"""What the ablation study trains: the variants of the paper's Tables 5 and 6, two baselines, the protocols.

Every model is SepViT at a small width (``Protocol.embed_dims``) on the task's 32 × 192-px strip, with
stride-4 patches and 2 × 2-token windows (GSA 4 × 4), so that each of the task's three regions is
one window of the last stage. All variants share the stem, the patch merging, the conditional
position encoding, widths, depths, heads and MLPs; only the attention of the blocks that have several
windows differs:

- ``sepvit``: the paper's final model, plan ``D,D&G,D&G,D``, learnable window tokens.
- ``avgpool``, ``dwconv``: the window's representation for PSA by average pooling or a depthwise
  convolution instead of a window token (Table 6).
- ``dssa``: DSSA alone (plan ``D,D,D,D``) with fixed zero window tokens (Table 5's first step).
- ``local``: attention inside each window and nothing among windows.
- ``swin-cpvt``: the paper's "Swin-T + CPVT" baseline (Table 5): W-MSA and SW-MSA (every second block
  of a stage shifted by half a window, from stage 1 on), on SepViT's stem, merging and position
  encoding.
- ``swin``: timm's SwinTransformer at the same width, depths, heads and windows (4 × 4 patches,
  linear merging, relative position bias): a reference row, not a comparison.

Table 5's intermediate step (DSSA + GSA with zero tokens) and Table 7's block plans differ from these
by less than the smallest effect this scale can resolve; the study leaves them out.

Each variant belongs to a family whose learning rate is chosen on a pilot (``Protocol.lrs``, on the
validation split of the main task, with a seed not used by the main runs), then every seed trains
with it. The seeds are paired: seed s gives every variant the same data order and the same
initialisation seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sepvit.ablation.tasks import TASKS, TaskSpec
from sepvit.errors import ConfigError

SEPVIT_FACTORY = "sepvit_lite"  # widths, depths and heads are the protocol's
SWIN_FACTORY = "swin_tiny_patch4_window7_224"
MAIN_TASK, CONTROL_TASK = "cue", "single"
PHASES = ("pilot", "main")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    family: str  # variants of one family share the learning rate its pilot chose
    options: dict[str, Any] = field(default_factory=dict)  # SepViT constructor options
    factory: str = SEPVIT_FACTORY
    reference: bool = False  # a reference row: fewer seeds, in no comparison


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("sepvit", "SepViT: D,D&G,D&G,D, learnable window tokens", "sepvit"),
        Variant(
            "avgpool",
            "window representation by average pooling (Table 6)",
            "sepvit",
            {"window_representation": "avgpool"},
        ),
        Variant(
            "dwconv",
            "window representation by depthwise convolution (Table 6)",
            "sepvit",
            {"window_representation": "dwconv"},
        ),
        Variant(
            "dssa",
            "DSSA only, zero window tokens (Table 5)",
            "sepvit",
            {"block_plan": "D,D,D,D", "window_token": "zero"},
        ),
        Variant(
            "local",
            "local-only: attention inside windows, nothing among them",
            "local",
            {"block_plan": "D,D,D,D", "window_attention": "local"},
        ),
        Variant(
            "swin-cpvt",
            "Swin + CPVT: W-MSA / SW-MSA on SepViT's stem, merging and CPE (Table 5)",
            "swin-cpvt",
            {"block_plan": "D,D,D,D", "window_attention": "shifted"},
        ),
        Variant(
            "swin",
            "timm's SwinTransformer at the same size (reference)",
            "swin",
            factory=SWIN_FACTORY,
            reference=True,
        ),
    )
}
FAMILIES = tuple(dict.fromkeys(variant.family for variant in VARIANTS.values()))


@dataclass(frozen=True)
class Protocol:
    """Data sizes, model size, recipe, seeds and decision rules of one run of the study."""

    name: str
    sizes: dict[str, int]  # canvases per split: train, val, test
    epochs: int
    pilot_epochs: int  # the pilot's runs: shorter, on their own cosine schedule
    seeds: tuple[int, ...]  # main runs of every non-reference variant on the main task
    control_seeds: tuple[int, ...]  # runs of every variant on the control task
    reference_seeds: tuple[int, ...]  # main-task runs of the reference rows
    lrs: tuple[float, ...]  # the pilot's learning-rate grid
    pilot_seed: int
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    batch_size: int
    erf_images: int  # test images the effective receptive field is averaged over
    height: int = 32
    region: int = 64
    window_size: int = 2
    smallest_effect: float = 3.0  # top-1 points: declared before the runs, the rule's threshold
    control_gate: float = 90.0  # control top-1 (%) every seed of a variant must reach
    data_seed: int = 0  # the task draw: the same images for every variant and seed
    speed_rounds: int = 5  # interleaved rounds of the throughput measurement
    speed_seconds: float = 1.0  # each variant's time per round

    @property
    def img_size(self) -> tuple[int, int]:
        return self.height, 3 * self.region

    @property
    def fingerprint(self) -> str:
        """A digest of everything that shapes a run (data, model, recipe, grid): a record made under
        other settings of the same protocol name is never reused. Seeds, the task draw (recorded on
        its own) and the report's rules are left out."""
        unused = ("name", "seeds", "control_seeds", "reference_seeds", "data_seed", "smallest_effect",
                  "control_gate", "speed_rounds", "speed_seconds")  # fmt: skip
        shaping = {key: value for key, value in asdict(self).items() if key not in unused}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]

    def holds(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` was made by this protocol, settings and task draw."""
        return (record["protocol"], record["fingerprint"], record["data_seed"]) == (
            self.name, self.fingerprint, self.data_seed,
        )  # fmt: skip

    def task_spec(self, task: str) -> TaskSpec:
        return TaskSpec(task=task, height=self.height, region=self.region, seed=self.data_seed)

    def architecture(self, variant: Variant) -> dict[str, Any]:
        """The factory's keyword arguments for ``variant`` at this protocol's size."""
        common = {"img_size": self.img_size, "window_size": self.window_size, "depths": self.depths}
        if variant.factory == SWIN_FACTORY:
            return {**common, "embed_dim": self.embed_dims[0], "num_heads": self.num_heads}
        return {**common, "embed_dims": self.embed_dims, "num_heads": self.num_heads, **variant.options}

    def recipe(self, lr: float, epochs: int) -> dict[str, Any]:
        """The training options every variant shares (``ClassifyConfig`` fields), at ``lr`` for ``epochs``.

        No augmentation that would move, cut or mirror the regions (no crops, flips, RandAugment,
        erasing, mixup or cutmix), label smoothing, AdamW with a cosine schedule, no EMA; every epoch
        validated (the learning curves), the last epoch's weights measured.
        """
        return {
            "epochs": epochs,
            "batch_size": self.batch_size,
            "lr": lr,
            "weight_decay": 0.05,
            "warmup_epochs": min(2.0, epochs / 10),
            "drop_path": 0.1,
            "clip_grad": 5.0,
            "aa": "none",
            "scale": (1.0, 1.0),
            "ratio": (3 * self.region / self.height,) * 2,  # the whole canvas, never a crop of it
            "hflip": 0.0,
            "reprob": 0.0,
            "mixup": 0.0,
            "cutmix": 0.0,
            "smoothing": 0.1,
            "crop_pct": 1.0,
            "model_ema": False,
            "tensorboard": False,
            "log_interval": 1000,
            "img_size": self.height,  # the data follows the architecture's (H, W)
        }

    def pilot_plan(self, variants: tuple[str, ...] | None = None) -> list[tuple[str, str, int, float]]:
        """(task, variant, seed, lr) of the pilot: each family's first variant at every rate."""
        families = {VARIANTS[name].family for name in self.checked(variants)}
        leaders = [next(v for v in VARIANTS.values() if v.family == family) for family in FAMILIES]
        return [
            (MAIN_TASK, leader.name, self.pilot_seed, lr)
            for leader in leaders
            if leader.family in families
            for lr in self.lrs
        ]

    def main_plan(
        self,
        lrs: dict[str, float],
        tasks: tuple[str, ...] | None = None,
        variants: tuple[str, ...] | None = None,
        seeds: tuple[int, ...] | None = None,
    ) -> list[tuple[str, str, int, float]]:
        """(task, variant, seed, lr) of every main run, seed-major so that a partial study covers every
        variant; ``lrs`` maps each family to its chosen rate."""
        for name in tasks or ():
            if name not in TASKS:
                raise ConfigError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
        chosen = self.checked(variants)
        runs = []
        for task in tasks or TASKS:
            for variant in chosen:
                if task == CONTROL_TASK:
                    planned = self.control_seeds
                else:
                    planned = self.reference_seeds if VARIANTS[variant].reference else self.seeds
                for seed in seeds or planned:
                    runs.append((task, variant, seed, lrs[VARIANTS[variant].family]))
        return sorted(runs, key=lambda run: (run[2], TASKS.index(run[0])))

    @staticmethod
    def checked(variants: tuple[str, ...] | None) -> tuple[str, ...]:
        """``variants`` (all of them for None), each known."""
        for name in variants or ():
            if name not in VARIANTS:
                raise ConfigError(f"unknown variant {name!r}; the variants are {', '.join(VARIANTS)}")
        return variants or tuple(VARIANTS)


PROTOCOLS: dict[str, Protocol] = {
    # Seconds per run, for tests: a few images, one epoch, a tiny width.
    "smoke": Protocol(
        name="smoke",
        sizes={"train": 64, "val": 32, "test": 32},
        epochs=1,
        pilot_epochs=1,
        seeds=(0, 1),
        control_seeds=(0,),
        reference_seeds=(0,),
        lrs=(1e-3, 2e-3),
        pilot_seed=100,
        embed_dims=(8, 16, 32, 64),
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        batch_size=16,
        erf_images=2,
        speed_rounds=1,
        speed_seconds=0.05,
    ),
    # The 2-core CPU with --jobs 2: about 4 hours (docs/ablations.md, "Budget").
    "reduced": Protocol(
        name="reduced",
        sizes={"train": 4000, "val": 1000, "test": 1000},
        epochs=20,
        pilot_epochs=10,
        seeds=(0, 1, 2, 3, 4),
        control_seeds=(0, 1),
        reference_seeds=(0, 1),
        lrs=(5e-4, 1e-3, 2e-3),
        pilot_seed=100,
        embed_dims=(16, 32, 64, 128),
        depths=(2, 2, 4, 2),
        num_heads=(1, 2, 4, 8),
        batch_size=32,
        erf_images=16,
    ),
    # For a GPU (--device cuda): SepViT-Lite's width, more data, epochs and seeds.
    "full": Protocol(
        name="full",
        sizes={"train": 20000, "val": 2000, "test": 4000},
        epochs=40,
        pilot_epochs=20,
        seeds=tuple(range(10)),
        control_seeds=(0, 1, 2),
        reference_seeds=(0, 1, 2),
        lrs=(5e-4, 1e-3, 2e-3),
        pilot_seed=100,
        embed_dims=(32, 64, 128, 256),
        depths=(2, 2, 4, 2),
        num_heads=(1, 2, 4, 8),
        batch_size=128,
        erf_images=64,
    ),
}
