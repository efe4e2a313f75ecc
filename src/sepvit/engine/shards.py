"""Tar shards (the WebDataset format) as a dataset any task can train and evaluate on.

webdataset reads the shards (brace patterns, tar files grouped into samples by key, the shuffle
buffer) and writes them (``ShardWriter``). What it leaves open is decided here, so that a run is
exact: every process reads the same number of samples, none twice, in an order fixed by
(seed, epoch), and a resumed run continues part-way through an epoch where it stopped.

The epoch plan. The shards are permuted by (seed, epoch) (evaluation: kept in order) and read as
one sequence of N samples. Each process has S loader streams (one per loader worker, at least
one), each reading one contiguous range of that sequence:

- training: process r takes ``batches × batch_size`` samples from position ``r × batches ×
  batch_size`` (what is left at the end of the sequence is skipped this epoch, as ``drop_last``
  does; the permutation changes which samples that is). A DataLoader collects its workers' batches
  in turn, so the process's batch k comes from stream k mod S; each stream shuffles its range in a
  buffer seeded by (seed, epoch, rank, stream). Resuming after k batches replays each stream
  without decoding and drops the batches it had given, and stream (w + k) mod S is read by loader
  worker w, so the next batch comes from the right stream.
- evaluation: the N samples are cut into R × S nearly equal ranges; every sample is read once.

Each sample is decoded under random generators seeded by (seed, epoch, shard, key), so its
augmentation does not depend on where it falls in the plan.

Sample counts come from ``_info.json`` beside the shards (timm's ``wds/`` reader reads the same
file; ``sepvit data pack`` writes it), or are counted by reading the shards once.
"""

from __future__ import annotations

import json
import math
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from sepvit.engine.data import seeded_rng
from sepvit.errors import ConfigError, DataError
from sepvit.utils.extras import require
from sepvit.utils.files import WriteError, make_folder, reason, write_text

WDS_PREFIX = "wds:"
INFO_FILE = "_info.json"
SHUFFLE_BUFFER = 2000  # samples per stream held for shuffling


def is_shard_spec(spec: str) -> bool:
    """Whether ``--data`` names tar shards: ``wds:...``, a brace pattern, a ``.tar`` file or a folder
    holding ``_info.json``."""
    if spec.startswith(WDS_PREFIX) or spec.endswith(".tar") or ("{" in spec and ".." in spec):
        return True
    return os.path.isfile(os.path.join(spec, INFO_FILE))


