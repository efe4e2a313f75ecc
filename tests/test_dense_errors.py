"""Bad input to `sepvit detect|segment` gets one line naming the problem, and nothing is overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sepvit.cli import main
from sepvit.dense import synthetic
from sepvit.dense.data import CocoDetection
from sepvit.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")
SEGMENT = ["segment", "train", "--head", "fpn", "--crop-size", "64", "--head-channels", "16", "--model",
           "sepvit_lite", "--epochs", "1", "--batch-size", "2", "--no-tensorboard"]  # fmt: skip


def test_an_unknown_category_id_is_named(tmp_path: Path) -> None:
    root = synthetic.write_coco(tmp_path / "coco", num_train=2, num_val=1, size=32, seed=1)
    annotations = root / "annotations" / "instances_train.json"
    document = json.loads(annotations.read_text())
    document["annotations"][0]["category_id"] = 99
    annotations.write_text(json.dumps(document))
    with pytest.raises(
        DataError, match="annotations use category_id 99, which the categories list does not define"
    ):
        CocoDetection(root, "train")


def test_a_batch_larger_than_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ade = synthetic.write_ade20k(tmp_path / "ade", num_train=2, num_val=1, size=64, seed=2)
    argv = [*SEGMENT, "--data", str(ade), "--batch-size", "4", "--output", str(tmp_path / "runs")]
    assert main(argv) == 2
    assert "2 training images make no full step of 4 images" in capsys.readouterr().err


@pytest.mark.slow
def test_a_broken_image_in_a_loader_worker_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ade = synthetic.write_ade20k(tmp_path / "ade", num_train=4, num_val=1, size=64, seed=2)
    broken = sorted((ade / "images" / "training").iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:200])
    argv = [*SEGMENT, "--data", str(ade), "--workers", "1", "--output", str(tmp_path), "--experiment", "run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sepvit segment train: error: cannot read image")
    assert str(broken) in err and "Traceback" not in err


@pytest.mark.slow
def test_predictions_of_images_with_the_same_stem_are_all_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    coco = synthetic.write_coco(tmp_path / "coco", num_train=4, num_val=2, size=64, seed=2)
    argv = ["detect", "train", "--data", str(coco), "--train-split", "train", "--val-split", "val",
            "--model", "sepvit_lite", "--batch-size", "2", "--min-size", "64", "--max-size", "64",
            "--fpn-channels", "16", "--arch", "maskrcnn", "--epochs", "1", "--no-tensorboard",
            "--output", str(tmp_path), "--experiment", "run"]  # fmt: skip
    assert main(argv) == 0
    image = next((coco / "val").iterdir())
    (tmp_path / "a").mkdir()
    shutil.copy(image, tmp_path / "a" / "photo.png")
    shutil.copy(image, tmp_path / "photo.png")
    from PIL import Image

    Image.open(image).convert("RGB").save(tmp_path / "photo.jpg")
    inputs = [str(tmp_path / "photo.png"), str(tmp_path / "photo.jpg"), str(tmp_path / "a" / "photo.png")]
    out = tmp_path / "predictions"
    assert (
        main(["detect", "predict", str(tmp_path / "run" / "best.safetensors"), *inputs, "--output", str(out)])
        == 0
    )
    assert sorted(path.name for path in out.iterdir()) == [
        "photo.jpg.png",
        "photo.png-2.png",
        "photo.png.png",
    ]


def test_a_reversed_scale_range_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [*SEGMENT, "--scale-range", "2", "0.5", "--output", str(tmp_path / "runs")]
    assert main(argv) == 2
    assert (
        capsys.readouterr().err
        == "sepvit segment train: error: --scale-range takes LOW then HIGH, got 2.0 > 0.5\n"
    )
    assert not (tmp_path / "runs").exists()
