"""The ImageNet recipes under configs/: each loads through --config, validates, and states its paper's
numbers (the learning rate after the linear rule at the papers' total batch of 1024)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm

import sepvit  # noqa: F401  (registers our models with timm)
from sepvit.classify.config import PRESETS, RUN_DEFINING, ClassifyConfig
from sepvit.classify.task import ClassificationTask
from sepvit.cli import build_parser
from sepvit.cli.options import config_from_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The papers' numbers (SepViT Sec. 4.1; MobileViTv2 and EfficientViT as in /work/shared/targets.md).
EXPECTED = {
    "sepvit_tiny": dict(model="sepvit_tiny", drop_path=0.2, weight_decay=0.05, warmup_epochs=5.0, lr=1e-3),
    "sepvit_small": dict(model="sepvit_small", drop_path=0.3, weight_decay=0.05, warmup_epochs=5.0, lr=1e-3),
    "sepvit_base": dict(model="sepvit_base", drop_path=0.5, weight_decay=0.1, warmup_epochs=20.0, lr=1e-3),
    "mobilevitv2": dict(
        model="sv_mobilevitv2_100", img_size=256, warmup_steps=20000, lr=2e-3, model_ema=True
    ),
    "efficientvit": dict(
        model="sv_efficientvit_m4", weight_decay=0.025, clip_grad=0.02, warmup_epochs=5.0, lr=1e-3, mixup=0.8
    ),
}


def _load(path: Path, world_size: int) -> ClassifyConfig:
    namespace = build_parser().parse_args(["train", "--config", str(path), "--data", "imagenet"])
    config, resumed = config_from_args(ClassifyConfig, namespace, PRESETS, RUN_DEFINING)
    assert resumed is None and config.data == "imagenet"  # flags still win over the file
    return ClassificationTask(config).resolve(config, world_size)


def test_every_family_has_a_recipe() -> None:
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_recipe_loads_and_states_its_papers_numbers(name: str) -> None:
    config = _load(CONFIGS / f"{name}.yaml", world_size=8)  # 8 processes × 128: the papers' 1024
    assert timm.is_model(config.model)
    assert (config.epochs, config.opt, config.sched, config.batch_size * 8) == (300, "adamw", "cosine", 1024)
    for key, value in EXPECTED[name].items():
        assert getattr(config, key) == pytest.approx(value), key
    assert _load(CONFIGS / f"{name}.yaml", world_size=2).lr == pytest.approx(EXPECTED[name]["lr"] / 4)
