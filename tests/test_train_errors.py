"""Bad input gets a clear error naming the problem, and nothing already written is lost."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sepvit.classify.config import ClassifyConfig
from sepvit.classify.data import ClassificationImages, load_image_sets, scan_image_folder
from sepvit.classify.task import ClassificationTask
from sepvit.cli import main
from sepvit.engine import checkpoint as ckpt
from sepvit.engine.distributed import DistContext
from sepvit.engine.loop import Trainer
from sepvit.errors import DataError, TrainingError

CPU = DistContext(0, 1, 0, torch.device("cpu"))
TINY = dict(
    model="test_vit",
    img_size=32,
    batch_size=16,
    epochs=3,
    limit_train=32,
    limit_val=16,
    aa="none",
    mixup=0.0,
    cutmix=0.0,
    tensorboard=False,
    log_interval=100,
)


def _trainer(tmp_path: Path, resume: bool = False, step_hook=None, **overrides) -> Trainer:
    config = ClassifyConfig(**{**TINY, "output": str(tmp_path), "experiment": "run", **overrides})
    resume_dir = tmp_path / "run" if resume else None
    return Trainer(config, ClassificationTask(config), CPU, resume_dir=resume_dir, step_hook=step_hook)


def _state(run_dir: Path) -> dict:
    return ckpt.RunCheckpoints(run_dir).load()[3]


def _image(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    err = _error(["train", "--data", str(missing), "--output", str(tmp_path)], capsys)
    assert err.startswith("sepvit train: error: ") and f"data folder {missing} does not exist" in err


def test_folder_without_train_or_val(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="has no train/ folder"):
        load_image_sets(str(tmp_path / "data"), 32)
    _image(tmp_path / "data" / "train" / "a" / "0.png")
    with pytest.raises(DataError, match="has no val/ folder"):
        load_image_sets(str(tmp_path / "data"), 32)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "cat" / "0.png")
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*train/dog has no image files"):
        scan_image_folder(tmp_path / "train")


def test_unreadable_class_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path / "train" / "cat" / "0.png")
    _image(tmp_path / "train" / "dog" / "0.png")
    real_scandir = os.scandir

    def scandir(path):  # tests run as root, which reads any folder: refuse like a chmod 000 folder would
        if str(path).endswith("dog"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"cannot read class folder .*train/dog: Permission denied"):
        scan_image_folder(tmp_path / "train")


@pytest.mark.slow
def test_corrupt_images_are_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for split in ("train", "val"):
        for name in ("a", "b"):
            for index in range(16):
                _image(tmp_path / split / name / f"{index}.png", value=40 if name == "a" else 200)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (tmp_path / "train" / "b" / "empty.png").write_bytes(b"")
    train = scan_image_folder(tmp_path / "train")
    assert len(train.items) == 32
    assert sorted(Path(path).name for path, _ in train.skipped) == ["broken.jpg", "empty.png"]
    # the same data trains; the skipped files are reported by name
    assert (
        main(
            [
                "train",
                *_argv(TINY),
                "--data",
                str(tmp_path),
                "--epochs",
                "1",
                "--output",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train: 32 images, 2 classes; skipped 2 unreadable file(s)" in out and "broken.jpg" in out


def test_class_folder_with_only_corrupt_images(tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"train/cat has no readable images"):
        scan_image_folder(tmp_path / "train")


def test_image_that_fails_to_decode_later_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train" / "a" / "truncated.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-800])  # the header still verifies, the pixels do not decode
    image_set = scan_image_folder(tmp_path / "train")
    with pytest.raises(DataError, match=f"cannot read image {path}"):
        ClassificationImages(image_set, lambda image: image)[0]


def _argv(options: dict) -> list[str]:
    return [
        item
        for key, value in options.items()
        if key != "tensorboard"
        for item in (f"--{key.replace('_', '-')}", str(value))
    ] + ["--no-tensorboard"]


def _trained(tmp_path: Path) -> Path:
    _trainer(tmp_path, epochs=1).run()
    return tmp_path / "run" / "best.safetensors"


@pytest.mark.slow
def test_foreign_and_ill_fitting_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    best = _trained(tmp_path)
    not_safetensors = tmp_path / "notes.safetensors"
    not_safetensors.write_text("hello")
    assert "is not a readable safetensors file" in _error(["eval", str(not_safetensors)], capsys)

    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3)}, plain)
    assert "was not written by a sepvit run" in _error(["eval", str(plain)], capsys)
    err = _error(
        ["eval", str(plain), "--model", "test_vit", "--num-classes", "10", "--data", "digits"], capsys
    )
    assert "does not fit the model" in err and "missing" in err and "unexpected 1: weight" in err

    err = _error(
        [
            "predict",
            str(best),
            str(tmp_path / "x.png"),
            "--model",
            "test_vit",
            "--num-classes",
            "4",
            "--img-size",
            "32",
        ],
        capsys,
    )
    assert (
        "mismatched 2: head.bias (checkpoint 10, model 4), head.weight (checkpoint 10×64, model 4×64)" in err
    )

    err = _error(
        [
            "train",
            *_argv(TINY),
            "--model",
            "sepvit_lite",
            "--pretrained",
            str(best),
            "--output",
            str(tmp_path / "ft"),
        ],
        capsys,
    )
    assert "does not fit the model" in err and "missing 1" in err and "unexpected " in err
    assert "norm.weight (checkpoint 64, model 256)" in err

    assert "checkpoint " + str(tmp_path / "gone.safetensors") + " does not exist" in _error(
        ["eval", str(tmp_path / "gone.safetensors")], capsys
    )


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def poison(trainer: Trainer) -> None:  # after epoch 1, corrupt a weight: the next loss is NaN
        if trainer.epoch == 1 and trainer.step_in_epoch == 1:
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("nan"))

    trainer = _trainer(tmp_path, step_hook=poison)
    last = tmp_path / "run" / "last.safetensors"
    expected = (
        rf"loss is nan at epoch 2, step 2 .* last checkpoint, {re.escape(str(last))} \(epoch 1, step 0\)"
    )
    with pytest.raises(TrainingError, match=expected):
        trainer.run()
    weights, info = ckpt.read_checkpoint(last)
    assert info.progress["epoch"] == 1 and info.progress["step_in_epoch"] == 0
    assert all(torch.isfinite(value).all() for value in weights.values())


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = ckpt.save_file
    calls = {"count": 0}

    def save_file_on_a_full_disk(tensors, path, metadata=None):
        calls["count"] += 1
        if calls["count"] > 3:  # epoch 1 writes last, last_ema and best; epoch 2's first write fails
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file_on_a_full_disk)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="No space left on device; the previous files are kept"):
        _trainer(tmp_path).run()
    assert ckpt.read_checkpoint(run_dir / "last.safetensors")[1].progress["epoch"] == 1
    assert ckpt.read_checkpoint(run_dir / "last_ema.safetensors")[1].progress["epoch"] == 1
    assert _state(run_dir)["epoch"] == 1
    assert not list(run_dir.rglob("*.tmp"))
    assert len(list((run_dir / "checkpoints").iterdir())) == 2  # LATEST and the epoch-1 set
    # and the run continues from there
    monkeypatch.setattr(ckpt, "save_file", real_save)
    _trainer(tmp_path, resume=True).run()
    assert ckpt.read_checkpoint(run_dir / "last.safetensors")[1].progress["epoch"] == 3
