"""Training on digits and on an image folder, evaluation, prediction on real images, fine-tuning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sepvit.classify.data import load_digits_split
from sepvit.cli import main
from sepvit.engine.checkpoint import read_checkpoint

# Seconds matter on 2 cores: a tiny timm ConvNeXt (0.2M parameters) learns digits in a few epochs.
FAST_RUN = [
    "--model", "test_convnext", "--img-size", "32", "--batch-size", "32", "--epochs", "3", "--lr", "3e-3",
    "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--warmup-epochs", "0",
    "--limit-train", "640", "--log-interval", "5",
]  # fmt: skip
TINY_RUN = [arg if arg != "640" else "64" for arg in FAST_RUN]  # when only the run's mechanics matter


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs")
    assert main(["train", *FAST_RUN, "--output", str(output), "--experiment", "digits"]) == 0
    return output / "digits"


@pytest.mark.slow
def test_digits_run_learns_and_writes_its_outputs(digits_run: Path, capsys: pytest.CaptureFixture) -> None:
    with open(digits_run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    _, info = read_checkpoint(digits_run / "best.safetensors")
    assert info.progress["top1"] > 60.0  # chance is 10%
    assert info.model == "test_convnext" and info.class_names == [str(d) for d in range(10)]
    for name in ("config.yaml", "last.safetensors", "checkpoints/LATEST", "loss.png", "metrics.png"):
        assert (digits_run / name).stat().st_size > 0, name
    assert list((digits_run / "tensorboard").glob("events.out.tfevents.*"))
    # EMA is on by default: its weights after the last epoch are kept beside the model's.
    _, ema_info = read_checkpoint(digits_run / "last_ema.safetensors")
    assert ema_info.progress["epoch"] == 3 and ema_info.progress["top1"] == pytest.approx(
        float(rows[-1]["ema_val_top1"])
    )


def test_eval_reproduces_the_run_accuracy(
    digits_run: Path, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    best = digits_run / "best.safetensors"
    _, info = read_checkpoint(best)
    matrix_png = tmp_path / "cm.png"
    assert main(["eval", str(best), "--json", "--confusion-matrix", str(matrix_png)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 360
    assert result["top1"] == pytest.approx(info.progress["top1"])
    assert result["top1"] <= result["top5"] <= 100
    assert Image.open(matrix_png).size[0] > 100


def test_predict_reads_digit_image_files(
    digits_run: Path, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    test_set = load_digits_split("val", 32)
    paths = []
    for index in range(40):
        path = tmp_path / f"digit{index}.{'png' if index % 2 else 'jpg'}"
        test_set.items[index].save(path)
        paths.append(str(path))
    assert main(["predict", str(digits_run / "best.safetensors"), *paths, "--top-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == paths
    predicted = [int(r["predictions"][0]["class"]) for r in results]
    hits = np.mean(np.array(predicted) == np.array(test_set.labels[:40]))
    assert hits > 0.6
    for result in results:
        probabilities = [p["probability"] for p in result["predictions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6


def test_predict_on_photographs(digits_run: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from skimage import data

    photos = {"camera.png": data.camera(), "coffee.jpg": data.coffee(), "astronaut.png": data.astronaut()}
    paths = []
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    assert main(["predict", str(digits_run / "best.safetensors"), *paths, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line, path in zip(lines, paths):
        assert line.startswith(f"{path}: ") and line.count("%") == 2


def _write_folder(root: Path, per_class: int) -> None:
    """Three easy classes of generated images: horizontal stripes, vertical stripes, a disc."""
    generator = np.random.default_rng(0)
    y, x = np.mgrid[:24, :24]
    patterns = {
        "horizontal": (y // 3) % 2,
        "vertical": (x // 3) % 2,
        "disc": ((y - 12) ** 2 + (x - 12) ** 2 < 60),
    }
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for name, pattern in patterns.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                noise = generator.integers(0, 60, (24, 24, 3))
                pixels = (pattern[..., None] * 180 + noise).astype(np.uint8)
                suffix = "png" if index % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"{index}.{suffix}")


@pytest.mark.slow
def test_image_folder_finetune_from_digits(
    digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _write_folder(tmp_path / "shapes", per_class=32)
    data, finetune = str(tmp_path / "shapes"), str(digits_run / "best.safetensors")
    args = [*FAST_RUN, "--data", data, "--epochs", "2", "--batch-size", "16", "--hflip", "0",
            "--pretrained", finetune, "--output", str(tmp_path), "--experiment", "ft"]  # fmt: skip
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert "train: 96 images, 3 classes" in out and "val: 48 images, 3 classes" in out
    assert (
        "not loaded (2): head.fc.bias (checkpoint 10, model 3), head.fc.weight (checkpoint 10×64, model 3×64)"
        in out
    )
    state_dict, info = read_checkpoint(tmp_path / "ft" / "best.safetensors")
    assert info.class_names == ["disc", "horizontal", "vertical"]
    assert state_dict["head.fc.weight"].shape[0] == 3
    assert info.progress["top1"] > 60.0  # chance is 33%
    digits_weights, _ = read_checkpoint(digits_run / "best.safetensors")
    # the body started from the digits weights: its first layer moved only a little
    patch = "stem.0.weight"
    assert torch.dist(state_dict[patch], digits_weights[patch]) < 0.5 * digits_weights[patch].norm()


@pytest.mark.slow
def test_json_prints_the_outcome_on_stdout_and_logs_on_stderr(
    digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    run_args = ["--epochs", "4", "--json"]
    assert main(["train", "--resume", str(digits_run.parent / "copy"), *run_args]) == 2  # no such run
    capsys.readouterr()
    args = [*TINY_RUN, "--epochs", "1", "--output", str(tmp_path), "--experiment", "j", "--json"]
    assert main(["train", *args]) == 0
    captured = capsys.readouterr()
    outcome = json.loads(captured.out)
    assert outcome["run_dir"] == str(tmp_path / "j") and outcome["epochs"] == 1
    assert outcome["interrupted_by"] is None and outcome["last"]["epoch"] == 1
    assert outcome["best"]["epoch"] == 1 and Path(outcome["weights"]["best"]).is_file()
    assert "run folder:" in captured.err and "run folder:" not in captured.out


def test_val_interval_validates_every_nth_and_the_last_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [*TINY_RUN, "--epochs", "5", "--val-interval", "2", "--model-ema", "--output", str(tmp_path)]
    assert main(["train", *args, "--experiment", "v"]) == 0
    log = capsys.readouterr().out
    with open(tmp_path / "v" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    validated = [int(row["epoch"]) for row in rows if row["val_top1"]]
    assert validated == [2, 4, 5]
    assert [int(row["epoch"]) for row in rows if row["ema_val_top1"]] == validated
    assert all(row["train_loss"] for row in rows)  # every epoch still trains and is logged
    assert [line.split(":")[0] for line in log.splitlines() if "| val top1" in line] == [
        "epoch 2/5", "epoch 4/5", "epoch 5/5",
    ]  # fmt: skip
    _, best = read_checkpoint(tmp_path / "v" / "best.safetensors")
    assert best.progress["epoch"] in validated
    _, last = read_checkpoint(tmp_path / "v" / "last_ema.safetensors")
    assert last.progress["epoch"] == 5 and last.progress["top1"] == pytest.approx(
        float(rows[-1]["ema_val_top1"])
    )
