"""The training transform: timm's RandAugment at full magnitude on small images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sepvit.classify.data import posterize, train_transform

DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
}


def test_posterize_keeps_the_given_bits():
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("RGB")
    assert np.array_equal(np.asarray(posterize(image, 8)), np.asarray(image))
    assert np.asarray(posterize(image, 0)).max() == 0
    kept = np.asarray(posterize(image, 2))
    assert set(np.unique(kept)) == {0, 64, 128, 192}


@pytest.mark.parametrize("policy", ["rand-m10-n3-mstd0-inc1", "augmix-m10-w3", "v0"])
def test_policies_at_full_magnitude_run_on_small_images(policy):
    """RandAugment's increasing posterize keeps 0 bits at magnitude 10 (Pillow 12 refuses 0 bits)."""
    transform = train_transform(
        DATA_CONFIG, aa=policy, scale=(0.85, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.0, reprob=0.0
    )
    ops = [op for step in transform.transforms for op in getattr(step, "ops", ())]
    ops += [op for step in transform.transforms for policy in getattr(step, "policy", ()) for op in policy]
    posterizes = [op for op in ops if op.name.startswith("Posterize")]
    assert posterizes and all(op.aug_fn is posterize for op in posterizes)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for _ in range(200):
        assert tuple(transform(image).shape) == (3, 32, 32)


def test_crops_keep_the_aspect_ratio_when_asked() -> None:
    """A ring drawn on a square canvas stays round with ratio (1, 1) and is stretched by (1/2, 2)."""
    yy, xx = np.mgrid[:64, :64]
    ring = np.abs(np.hypot(yy - 31.5, xx - 31.5) - 10) < 2.5  # inside every crop of 60%
    image = Image.fromarray(np.where(ring, 0, 255).astype(np.uint8)).convert("RGB")

    def ring_aspects(ratio: tuple[float, float]) -> list[float]:
        transform = train_transform(
            DATA_CONFIG, aa="none", scale=(0.6, 0.6), ratio=ratio, hflip=0.0, reprob=0.0
        )
        aspects = []
        for _ in range(40):
            ink = transform(image)[0] < 0
            rows, cols = ink.any(1).nonzero().flatten(), ink.any(0).nonzero().flatten()
            aspects.append(float((rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1)))
        return aspects

    assert all(0.85 < a < 1.18 for a in ring_aspects((1.0, 1.0)))
    assert max(abs(np.log(a)) for a in ring_aspects((0.5, 2.0))) > 0.4
