"""Fixtures several test files share."""

from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: the dense models here are small, and two threads spin-wait for each other
    many times over when the cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits splits at 32 px as PNG files (lossless: the pixels the digits data set gives)
    in ROOT/{train,val}/<digit>/NNNN.png."""
    from sepvit.classify.data import load_digits_split

    root = tmp_path_factory.mktemp("digits")
    for split in ("train", "val"):
        images = load_digits_split(split, 32)
        for index, (image, label) in enumerate(zip(images.items, images.labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:04d}.png")
    return root
