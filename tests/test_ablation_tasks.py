"""The ablation tasks: deterministic, the cue's label needs three regions combined non-additively, and
a model that pools what each region shows cannot pass the pooled-evidence ceiling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sepvit.ablation.tasks import (
    CUE_LEFT,
    CUE_RIGHT,
    NUM_CLASSES,
    TaskSpec,
    digit_pools,
    generate_split,
    pooled_evidence_ceiling,
    write_image_folder,
)


def test_same_spec_gives_same_data_and_seeds_differ() -> None:
    first = generate_split(TaskSpec(seed=3), "train", 40)
    again = generate_split(TaskSpec(seed=3), "train", 40)
    other = generate_split(TaskSpec(seed=4), "train", 40)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(first.images, other.images)


def region_of(column: int, spec: TaskSpec) -> int:
    return column // spec.region


def test_cue_label_is_the_cued_digit_and_each_thing_stays_in_its_region() -> None:
    spec = TaskSpec()
    data = generate_split(spec, "val", 2000)
    assert data.images.shape == (2000, 32, 192) and (data.digits >= 0).all()
    np.testing.assert_array_equal(data.labels, data.digits[np.arange(2000), data.cues])
    digit = (spec.digit_size // 2, spec.digit_size // 2)
    bars = {
        CUE_LEFT: (spec.cue_width // 2, spec.cue_length // 2),
        CUE_RIGHT: (spec.cue_length // 2, spec.cue_width // 2),
    }
    for centres, cue in zip(data.centres, data.cues):
        for slot, (half_height, half_width) in ((0, digit), (1, bars[cue]), (2, digit)):
            row, col = centres[slot]
            # drawings never cross a region's border: each is inside one last-stage window
            assert region_of(col - half_width, spec) == region_of(col + half_width - 1, spec) == slot
            assert row - half_height >= 0 and row + half_height <= spec.height
    # Neither digit alone, nor the cue alone, tells the label: each is the label about half the time
    # (more when the digits happen to be equal), and the cue is left or right equally often.
    for side in (0, 1):
        agreement = (data.labels == data.digits[:, side]).mean()
        assert 0.5 < agreement < 0.62
    assert 0.45 < (data.cues == CUE_LEFT).mean() < 0.55
    assert len({tuple(c) for c in data.centres[:, 0]}) > 50  # the digits move about their regions


def test_single_task_label_is_its_one_digit_on_either_side() -> None:
    spec = TaskSpec(task="single")
    data = generate_split(spec, "val", 100)
    present = (data.digits >= 0).sum(axis=1)
    assert (present == 1).all() and (data.cues == -1).all()
    np.testing.assert_array_equal(data.labels, data.digits.max(axis=1))
    left = data.digits[:, 0] >= 0
    assert 0 < left.sum() < len(left)


def test_digits_and_cues_are_drawn_where_the_centres_say() -> None:
    spec = TaskSpec()
    data = generate_split(spec, "test", 20)
    least_ink = digit_pools(spec.seed)["test"][0].sum(axis=(1, 2)).min() * spec.scale**2
    for image, centres, cue in zip(data.images, data.centres, data.cues):
        ink = 1 - image.astype(np.float32) / 255
        for slot in (0, 2):
            row, col = centres[slot]
            half = spec.digit_size // 2
            assert ink[row - half : row + half, col - half : col + half].sum() > 0.8 * least_ink
        row, col = centres[1]
        horizontal = ink[row - 1 : row + 2, max(col - 8, 0) : col + 8].mean()
        vertical = ink[max(row - 8, 0) : row + 8, col - 1 : col + 2].mean()
        assert (horizontal > vertical) == (cue == CUE_LEFT)


def test_splits_use_disjoint_digit_images() -> None:
    pools = digit_pools(0)
    flat = {name: {ink.tobytes() for ink in images} for name, (images, _) in pools.items()}
    assert not flat["train"] & flat["test"] and not flat["train"] & flat["val"]
    assert sum(len(images) for images, _ in pools.values()) == 1797


def test_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="task must be"):
        TaskSpec(task="sum")
    with pytest.raises(ValueError, match="must fit"):
        TaskSpec(height=20)
    with pytest.raises(ValueError, match="at least 10 images"):
        generate_split(TaskSpec(), "val", 9)


def test_image_folder_layout(tmp_path) -> None:
    root = write_image_folder(TaskSpec(), {"train": 12, "val": 10, "test": 10}, tmp_path / "task")
    files = sorted(root.glob("*/*/*.png"))
    assert len(files) == 32
    assert not (tmp_path / ".task.partial").exists()
    with Image.open(files[0]) as image:
        assert image.size == (192, 32)
    assert {path.parent.parent.name for path in files} == {"train", "val", "test"}


@pytest.mark.parametrize("task", ["cue", "single"])
def test_every_split_has_every_class_even_when_small(task) -> None:
    for split in ("train", "val", "test"):
        data = generate_split(TaskSpec(task=task), split, NUM_CLASSES + 2)
        assert set(data.labels.tolist()) == set(range(NUM_CLASSES))


# ------------------------------------------------------------------------ the pooled-evidence ceiling


def exact_cue_distribution() -> tuple[np.ndarray, np.ndarray]:
    """Every (left digit, cue, right digit) once: all equally likely, as in the task."""
    cases = np.array(list(itertools.product(range(10), range(2), range(10))))
    return cases, np.where(cases[:, 1] == CUE_LEFT, cases[:, 0], cases[:, 2])


def additive_accuracy(left: np.ndarray, cue: np.ndarray, right: np.ndarray) -> float:
    """Top-1 on every equally likely case of the rule score_y = left[l, y] + cue[c, y] + right[r, y]."""
    cases, labels = exact_cue_distribution()
    scores = left[cases[:, 0]] + cue[cases[:, 1]] + right[cases[:, 2]]
    return float((scores.argmax(axis=1) == labels).mean())


def test_the_ceiling_is_reached_by_an_additive_rule_and_no_search_passes_it() -> None:
    """Perfect perception of each region, combined additively: the rule of the ceiling's proof (each
    digit's own class far ahead, the cue shifting scores by class rank, pair-dependent offsets) makes
    exactly 77.5%; a long gradient search over additive rules stays at or under it; one interaction
    feature (which digit the cue picks) makes the same search exact."""
    assert pooled_evidence_ceiling() == pytest.approx(0.775)
    assert pooled_evidence_ceiling(np.eye(10)[3]) == pytest.approx(1.0)  # one digit only: always equal
    digits = np.arange(10)
    rank_gap = digits[None, :] - digits[:, None]  # [r, y] = y - r
    right = np.where(rank_gap > 0, -rank_gap / 2, -2 * rank_gap) + 100 * np.eye(10)
    cue = np.stack([digits.astype(float), np.zeros(10)])  # rows: CUE_LEFT, the other cue
    assert CUE_LEFT == 0
    assert additive_accuracy(100 * np.eye(10), cue, right) == pytest.approx(pooled_evidence_ceiling())

    cases, labels = exact_cue_distribution()
    regions = torch.cat(
        [
            nn.functional.one_hot(torch.as_tensor(cases[:, 0]), 10),
            nn.functional.one_hot(torch.as_tensor(cases[:, 1]), 2),
            nn.functional.one_hot(torch.as_tensor(cases[:, 2]), 10),
        ],
        dim=1,
    ).float()
    targets = torch.as_tensor(labels)

    def best_accuracy(features: torch.Tensor) -> float:
        best = 0.0
        for seed in range(4):
            torch.manual_seed(seed)
            scores = nn.Linear(features.shape[1], 10)  # additive in the one-hot blocks
            optimizer = torch.optim.Adam(scores.parameters(), lr=0.1)
            for _ in range(400):
                optimizer.zero_grad()
                nn.functional.cross_entropy(scores(features) * 4, targets).backward()
                optimizer.step()
            best = max(best, (scores(features).argmax(dim=1) == targets).float().mean().item())
        return best

    assert 0.5 <= best_accuracy(regions) <= pooled_evidence_ceiling() + 1e-9
    interaction = nn.functional.one_hot(targets, 10).float()  # what a model that combines regions knows
    assert best_accuracy(torch.cat([regions, interaction], dim=1)) == 1.0


class RegionEncoder(nn.Module):
    """A small CNN that sees one region at a time (at half resolution: 16 × 32 px)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )  # fmt: skip

    def forward(self, regions: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 64) -> (B, 3, width)
        batch = regions.shape[0]
        return self.net(regions.flatten(0, 1)[:, None]).view(batch, 3, -1)


