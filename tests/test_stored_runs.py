"""Checkpoints written by an earlier version keep loading: one small run of each task, written
before runs stored a RunDescription, in tests/data/checkpoints/ (``test_efficientnet`` trained for
one epoch: classification on the digits at 32 px, detection at 160 px and segmentation at 64 px
on the embedded shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sepvit.cli import main
from sepvit.runs import load_run
from sepvit.utils.onnx_runtime import read_metadata

STORED = Path(__file__).parent / "data" / "checkpoints"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_a_stored_classifier_predicts(image: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["predict", str(STORED / "classify.safetensors"), str(image), "--top-k", "2", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert len(predictions) == 2
    assert {p["class"] for p in predictions} <= {str(digit) for digit in range(10)}


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_stored_dense_run_predicts(task: str, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    output = tmp_path / "out"
    run = str(STORED / f"{task}.safetensors")
    assert main([task, "predict", run, str(image), "--output", str(output), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert len(written) == 1 and Path(written[0]["output"]).is_file()


@pytest.mark.parametrize(("task", "classes"), [("classify", 10), ("detect", 3), ("segment", 4)])
def test_a_stored_run_loads_with_its_description(task: str, classes: int):
    model, description = load_run(STORED / f"{task}.safetensors")
    assert description.task == task and description.model == "test_efficientnet"
    assert len(description.class_names) == classes and description.progress["epoch"] == 1
    assert not model.training


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_dense_run_exports(task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    output = tmp_path / f"{task}.onnx"
    run = str(STORED / f"{task}.safetensors")
    assert main(["export", run, "--output", str(output), "--check-batch-sizes", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert output.is_file() and report["non_universal_operators"] is not None
    assert read_metadata(output)["task"] == task