@dataclass(frozen=True)
class ShardSet:
    """Shard files, the number of samples in each, and the class names when the info file has them."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return sum(self.lengths)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    def first(self, count: int) -> ShardSet:
        """The first ``count`` samples in shard order."""
        lengths, left = [], count
        for length in self.lengths:
            lengths.append(min(length, left))
            left -= lengths[-1]
        kept = [i for i, length in enumerate(lengths) if length]
        return replace(self, urls=tuple(self.urls[i] for i in kept), lengths=tuple(lengths[i] for i in kept))


def read_info(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, INFO_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            info = json.load(handle)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path}: {' '.join(str(error).split())}") from error
    problem = _info_problem(info)
    if problem:
        raise DataError(f"{path} is not a usable shard info file: {problem}")
    return info


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _info_problem(info: Any) -> str | None:
    """What is wrong with a loaded ``_info.json`` (None when nothing is): it names shard files beside
    it, their sample counts and the class names, each of the type the readers expect."""
    if not isinstance(info, dict) or not isinstance(info.get("splits", {}), dict):
        return "expected a 'splits' mapping"
    classes = info.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return "'classes' must be a list of names"
    for split, entry in info.get("splits", {}).items():
        if not isinstance(entry, dict):
            return f"split {split!r} must be a mapping"
        names, lengths = entry.get("filenames", []), entry.get("shard_lengths", [])
        if not isinstance(names, list) or not all(
            isinstance(name, str) and name and os.path.basename(name) == name and name not in (".", "..")
            for name in names
        ):
            return f"split {split!r}: 'filenames' must list file names in its folder"
        if (
            not isinstance(lengths, list)
            or not all(map(_whole, lengths))
            or len(lengths) not in (0, len(names))
        ):
            return f"split {split!r}: 'shard_lengths' must give a sample count (0 or more) per file"
    return None


def open_shards(spec: str, split: str) -> ShardSet:
    """The shards ``spec`` names: a folder with ``_info.json`` (its ``split``), or a file or brace
    pattern such as ``shards/train-{000000..000127}.tar``."""
    wds = require("webdataset", "cluster")
    path = spec.removeprefix(WDS_PREFIX)
    info = read_info(path) if os.path.isdir(path) else None
    if os.path.isdir(path):
        if info is None:
            raise DataError(f"shard folder {path} has no {INFO_FILE} (write one with `sepvit data pack`)")
        if split not in info["splits"]:
            known = ", ".join(info["splits"]) or "none"
            raise DataError(f"{path}/{INFO_FILE} has no {split!r} split (it has {known})")
        entry = info["splits"][split]
        if not isinstance(entry, dict) or not isinstance(entry.get("filenames"), list):
            raise DataError(f"{path}/{INFO_FILE}: split {split!r} lists no 'filenames'")
        urls = [os.path.join(path, name) for name in entry["filenames"]]
        counted = dict(zip(urls, entry.get("shard_lengths", ())))
    else:
        urls = wds.shardlists.expand_urls(path)
        info = read_info(os.path.dirname(urls[0]) or ".")
        counted = {}
        for entry in (info or {}).get("splits", {}).values():
            folder = os.path.dirname(urls[0])
            names = (os.path.join(folder, name) for name in entry.get("filenames", ()))
            counted.update(zip(names, entry.get("shard_lengths", ())))
    missing = [url for url in urls if not os.path.isfile(url)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"shard {', '.join(missing[:3])}{more} does not exist (from --data {spec})")
    lengths = tuple(counted[url] if url in counted else count_samples(url) for url in urls)
    classes = tuple(info["classes"]) if info and info.get("classes") else None
    return ShardSet(tuple(urls), lengths, classes)


def read_samples(url: str, select: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard (webdataset's grouping by key); DataError naming it if unreadable."""
    wds = require("webdataset", "cluster")
    samples = wds.tariterators.tarfile_samples([{"url": url}], select_files=select)
    try:
        yield from samples
    except (OSError, tarfile.TarError, ValueError) as error:
        reason = " ".join(str(error.args[0] if error.args else error).split())
        raise DataError(f"cannot read shard {url}: {reason}") from error


def count_samples(url: str) -> int:
    return sum(1 for _ in read_samples(url, select=lambda name: False))