class PooledModel(nn.Module):
    """Each region seen alone, the region features pooled (with the region's position, as a
    position encoding gives), then a linear head: SepViT's head without interaction among windows."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.position = RegionEncoder(), nn.Parameter(torch.zeros(3, 32))
        self.mix, self.head = nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        tokens = torch.relu(self.mix(self.encoder(regions) + self.position))  # per region, no mixing
        return self.head(tokens.mean(dim=1))


class CombiningModel(PooledModel):
    """The same perception, the regions' features combined before a nonlinearity."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(3 * 32, 64)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix((self.encoder(regions) + self.position).flatten(1))))


def as_regions(images: np.ndarray) -> torch.Tensor:
    ink = nn.functional.avg_pool2d(1 - torch.as_tensor(images, dtype=torch.float32)[:, None] / 255, 2)[:, 0]
    return ink.unflatten(2, (3, 32)).permute(0, 2, 1, 3)  # (B, 16, 96) -> (B, 3, 16, 32)


@pytest.mark.slow
def test_a_trained_model_that_pools_regions_stays_under_the_ceiling_one_that_combines_passes_it(
    one_thread,
) -> None:
    spec = TaskSpec()
    train, test = generate_split(spec, "train", 6000), generate_split(spec, "test", 1000)
    inputs, targets = as_regions(train.images), torch.as_tensor(train.labels)
    accuracy = {}
    for model_type in (PooledModel, CombiningModel):
        torch.manual_seed(0)
        model = model_type()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(5):
            for batch in torch.randperm(len(targets)).split(64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
                optimizer.step()
        with torch.no_grad():
            predicted = model.eval()(as_regions(test.images)).argmax(dim=1).numpy()
        accuracy[model_type.__name__] = (predicted == test.labels).mean()
    ceiling = pooled_evidence_ceiling()
    # It perceives the digits (far above chance) but cannot combine them with the cue.
    assert 0.45 < accuracy["PooledModel"] <= ceiling + 0.03, accuracy
    assert accuracy["CombiningModel"] > ceiling + 0.1, accuracy
