"""Hugging Face datasets (a ``save_to_disk`` folder) give the images and labels of the folder they
were made from, through the same decoding as image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sepvit.classify.data import is_hf_spec, limit, load_image_sets
from sepvit.data_io import open_image
from sepvit.errors import DataError
from sepvit.utils.extras import require


def test_a_saved_dataset_gives_the_folders_images_and_labels(digits_folder: Path, tmp_path: Path) -> None:
    datasets = require("datasets", "cluster")
    classes = [str(d) for d in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((digits_folder / split).glob("*/*.png"))[::40]
        rows = {"image": [str(path) for path in files], "label": [int(path.parent.name) for path in files]}
        splits[name] = datasets.Dataset.from_dict(rows, features=features)
    saved = tmp_path / "digits-hf"
    datasets.DatasetDict(splits).save_to_disk(str(saved))

    assert is_hf_spec(str(saved)) and is_hf_spec("hfds:user/name") and not is_hf_spec(str(digits_folder))
    train, val = load_image_sets(str(saved), 32)
    assert train.classes == classes and len(train.items) == len(splits["train"]) and len(val.items) == 9
    files = sorted((digits_folder / "train").glob("*/*.png"))[::40]
    for index in (0, 5, len(files) - 1):
        assert train.labels[index] == int(files[index].parent.name)
        assert np.array_equal(np.asarray(train.items[index]), np.asarray(open_image(files[index])))
    first = limit(train, 3)
    assert len(first.items) == 3 and np.array_equal(np.asarray(first.items[2]), np.asarray(train.items[2]))


def test_a_dataset_without_the_splits_it_needs_is_named(tmp_path: Path) -> None:
    datasets = require("datasets", "cluster")
    saved = tmp_path / "no-val"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]})}).save_to_disk(str(saved))
    with pytest.raises(DataError, match="has none of the splits validation, val, test"):
        load_image_sets(str(saved), 32)
