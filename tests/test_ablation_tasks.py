"""The ablation tasks: deterministic, the pair-sum label needs two windows apart, splits disjoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sepvit.ablation.tasks import TaskSpec, digit_pools, generate_split, write_image_folder

# Window sides in pixels of a 64-px model (stride-4 tokens, 2×2 windows) in stages 1, 2 and 3.
STAGE_WINDOW_PIXELS = (8, 16, 32)


def test_same_spec_gives_same_data_and_seeds_differ() -> None:
    first = generate_split(TaskSpec(seed=3), "train", 40)
    again = generate_split(TaskSpec(seed=3), "train", 40)
    other = generate_split(TaskSpec(seed=4), "train", 40)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(first.images, other.images)


def windows_touched(corner: np.ndarray, size: int, window: int) -> set[tuple[int, int]]:
    """The (row, col) windows of side ``window`` that a ``size``-px square at ``corner`` overlaps."""
    rows = range(corner[0] // window, (corner[0] + size - 1) // window + 1)
    cols = range(corner[1] // window, (corner[1] + size - 1) // window + 1)
    return {(r, c) for r in rows for c in cols}


def test_pair_sum_label_is_the_sum_of_two_digits_that_share_no_window_before_the_last_stage() -> None:
    spec = TaskSpec()
    data = generate_split(spec, "val", 1500)
    assert spec.num_classes == 19 and (data.digits >= 0).all()  # every evaluation canvas holds a pair
    np.testing.assert_array_equal(data.labels, data.digits.sum(axis=1))
    corners = data.centres - spec.digit_size // 2
    for first, second in zip(corners[:, 0], corners[:, 1]):
        for window in STAGE_WINDOW_PIXELS:
            assert not windows_touched(first, spec.digit_size, window) & windows_touched(
                second, spec.digit_size, window
            )
    # One digit alone gives at best one chance in ten: for each value of either digit the labels
    # spread over ten sums, the most frequent well under a quarter.
    for slot in (0, 1):
        for digit in range(10):
            labels = data.labels[data.digits[:, slot] == digit]
            assert len(set(labels.tolist())) == 10
            assert np.bincount(labels).max() < len(labels) / 4
    # The digits move: both halves see many places.
    assert len({tuple(c) for c in corners[:, 0]}) > 50 and len({tuple(c) for c in corners[:, 1]}) > 50


def test_pair_sum_training_canvases_hold_one_digit_in_the_given_share() -> None:
    data = generate_split(TaskSpec(single_share=0.25), "train", 800)
    one = data.digits[:, 1] == -1
    assert 0.2 < one.mean() < 0.3
    np.testing.assert_array_equal(data.labels[one], data.digits[one, 0])  # the sum of one digit
    np.testing.assert_array_equal(data.labels[~one], data.digits[~one].sum(axis=1))
    assert (generate_split(TaskSpec(single_share=0.0), "train", 100).digits >= 0).all()
    with pytest.raises(ValueError, match="single_share"):
        TaskSpec(single_share=1.0)


def test_single_task_label_is_its_one_digit_in_either_half() -> None:
    spec = TaskSpec(task="single")
    data = generate_split(spec, "val", 60)
    assert spec.num_classes == 10
    np.testing.assert_array_equal(data.labels, data.digits[:, 0])
    assert (data.digits[:, 1] == -1).all()
    left = data.centres[:, 0, 1] < spec.canvas // 2
    assert 0 < left.sum() < len(left)


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
    with pytest.raises(ValueError, match="side by side"):
        TaskSpec(canvas=40)
    with pytest.raises(ValueError, match="off a"):
        TaskSpec(jitter=30)


def test_image_folder_layout(tmp_path) -> None:
    root = write_image_folder(
        TaskSpec(task="single"), {"train": 12, "val": 10, "test": 10}, tmp_path / "task"
    )
    files = sorted(root.glob("*/*/*.png"))
    assert len(files) == 32
    assert not (tmp_path / ".task.partial").exists()
    with Image.open(files[0]) as image:
        assert image.size == (64, 64)
    assert {path.parent.parent.name for path in files} == {"train", "val", "test"}


@pytest.mark.parametrize("task", ["pair-sum", "single"])
def test_every_split_has_every_class_even_when_small(task) -> None:
    spec = TaskSpec(task=task)
    for split in ("train", "val", "test"):
        data = generate_split(spec, split, spec.num_classes + 2)
        assert set(data.labels.tolist()) == set(range(spec.num_classes))
        np.testing.assert_array_equal(data.labels, data.digits.clip(min=0).sum(axis=1))
    with pytest.raises(ValueError, match="at least 19 images"):
        generate_split(TaskSpec(), "val", 10)
