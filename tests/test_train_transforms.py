"""The training transform: timm's RandAugment at full magnitude on small images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sepvit.train.data import posterize, train_transform

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
    transform = train_transform(DATA_CONFIG, aa=policy, scale=(0.85, 1.0), hflip=0.0, reprob=0.0)
    ops = [op for step in transform.transforms for op in getattr(step, "ops", ())]
    ops += [op for step in transform.transforms for policy in getattr(step, "policy", ()) for op in policy]
    posterizes = [op for op in ops if op.name.startswith("Posterize")]
    assert posterizes and all(op.aug_fn is posterize for op in posterizes)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for _ in range(200):
        assert tuple(transform(image).shape) == (3, 32, 32)
