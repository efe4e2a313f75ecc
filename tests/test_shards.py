"""Tar shards: packing round-trips, the epoch plan splits without duplicates, loaders and runs resume
exactly part-way through an epoch, and shards train like the image folder they were packed from."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import pytest
import torch
from timm.data import create_dataset
from torch.utils.data import DataLoader

from sepvit.classify.config import ClassifyConfig
from sepvit.classify.data import load_classification_data
from sepvit.classify.task import ClassificationTask
from sepvit.cli import main
from sepvit.engine.checkpoint import read_checkpoint
from sepvit.engine.distributed import DistContext
from sepvit.engine.loop import Trainer
from sepvit.engine.shards import ShardSet, ShardStream, is_shard_spec, open_shards, read_samples
from sepvit.errors import ConfigError, DataError

CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def digits_shards(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "shards"
    assert main(["data", "pack", str(digits_folder), str(out), "--shard-size", "200"]) == 0
    return out


def test_pack_round_trips_every_image_byte_for_byte(digits_folder: Path, digits_shards: Path) -> None:
    info = json.loads((digits_shards / "_info.json").read_text())
    assert info["classes"] == [str(d) for d in range(10)]
    train, val = info["splits"]["train"], info["splits"]["val"]
    assert (train["num_samples"], val["num_samples"]) == (1437, 360)
    assert train["shard_lengths"] == [200] * 7 + [37] and val["shard_lengths"] == [200, 160]
    for split, entry in (("train", train), ("val", val)):
        samples = list(chain.from_iterable(read_samples(str(digits_shards / n)) for n in entry["filenames"]))
        files = sorted((digits_folder / split).glob("*/*.png"))
        assert len(samples) == len(files)
        unpacked = {json.loads(s["json"])["path"]: (s["png"], int(s["cls"])) for s in samples}
        assert unpacked == {f"{p.parent.name}/{p.name}": (p.read_bytes(), int(p.parent.name)) for p in files}
    labels = [int(s["cls"]) for s in read_samples(str(digits_shards / train["filenames"][0]))]
    assert len(set(labels)) == 10  # training images are shuffled before packing: each shard has every class
    # timm's own WebDataset reader reads the shards and _info.json as they are
    from_timm = create_dataset("wds/digits", root=str(digits_shards), split="val")
    val_files = (digits_folder / "val").glob("*/*.png")
    assert sorted(label for _, label in from_timm) == sorted(int(p.parent.name) for p in val_files)


def test_pack_refuses_to_overwrite_and_names_bad_input(digits_shards: Path, tmp_path: Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in digits_shards.iterdir()}
    assert main(["data", "pack", str(tmp_path), str(digits_shards)]) == 2
    assert main(["data", "pack", str(tmp_path / "missing"), str(tmp_path / "out"), "--shard-size", "5"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"sepvit data pack: error: {digits_shards} already holds shards or is not a folder; choose a new "
        "output folder",
        f"sepvit data pack: error: image folder {tmp_path / 'missing'} does not exist",
    ]
    assert {p.name: p.stat().st_mtime_ns for p in digits_shards.iterdir()} == before


def test_shard_specs_brace_patterns_and_missing_shards(digits_shards: Path) -> None:
    pattern = f"{digits_shards}/train-{{000000..000007}}.tar"
    assert (
        is_shard_spec(pattern) and is_shard_spec(f"wds:{digits_shards}") and is_shard_spec(str(digits_shards))
    )
    by_pattern = open_shards(pattern, "train")
    assert by_pattern == open_shards(f"wds:{digits_shards}", "train")
    assert by_pattern.lengths == (200,) * 7 + (37,)
    train, val = load_classification_data(pattern, None, 32)  # val: the split in _info.json beside them
    assert len(train) == 1437 and len(val) == 360 and val.classes == train.classes
    with pytest.raises(DataError, match=r"train-000009\.tar does not exist"):
        open_shards(f"{digits_shards}/train-{{000000..000009}}.tar", "train")
    with pytest.raises(DataError, match="has no 'test' split"):
        open_shards(str(digits_shards), "test")


def test_a_broken_info_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "_info.json").write_text('{"splits": {"train": {"num_samples": 3}}}')
    with pytest.raises(DataError, match=r"_info\.json: split 'train' lists no 'filenames'"):
        open_shards(f"wds:{tmp_path}", "train")
    (tmp_path / "_info.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read .*_info\.json"):
        open_shards(str(tmp_path), "train")


def _stream(lengths: tuple[int, ...], train: bool) -> ShardStream:
    return ShardStream(ShardSet(tuple(f"s{i}.tar" for i in range(len(lengths))), lengths), lambda s: s, train)


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 1), (2, 3), (3, 2)])
def test_the_epoch_plan_reads_no_sample_twice(world_size: int, workers: int) -> None:
    lengths = (50, 50, 50, 17, 3)
    batch_size = 4
    batches = sum(lengths) // (batch_size * world_size)
    taken: list[int] = []
    for rank in range(world_size):
        stream = _stream(lengths, train=True)
        stream.configure(rank, world_size, workers, batch_size, batches)
        ranges = stream.ranges()
        assert sum(stop - start for start, stop in ranges) == batches * batch_size  # equal steps everywhere
        taken += [i for start, stop in ranges for i in range(start, stop)]
    assert len(taken) == len(set(taken)) == world_size * batches * batch_size

    evaluated: list[int] = []
    for rank in range(world_size):
        stream = _stream(lengths, train=False)
        stream.configure(rank, world_size, workers)
        evaluated += [i for start, stop in stream.ranges() for i in range(start, stop)]
    assert sorted(evaluated) == list(range(sum(lengths)))  # every sample exactly once


def _keys(digits_shards: Path, workers: int, epoch: int, skip: int, batch_size: int = 16) -> list[list[str]]:
    stream = ShardStream(open_shards(str(digits_shards), "train"), _key_of, train=True, seed=3, buffer=300)
    stream.configure(0, 1, workers, batch_size, batches=40)
    stream.set_epoch(epoch, skip)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=list)
    return list(loader)


def _key_of(sample: dict) -> str:
    return f"{sample['__url__'].rsplit('/', 1)[-1]}/{sample['__key__']}/{torch.rand(1).item():.6f}"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_part_way_continues_the_epoch_exactly(digits_shards: Path, workers: int) -> None:
    straight = _keys(digits_shards, workers, epoch=1, skip=0)
    assert len(straight) == 40 and all(len(batch) == 16 for batch in straight)
    names = [key.rsplit("/", 1)[0] for batch in straight for key in batch]
    assert len(set(names)) == len(names)  # no image twice in an epoch
    assert _keys(digits_shards, workers, epoch=1, skip=7) == straight[7:]  # same images, same random draws
    assert _keys(digits_shards, workers, epoch=2, skip=0) != straight  # another order each epoch


def _run(output: Path, name: str, data: str, resume: bool = False, stop_at: int | None = None, **changes):
    options = dict(
        model="test_byobnet", img_size=32, batch_size=32, epochs=4, lr=4e-3, warmup_epochs=0.0,
        aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, hflip=0.0, crop_pct=1.0, model_ema=False,
        tensorboard=False, log_interval=1000, workers=0,
    )  # fmt: skip
    config = ClassifyConfig(**{**options, **changes}, data=data, output=str(output), experiment=name)

    def stop(trainer: Trainer) -> None:
        if trainer.global_step == stop_at:
            trainer.stop.request()

    return Trainer(
        config, ClassificationTask(config), CPU, output / name if resume else None, stop if stop_at else None
    ).run()


@pytest.mark.slow
def test_shards_train_to_the_accuracy_of_the_folder_they_were_packed_from(
    digits_folder: Path, digits_shards: Path, tmp_path: Path, one_thread, capsys
) -> None:
    folder = _run(tmp_path, "folder", str(digits_folder)).history[-1]["val_top1"]
    shards = _run(tmp_path, "shards", f"wds:{digits_shards}").history[-1]["val_top1"]
    assert folder >= 90 and shards >= 90
    assert abs(folder - shards) <= 3
    # `sepvit eval` reads the shards the checkpoint names and finds the run's own accuracy
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "shards" / "last.safetensors"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert (evaluated["data"], evaluated["images"]) == (f"wds:{digits_shards}", 360)
    assert evaluated["top1"] == pytest.approx(shards)


@pytest.mark.slow
def test_a_run_on_shards_resumed_mid_epoch_equals_a_straight_run(
    digits_shards: Path, tmp_path: Path, one_thread
) -> None:
    # every source of randomness on: RandAugment, erasing, flips, mixup/cutmix, drop path, EMA
    noisy = dict(
        model="sepvit_lite", epochs=2, batch_size=8, limit_train=48, limit_val=16, aa="rand-m9-mstd0.5-inc1",
        reprob=0.25, hflip=0.5, mixup=0.8, cutmix=1.0, drop_path=0.1, model_ema=True, workers=2,
    )  # fmt: skip
    data = str(digits_shards)
    _run(tmp_path, "straight", data, **noisy)
    first = _run(tmp_path, "pieces", data, stop_at=3, **noisy)  # epoch 1, step 3 of 6: odd, so the
    # loader workers take turns from the other one first
    assert first.interrupted_by == "request"
    with pytest.raises(ConfigError, match=r"part-way through an epoch of shards.*--workers 2"):
        _run(tmp_path, "pieces", data, resume=True, **{**noisy, "workers": 0})
    _run(tmp_path, "pieces", data, resume=True, **noisy)
    straight, _ = read_checkpoint(tmp_path / "straight" / "last.safetensors")
    resumed, _ = read_checkpoint(tmp_path / "pieces" / "last.safetensors")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: path.write_bytes(b"not a tar file" * 100), r"cannot read shard .*train-000003\.tar: "),
        (
            lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
            r"shard .*train-000003\.tar holds \d+ samples, fewer than the 200 counted",
        ),
    ],
)
def test_a_damaged_shard_stops_the_run_with_its_name_and_saves_it(
    digits_shards: Path, tmp_path: Path, damage, message: str
) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for path in digits_shards.iterdir():
        (shards / path.name).write_bytes(path.read_bytes())
    damage(shards / "train-000003.tar")
    with pytest.raises(DataError, match=message + r".*continue with --resume"):
        _run(tmp_path, "damaged", str(shards), model="test_vit", epochs=1)
    assert read_checkpoint(tmp_path / "damaged" / "last.safetensors")[1].progress["step_in_epoch"] == 0
