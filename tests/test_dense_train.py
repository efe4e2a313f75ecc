"""Training on the embedded shapes data: it learns, and the commands train, resume, evaluate and predict."""

import csv

import pytest
import torch
from PIL import Image

from sepvit.dense import synthetic
from sepvit.dense.config import DetectConfig, SegmentConfig
from sepvit.dense.data import ADE20KSegmentation, CocoDetection, SegmentationEvalDataset
from sepvit.dense.metrics import ConfusionMatrix, coco_map, whole_image_detections
from sepvit.dense.tasks import DetectionTask, SegmentationTask
from sepvit.engine.checkpoint import read_checkpoint
from sepvit.engine.distributed import DistContext
from sepvit.engine.loop import Trainer
from sepvit.engine.optim import build_optimizer, build_scheduler
from sepvit.errors import CheckpointError, ConfigError

CPU = DistContext(0, 1, 0, torch.device("cpu"))
QUIET = dict(workers=0, tensorboard=False, log_interval=1000, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _run_cli(*argv: str) -> int:
    import argparse

    from sepvit.cli.dense import register

    parser = argparse.ArgumentParser(prog="sepvit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def _lr_factors(config, steps: list[int], updates_per_epoch: int = 100) -> list[float]:
    optimizer = build_optimizer(torch.nn.Linear(2, 2), config)
    scheduler = build_scheduler(optimizer, config, updates_per_epoch)
    factors = []
    for step in steps:
        scheduler.step_update(num_updates=step)
        factors.append(optimizer.param_groups[0]["lr"] / config.lr)
    return factors


def test_schedules_follow_the_recipes():
    # mmdetection's 1×: linear warm-up, ×0.1 at epochs 8 and 11
    step = DetectConfig(epochs=12, decay_milestones=(8, 11), warmup_steps=10, warmup_lr=1e-7, lr=1e-4)
    assert _lr_factors(step, [0, 5]) == pytest.approx([0.001, 0.001 + 0.999 * 0.5])
    assert _lr_factors(step, [e * 100 for e in (1, 7, 8, 10, 11)]) == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    # mmsegmentation's poly: (1 - t) ** power
    poly = SegmentConfig(epochs=2, decay_rate=0.9, warmup_steps=0, lr=1e-4)
    assert _lr_factors(poly, [100, 200]) == pytest.approx([0.5**0.9, 0.0], abs=1e-9)


def _csv_rows(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _all_background_miou(dataset) -> float:
    matrix = ConfusionMatrix(dataset.dataset.num_classes)
    for _, label in dataset:
        matrix.update(torch.zeros_like(label), label)
    return matrix.compute()["mIoU"]


@pytest.mark.slow
def test_segmenter_learns_the_shapes(tmp_path):
    root = synthetic.write_ade20k(tmp_path / "ade", num_train=96, num_val=16, size=64, seed=5)
    config = SegmentConfig(
        data=str(root), model="sepvit_lite", head="fpn", crop_size=64, scale_range=(0.75, 1.5),
        head_channels=32, epochs=12, batch_size=8, lr=1e-3, decay_rate=1.0, warmup_steps=10,
        drop_path=0.0, seed=0, output=str(tmp_path), experiment="run", **QUIET,
    )  # fmt: skip
    Trainer(config, SegmentationTask(config), CPU).run()
    best = max(float(row["val_mIoU"]) for row in _csv_rows(tmp_path / "run" / "metrics.csv"))
    trivial = _all_background_miou(SegmentationEvalDataset(ADE20KSegmentation(root, "validation"), 64))
    assert trivial < 0.25 and best > trivial + 0.08, (trivial, best)


@pytest.mark.slow
def test_retinanet_learns_the_shapes(tmp_path):
    size = 96
    root = synthetic.write_coco(tmp_path / "coco", num_train=64, num_val=1, size=size, seed=3)
    # scored on the training images: a short run memorises
    config = DetectConfig(
        data=str(root), train_split="train", val_split="train", model="sepvit_lite", min_size=size,
        max_size=size, fpn_channels=32, epochs=10, batch_size=8, lr=1e-3, weight_decay=1e-4,
        decay_milestones=(9,), warmup_steps=10, drop_path=0.0, seed=0, output=str(tmp_path),
        experiment="run", **QUIET,
    )  # fmt: skip
    Trainer(config, DetectionTask(config), CPU).run()
    rows = _csv_rows(tmp_path / "run" / "metrics.csv")
    first_loss, last_loss = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    best_ap = max(float(row["val_bbox_AP"]) for row in rows)
    best_ap50 = max(float(row["val_bbox_AP50"]) for row in rows)
    seen_set = CocoDetection(root, "train")
    whole_image = whole_image_detections(seen_set.coco, seen_set.image_ids)
    trivial = coco_map(seen_set.coco, whole_image, "bbox", seen_set.image_ids)
    assert last_loss < 0.7 * first_loss, (first_loss, last_loss)
    assert best_ap > trivial["AP"] + 0.02 and best_ap50 > trivial["AP50"] + 0.08, (
        trivial,
        best_ap,
        best_ap50,
    )


@pytest.mark.slow
def test_commands_train_resume_evaluate_and_predict(tmp_path, capsys):
    coco = synthetic.write_coco(tmp_path / "coco", num_train=4, num_val=2, size=64, seed=2)
    run = tmp_path / "run"
    common = [
        "--data",
        str(coco),
        "--train-split",
        "train",
        "--val-split",
        "val",
        "--model",
        "sepvit_lite",
        "--batch-size",
        "2",
        "--min-size",
        "64",
        "--max-size",
        "64",
        "--fpn-channels",
        "16",
        "--workers",
        "0",
        "--warmup-steps",
        "1",
        "--no-tensorboard",
        "--output",
        str(tmp_path),
        "--experiment",
        "run",
    ]
    assert _run_cli("detect", "train", "--arch", "maskrcnn", "--epochs", "1", *common) == 0
    first = _csv_rows(run / "metrics.csv")
    assert len(first) == 1 and {"train_loss", "val_bbox_AP", "val_segm_AP"} <= set(first[0])
    assert (run / "metrics.png").stat().st_size > 0
    # Resume continues at epoch 2 (a longer schedule is applied); changed model settings are refused.
    assert _run_cli("detect", "train", "--epochs", "2", "--resume", str(run)) == 0
    assert [row["epoch"] for row in _csv_rows(run / "metrics.csv")] == ["1", "2"]
    _, info = read_checkpoint(run / "last.safetensors", "detect")
    assert info.progress["epoch"] == 2 and info.extras["arch"] == "maskrcnn"
    assert info.class_names == list(synthetic.SHAPE_NAMES)
    with pytest.raises(ConfigError, match="cannot change --fpn-channels from 16 to 8"):
        _run_cli("detect", "train", "--epochs", "3", "--resume", str(run), "--fpn-channels", "8")

    capsys.readouterr()
    assert (
        _run_cli("detect", "eval", str(run / "best.safetensors"), "--data", str(coco), "--split", "val") == 0
    )
    assert "bbox_AP" in capsys.readouterr().out
    out = tmp_path / "predictions"
    assert (
        _run_cli("detect", "predict", str(run / "last.safetensors"), str(coco / "val"), "--output", str(out))
        == 0
    )
    written = sorted(out.glob("*.png"))
    assert len(written) == 2
    assert Image.open(written[0]).size == Image.open(coco / "val" / written[0].name).size
    with pytest.raises(CheckpointError, match="is a detect checkpoint, not a segment one"):
        _run_cli("segment", "predict", str(run / "last.safetensors"), str(coco / "val"), "--output", str(out))


@pytest.mark.slow
def test_segment_commands_evaluate_multi_scale_and_predict(tmp_path, capsys):
    ade = synthetic.write_ade20k(tmp_path / "ade", num_train=4, num_val=2, size=64, seed=2)
    run = tmp_path / "run"
    assert (
        _run_cli(
            "segment",
            "train",
            "--data",
            str(ade),
            "--head",
            "upernet",
            "--model",
            "sepvit_lite",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--crop-size",
            "64",
            "--head-channels",
            "16",
            "--workers",
            "0",
            "--no-tensorboard",
            "--output",
            str(tmp_path),
            "--experiment",
            "run",
        )
        == 0
    )
    capsys.readouterr()
    assert _run_cli("segment", "eval", str(run / "last.safetensors"), "--data", str(ade), "--ms") == 0
    printed = capsys.readouterr().out
    assert "scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 + flip" in printed and "mIoU" in printed
    out = tmp_path / "predictions"
    image = next((ade / "images" / "validation").iterdir())
    assert (
        _run_cli("segment", "predict", str(run / "last.safetensors"), str(image), "--output", str(out)) == 0
    )
    picture = Image.open(out / f"{image.stem}.png")
    assert picture.size == Image.open(image).size and picture.mode == "RGB"


@pytest.mark.slow
def test_the_backbone_is_the_one_the_classification_checkpoint_names(tmp_path, capsys):
    from sepvit.cli import main

    classify = ["train", "--model", "sepvit_lite", "--img-size", "32", "--epochs", "1", "--limit-train", "64",
                "--limit-val", "16", "--batch-size", "32", "--aa", "none", "--no-tensorboard",
                "--output", str(tmp_path), "--experiment", "cls"]  # fmt: skip
    assert main(classify) == 0
    ade = synthetic.write_ade20k(tmp_path / "ade", num_train=4, num_val=1, size=64, seed=2)
    segment = ["segment", "train", "--data", str(ade), "--crop-size", "64", "--head-channels", "16",
               "--epochs", "1", "--batch-size", "2", "--no-tensorboard", "--output", str(tmp_path),
               "--experiment", "seg", "--pretrained-backbone", str(tmp_path / "cls" / "best.safetensors"),
               ]  # fmt: skip
    assert main(segment) == 0  # the paper preset's backbone is sepvit_tiny; the checkpoint's is used
    assert "backbone from" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "seg" / "last.safetensors")[1].model == "sepvit_lite"
