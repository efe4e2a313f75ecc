"""The ablation tasks: deterministic, the pair-sum label needs two far-apart windows, splits disjoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sepvit.ablation.tasks import TaskSpec, digit_pools, generate_split, write_image_folder

WINDOW_PIXELS = 16  # a first-stage window of a 128-px model: 4×4 tokens of stride 4


def test_same_spec_gives_same_data_and_seeds_differ() -> None:
    first = generate_split(TaskSpec(seed=3), "train", 40)
    again = generate_split(TaskSpec(seed=3), "train", 40)
    other = generate_split(TaskSpec(seed=4), "train", 40)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(first.images, other.images)


def test_pair_sum_label_is_the_sum_of_two_digits_in_different_windows() -> None:
    data = generate_split(TaskSpec(), "train", 300)
    np.testing.assert_array_equal(data.labels, data.digits.sum(axis=1) % 10)
    first, second = data.centres[:, 0], data.centres[:, 1]
    assert (np.hypot(*(first - second).T) >= 64).all()
    assert ((first // WINDOW_PIXELS) != (second // WINDOW_PIXELS)).any(axis=1).all()
    # Neither digit alone decides the label: for each value of one digit, the labels spread widely.
    for slot in (0, 1):
        for digit in range(10):
            labels = data.labels[data.digits[:, slot] == digit]
            assert len(set(labels.tolist())) >= min(len(labels), 6)


def test_single_task_label_is_its_one_digit() -> None:
    data = generate_split(TaskSpec(task="single"), "val", 50)
    np.testing.assert_array_equal(data.labels, data.digits[:, 0])
    assert (data.digits[:, 1] == -1).all()


def test_digits_are_drawn_where_the_centres_say() -> None:
    spec = TaskSpec(clutter=0)
    data = generate_split(spec, "test", 20)
    least_ink = digit_pools(spec.seed)["test"][0].sum(axis=(1, 2)).min()
    for image, centres in zip(data.images, data.centres):
        ink = 1 - image.astype(np.float32) / 255
        for row, col in centres:
            half = spec.digit_size // 2
            assert ink[row - half : row + half, col - half : col + half].sum() > 0.5 * least_ink


def test_splits_use_disjoint_digit_images() -> None:
    pools = digit_pools(0)
    flat = {name: {ink.tobytes() for ink in images} for name, (images, _) in pools.items()}
    assert not flat["train"] & flat["test"] and not flat["train"] & flat["val"]
    assert sum(len(images) for images, _ in pools.values()) == 1797


def test_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="task must be"):
        TaskSpec(task="sum")
    with pytest.raises(ValueError, match="apart"):
        TaskSpec(canvas=40, min_distance=60)


def test_image_folder_layout(tmp_path) -> None:
    root = write_image_folder(TaskSpec(), {"train": 12, "val": 4, "test": 4}, tmp_path / "task")
    files = sorted(root.glob("*/*/*.png"))
    assert len(files) == 20
    assert not (tmp_path / ".task.partial").exists()
    with Image.open(files[0]) as image:
        assert image.size == (128, 128)
    assert {path.parent.parent.name for path in files} == {"train", "val", "test"}