class ShardStream(IterableDataset):
    """Samples of a :class:`ShardSet`, each passed through ``decode``, following the epoch plan."""

    def __init__(
        self,
        shards: ShardSet,
        decode: Callable[[dict[str, Any]], Any],
        train: bool,
        seed: int = 0,
        buffer: int = SHUFFLE_BUFFER,
    ) -> None:
        self.shards, self.decode, self.train, self.seed, self.buffer = shards, decode, train, seed, buffer
        self.rank, self.world_size, self.streams = 0, 1, 1
        self.batch_size, self.batches = 1, 0
        self.epoch, self.skip_batches = 0, 0

    def __len__(self) -> int:
        return len(self.shards)

    def first(self, count: int) -> ShardStream:
        return ShardStream(self.shards.first(count), self.decode, self.train, self.seed, self.buffer)

    def configure(
        self, rank: int, world_size: int, workers: int, batch_size: int = 1, batches: int = 0
    ) -> None:
        """This process's place: ``batches`` of ``batch_size`` per epoch (training; 0 for evaluation)."""
        if self.train and world_size * batches * batch_size > len(self):
            raise ConfigError(f"{world_size} × {batches} batches of {batch_size} exceed {len(self)} samples")
        self.rank, self.world_size, self.streams = rank, world_size, max(1, workers)
        self.batch_size, self.batches = batch_size, batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    @property
    def layout(self) -> tuple[int, int]:
        """(processes, streams per process): a part-way resume needs the same."""
        return self.world_size, self.streams

    def ranges(self) -> list[tuple[int, int]]:
        """[start, stop) of each of this process's streams in the epoch's sequence."""
        streams = self.streams
        if not self.train:
            total, groups = len(self), self.world_size * streams
            first = self.rank * streams
            return [(total * g // groups, total * (g + 1) // groups) for g in range(first, first + streams)]
        position, result = self.rank * self.batches * self.batch_size, []
        for stream in range(streams):
            count = _batches_of(stream, self.batches, streams) * self.batch_size
            result.append((position, position + count))
            position += count
        return result

    def shard_order(self) -> list[int]:
        if not self.train:
            return list(range(len(self.shards.urls)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.shards.urls), generator=generator).tolist()

    def _read(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Samples [start, stop) of the epoch's sequence, undecoded."""
        offset = 0
        for index in self.shard_order():
            url, length = self.shards.urls[index], self.shards.lengths[index]
            low, high = max(start - offset, 0), min(stop - offset, length)
            offset += length
            if low >= high:
                continue
            read = 0
            for sample in islice(read_samples(url), low, high):
                read += 1
                yield sample
            if read < high - low:
                raise DataError(f"shard {url} holds {low + read} samples, fewer than the {length} counted")

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.streams:
            raise ConfigError(f"the loader has {workers} worker(s) but the plan {self.streams} stream(s)")
        stream = (worker + self.skip_batches) % self.streams if self.train else worker
        start, stop = self.ranges()[stream]
        samples: Iterable[dict[str, Any]] = self._read(start, stop)
        skip = 0
        if self.train:
            wds = require("webdataset", "cluster")
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{stream}")
            samples = wds.shuffle(self.buffer, initial=self.buffer, rng=rng)(iter(samples))
            skip = _batches_of(stream, self.skip_batches, self.streams) * self.batch_size
        for sample in islice(samples, skip, None):
            name = f"{os.path.basename(sample['__url__'])}/{sample['__key__']}"
            with seeded_rng(zlib.crc32(f"{self.seed}/{self.epoch}/{name}".encode())):
                yield self.decode(sample)


def _batches_of(stream: int, batches: int, streams: int) -> int:
    """How many of the first ``batches`` batches come from ``stream`` when streams take turns."""
    return max(0, math.ceil((batches - stream) / streams))


def check_new_shard_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.glob("*.tar")) or (out / INFO_FILE).exists()):
        raise DataError(f"{out} already holds shards or is not a folder; choose a new output folder")


def write_shards(
    splits: dict[str, Iterable[dict[str, Any]]],
    out: Path,
    shard_size: int,
    extra_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write each split's samples (dicts of ``__key__`` and bytes per extension) as
    ``OUT/<split>-NNNNNN.tar`` of ``shard_size`` samples (webdataset's TarWriter), then ``_info.json``.

    Nothing is overwritten: a folder that already holds shards is refused. Each shard is written
    under a temporary name and renamed; the info file, written last, marks a finished set.
    """
    wds = require("webdataset", "cluster")
    check_new_shard_folder(out)
    make_folder(out, "shard folder")
    info: dict[str, Any] = {"name": out.name, **(extra_info or {}), "splits": {}}
    try:
        for split, samples in splits.items():
            names, lengths = [], []
            iterator = iter(samples)
            while chunk := list(islice(iterator, shard_size)):
                names.append(f"{split}-{len(names):06d}.tar")
                partial = out / f".partial-{names[-1]}"
                with wds.TarWriter(str(partial), encoder=False, mtime=0) as sink:
                    for sample in chunk:
                        sink.write(sample)
                os.replace(partial, out / names[-1])
                lengths.append(len(chunk))
            info["splits"][split] = {
                "name": split,
                "num_samples": sum(lengths),
                "filenames": names,
                "shard_lengths": lengths,
            }
        write_text(out / INFO_FILE, json.dumps(info, indent=1))
    except (OSError, WriteError) as error:
        for partial in out.glob(".partial-*"):
            partial.unlink(missing_ok=True)
        raise DataError(f"cannot write shards to {out}: {reason(error)}") from error
    return info


def sample_bytes(sample: dict[str, Any], extensions: Iterable[str]) -> tuple[str, bytes]:
    """The first of ``extensions`` a sample has, and its bytes; DataError naming the sample if none."""
    for extension in extensions:
        if extension in sample:
            return extension, sample[extension]
    name = f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"
    fields = ", ".join(key for key in sample if not key.startswith("__"))
    raise DataError(f"sample {name} has none of {', '.join(extensions)} (it has {fields or 'nothing'})")
