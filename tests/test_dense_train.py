"""Training on the embedded shapes data: it learns, and the commands train, resume, evaluate and predict."""

import csv

import pytest
import torch
from PIL import Image

from sepvit.cli import CliError
from sepvit.dense import synthetic
from sepvit.dense.backbone import create_features
from sepvit.dense.data import (
    ADE20KSegmentation,
    CocoDetection,
    SegmentationEvalDataset,
    collate_detection,
    collate_segmentation,
    detection_transforms,
    segmentation_transforms,
)
from sepvit.dense.detection import build_detector, evaluate_detection
from sepvit.dense.engine import Recipe, Trainer, lr_factor, read_weights
from sepvit.dense.metrics import ConfusionMatrix, coco_map, whole_image_detections
from sepvit.dense.segmentation import Segmenter, evaluate_segmentation


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are small: one intra-op thread is about as fast, and two threads spin-wait
    # for each other many times over when the cores are shared with other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_cli(*argv: str) -> int:
    import argparse

    from sepvit.dense.cli import register

    parser = argparse.ArgumentParser(prog="sepvit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_schedules_follow_the_recipes():
    step = Recipe(epochs=12, milestones=(8, 11), warmup_iters=10, warmup_ratio=0.001)
    assert lr_factor(step, 0, 100) == pytest.approx(0.001)
    assert lr_factor(step, 5, 100) == pytest.approx(0.001 + 0.999 * 0.5)
    assert [lr_factor(step, e * 100, 100) for e in (1, 7, 8, 10, 11)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    poly = Recipe(epochs=2, schedule="poly", power=0.9, warmup_iters=0)
    assert lr_factor(poly, 100, 100) == pytest.approx(0.5**0.9) and lr_factor(poly, 200, 100) == 0.0


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
    torch.manual_seed(0)
    root = synthetic.write_ade20k(tmp_path / "ade", num_train=96, num_val=16, size=64, seed=5)
    crop = 64
    train_set = ADE20KSegmentation(root, "training", segmentation_transforms(True, crop, (0.75, 1.5)))
    val_set = SegmentationEvalDataset(ADE20KSegmentation(root, "validation"), crop)
    model = Segmenter(create_features("sepvit_lite", img_size=(crop, crop)), "fpn", 4, head_channels=32)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=8, shuffle=True, collate_fn=collate_segmentation, drop_last=True
    )
    trainer = Trainer(
        model=model,
        train_loader=loader,
        compute_losses=lambda network, batch, device: network(*batch),
        evaluate=lambda m: evaluate_segmentation(m, val_set, torch.device("cpu")),
        recipe=Recipe(epochs=12, lr=1e-3, schedule="poly", warmup_iters=10),
        output_dir=tmp_path / "run",
        config={"task": "segment"},
        primary_metric="mIoU",
        log_every=1000,
    )
    trainer.fit()
    best = max(float(row["mIoU"]) for row in _csv_rows(tmp_path / "run" / "metrics.csv"))
    trivial = _all_background_miou(val_set)
    assert trivial < 0.25 and best > trivial + 0.08, (trivial, best)


def _detection_losses(network, batch, device):
    images, targets = batch
    return network(
        images, [{k: v.as_subclass(torch.Tensor) for k, v in t.items() if k != "image_id"} for t in targets]
    )


@pytest.mark.slow
def test_retinanet_learns_the_shapes(tmp_path):
    torch.manual_seed(0)
    size = 96
    root = synthetic.write_coco(tmp_path / "coco", num_train=64, num_val=1, size=size, seed=3)
    train_set = CocoDetection(root, "train", detection_transforms(True))
    seen_set = CocoDetection(root, "train")  # scored on the training images: a short run memorises
    model = build_detector(
        "retinanet",
        create_features("sepvit_lite", img_size=(size, size)),
        3,
        min_size=size,
        max_size=size,
        fpn_channels=32,
    )
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=8, shuffle=True, collate_fn=collate_detection, drop_last=True
    )
    trainer = Trainer(
        model=model,
        train_loader=loader,
        compute_losses=_detection_losses,
        evaluate=lambda m: evaluate_detection(m, seen_set, torch.device("cpu"), batch_size=8),
        recipe=Recipe(epochs=10, lr=1e-3, milestones=(9,), warmup_iters=10),
        output_dir=tmp_path / "run",
        config={"task": "detect"},
        primary_metric="bbox_AP",
        log_every=1000,
    )
    trainer.fit()
    rows = _csv_rows(tmp_path / "run" / "metrics.csv")
    first_loss, last_loss = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    best_ap = max(float(row["bbox_AP"]) for row in rows)
    best_ap50 = max(float(row["bbox_AP50"]) for row in rows)
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
        "--warmup-iters",
        "1",
        "--output",
        str(run),
    ]
    assert _run_cli("detect", "train", "--arch", "maskrcnn", "--epochs", "1", *common) == 0
    first = _csv_rows(run / "metrics.csv")
    assert len(first) == 1 and {"train_loss", "bbox_AP", "segm_AP"} <= set(first[0])
    assert (run / "metrics.png").stat().st_size > 0
    # Resume continues at epoch 2; changed model settings are refused.
    assert _run_cli("detect", "train", "--arch", "maskrcnn", "--epochs", "2", "--resume", *common) == 0
    assert [row["epoch"] for row in _csv_rows(run / "metrics.csv")] == ["1", "2"]
    _, config, epoch = read_weights(run / "last.safetensors")
    assert (
        epoch == 2 and config["arch"] == "maskrcnn" and config["class_names"] == list(synthetic.SHAPE_NAMES)
    )
    with pytest.raises(CliError, match="fpn_channels"):
        _run_cli(
            "detect",
            "train",
            "--arch",
            "maskrcnn",
            "--epochs",
            "3",
            "--resume",
            *common,
            "--fpn-channels",
            "8",
        )

    capsys.readouterr()
    assert (
        _run_cli("detect", "eval", str(run / "best.safetensors"), "--data", str(coco), "--split", "val") == 0
    )
    assert "bbox_AP" in capsys.readouterr().out
    out = tmp_path / "predictions"
    assert (
        _run_cli(
            "detect", "predict", str(run / "last.safetensors"), str(coco / "val"), "--output-dir", str(out)
        )
        == 0
    )
    written = sorted(out.glob("*.png"))
    assert len(written) == 2
    assert Image.open(written[0]).size == Image.open(coco / "val" / written[0].name).size
    with pytest.raises(CliError, match="not a segment"):
        _run_cli(
            "segment", "predict", str(run / "last.safetensors"), str(coco / "val"), "--output-dir", str(out)
        )


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
            "--output",
            str(run),
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
        _run_cli("segment", "predict", str(run / "last.safetensors"), str(image), "--output-dir", str(out))
        == 0
    )
    picture = Image.open(out / f"{image.stem}.png")
    assert picture.size == Image.open(image).size and picture.mode == "RGB"
