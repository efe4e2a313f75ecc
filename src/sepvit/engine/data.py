"""Data plumbing every task shares: image files (decoded by :func:`sepvit.data_io.open_image`),
per-item seeding, sharded sampling, loaders.

Augmentation is random per item but reproducible: :class:`SeededItems` draws each item's
randomness from generators seeded by (seed, epoch, index), so the same item gets the same
augmentation whatever the number of processes or loader workers, and a resumed run continues
exactly. :class:`ShardedSampler` gives each process its share of an epoch and can start part-way.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler


def check_image(path: Path) -> str | None:
    """None if ``path`` opens as an image, else the reason it does not (a quick header check)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # Pillow raises many types for a bad file
        return f"{type(error).__name__}: {error}"
    return None


WORKER_TRACEBACK = re.compile(r"^(?:[\w.]+\.)?(\w*Error): (.*)$")


def one_line(error: BaseException) -> str:
    """The message of an error raised in a loader worker, without the worker's traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        match = WORKER_TRACEBACK.match(lines[-1].strip())
        return match.group(2) if match else lines[-1].strip()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators, restoring them afterwards."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


class SeededItems(Dataset):
    """``dataset[index]`` computed under generators seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with seeded_rng(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF):
            return self.dataset[index]


class ShardedSampler(Sampler[int]):
    """This process's share of a (shuffled) epoch, optionally starting part-way through.

    Training: every process permutes all indices with the same (seed, epoch) generator and takes
    every ``world_size``-th from ``rank``; the permutation is truncated to a multiple of the global
    batch so all processes run the same number of steps. Evaluation (``shuffle=False``): indices in
    order, strided, nothing dropped or repeated.
    """

    def __init__(
        self, size: int, rank: int, world_size: int, shuffle: bool, seed: int = 0, global_batch: int = 1
    ) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.global_batch = shuffle, seed, global_batch
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip_batches * (self.global_batch // self.world_size)

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world_size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order = order[: self.size // self.global_batch * self.global_batch]
        return order[self.rank :: self.world_size][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def make_loader(
    dataset: Dataset,
    sampler: Sampler | None,
    batch_size: int,
    workers: int,
    drop_last: bool,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        # A private generator: creating an iterator must not draw from the global RNG, or a resumed
        # run (which creates one more) would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


def output_names(paths: list[Path], suffix: str) -> list[str]:
    """One output file name per input: ``<stem><suffix>``, or ``<name><suffix>`` when stems repeat,
    numbered when even names repeat, so no output overwrites another."""
    stems = [path.stem for path in paths]
    names = [path.stem if stems.count(path.stem) == 1 else path.name for path in paths]
    result, used = [], set()
    for name in names:
        candidate, number = name, 1
        while candidate in used:
            number += 1
            candidate = f"{name}-{number}"
        used.add(candidate)
        result.append(candidate + suffix)
    return result
