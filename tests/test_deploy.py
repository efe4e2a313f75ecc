"""Deploying: dynamic-size exports at every size, atomic exports, int8 behind the accuracy gate, and
ONNX files evaluated and used for prediction like the checkpoints they come from."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from sepvit.cli import main
from sepvit.errors import ExportError
from sepvit.export import ExportMismatchError, compare_outputs, export_onnx
from sepvit.export.quantize import quantize_int8, sensitive_nodes
from sepvit.layers import SeparableWindowAttention

TRAIN = [
    "train", "--model", "test_convnext", "--img-size", "32", "--batch-size", "32", "--epochs", "2",
    "--lr", "3e-3", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
    "--warmup-epochs", "0", "--limit-train", "640", "--no-model-ema",
]  # fmt: skip


@pytest.mark.slow
def test_dynamic_size_export_runs_at_every_size_pytorch_runs(tmp_path):
    """Built for 16×16 with 2×2 windows, this SepViT's last map there is 1×1, which PyTorch specialises
    in a trace at that size (as sepvit_lite's at 32×32); the export traces at a larger size and runs in
    ONNX Runtime at sizes small and large, square or not, multiples of the window or not."""
    import timm

    import sepvit  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(
        "sepvit_lite", img_size=16, window_size=2, embed_dims=(16, 32, 48), depths=(1, 1, 1),
        num_heads=(1, 2, 2), block_plan="D,D,D",
    ).eval()  # fmt: skip
    with torch.no_grad():  # non-zero window tokens, so that resizing them is exercised
        for name, parameter in model.named_parameters():
            if "window_tokens" in name:
                parameter.normal_(std=0.5)
    assert any(isinstance(module, SeparableWindowAttention) for module in model.modules())
    shapes = [(1, 3, 16, 16), (2, 3, 64, 64), (1, 3, 100, 72), (1, 3, 224, 224), (1, 3, 17, 23)]
    exported = export_onnx(model, tmp_path / "m.onnx", (3, 16, 16), dynamic_size=True, check_shapes=shapes)
    assert exported.dynamic_size and exported.traced_size == (32, 32)
    assert [c.input_shape for c in exported.comparisons] == shapes
    assert all(c.max_abs_diff < 1e-4 for c in exported.comparisons)
    # Independently of the export's own check: another size, against a fresh PyTorch run.
    assert compare_outputs(model, exported, [(3, 3, 45, 130)])[0].max_abs_diff < 1e-4


class Drifting(nn.Module):
    """Adds the number of its calls: the traced graph keeps one count, PyTorch moves on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.mean(dim=(2, 3)) + self.calls


def test_export_that_fails_verification_leaves_the_old_file_alone(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an earlier export")
    with pytest.raises(ExportMismatchError, match=r"differs from PyTorch .* nothing written to .*m\.onnx"):
        export_onnx(Drifting(), path, (3, 8, 8))
    assert path.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left either


# ------------------------------------------------------------------------------ int8 and the gate

OUTLIER = 1e5


class OutlierHead(nn.Module):
    """A conv classifier of 8×8 digits whose head also sees a feature ~10⁴ times larger than
    the others (with zero weight): uint8 quantisation of the head's input then wipes out the others."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 64 + 1, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x)).flatten(1)
        outlier = OUTLIER * x.mean(dim=(1, 2, 3))[:, None]
        return self.head(torch.cat([features, outlier], dim=1))


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    """OutlierHead trained on digits, exported to ONNX; (path, calibration, held-out images, labels)."""
    digits = load_digits()
    images = np.repeat(digits.images[:, None] / 16.0, 3, axis=1).astype(np.float32)
    labels = digits.target
    train, held_out = slice(0, 1400), slice(1400, None)
    torch.manual_seed(0)
    model = OutlierHead()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            model.head.weight[:, -1] = 0
    path = tmp_path_factory.mktemp("int8") / "float.onnx"
    export_onnx(model.eval(), path, (3, 8, 8))
    return path, images[train][:256], images[held_out], labels[held_out]


def onnx_top1(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    from sepvit.utils.onnx_runtime import onnxruntime_session

    logits = onnxruntime_session(path).run(None, {"input": images})[0]
    return 100.0 * float((logits.argmax(1) == labels).mean())


def gate(digits_classifier, output: Path, max_drop: float, calibration_scale: float = 1.0):
    path, calibration, images, labels = digits_classifier
    return quantize_int8(
        path,
        output,
        lambda: [calibration[i : i + 64] * calibration_scale for i in range(0, len(calibration), 64)],
        lambda candidate: onnx_top1(candidate, images, labels),
        max_drop,
    )


def test_sensitive_nodes_are_the_head_and_residual_adds_not_biases(digits_classifier):
    import onnx

    graph = onnx.load(digits_classifier[0]).graph
    kinds = {node.name: node.op_type for node in graph.node}
    kept = sensitive_nodes(digits_classifier[0])
    assert [kinds[name] for name in kept] == ["Gemm"]  # the head; no softmax, LayerNorm or residual here
    assert graph.output[0].name in next(node for node in graph.node if node.name == kept[0]).output


def test_int8_gate_keeps_the_head_in_float_when_quantising_it_loses_too_much(digits_classifier, tmp_path):
    report = gate(digits_classifier, tmp_path / "int8.onnx", max_drop=1.0)
    assert report.float_top1 > 85
    assert report.float_top1 - report.first_attempt_top1 > 10  # the outlier ruins the quantised head
    assert report.drop <= 1.0 and report.kept_in_float == tuple(sensitive_nodes(digits_classifier[0]))
    assert report.int8_kernels.get("QLinearConv") == 1 and report.float_products == {"Gemm": 1}
    # What the report says is what the file does.
    _, _, images, labels = digits_classifier
    assert onnx_top1(report.path, images, labels) == report.int8_top1


def test_int8_gate_refuses_and_writes_nothing_when_both_attempts_lose_too_much(digits_classifier, tmp_path):
    output = tmp_path / "int8.onnx"
    # Calibrated on images 1000× too dark: every real input saturates the first layer's range.
    with pytest.raises(ExportError, match=r"int8 loses .* points .* --max-drop is 1: nothing written"):
        gate(digits_classifier, output, max_drop=1.0, calibration_scale=1e-3)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------- the command line, from a checkpoint


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs")
    assert main([*TRAIN, "--output", str(output), "--experiment", "run"]) == 0
    return output / "run"


@pytest.fixture(scope="module")
def exports(digits_run, tmp_path_factory):
    """fp32 and int8 exports of the run's checkpoint, and the int8 export's JSON report."""
    checkpoint = digits_run / "last.safetensors"
    assert main(["export", str(checkpoint)]) == 0
    report = io.StringIO()  # --json prints the report on standard output
    with contextlib.redirect_stdout(report):
        assert main(["export", str(checkpoint), "--int8", "--calibration-images", "64", "--json"]) == 0
    return digits_run / "last.onnx", digits_run / "last-int8.onnx", json.loads(report.getvalue())


def eval_json(path: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_onnx_eval_equals_the_checkpoints(digits_run, exports, capsys):
    fp32, int8, report = exports
    reference = eval_json(digits_run / "last.safetensors", capsys)
    exported = eval_json(fp32, capsys)
    assert exported["images"] == reference["images"] == 360 and exported["data"] == "digits"
    assert exported["top1"] == reference["top1"] and exported["top5"] == reference["top5"]
    assert exported["loss"] == pytest.approx(reference["loss"], abs=1e-4)
    quantised = eval_json(int8, capsys)
    assert quantised["top1"] == pytest.approx(report["int8"]["int8_top1"])  # the gate measured the same
    assert report["int8"]["float_top1"] == pytest.approx(reference["top1"])
    assert reference["top1"] - quantised["top1"] <= 1.0
    assert report["int8"]["int8_kernels"]["QLinearConv"] > 0 and report["int8"]["vnni"] in (True, False)


@pytest.mark.slow
def test_onnx_predict_equals_the_checkpoints(digits_run, exports, tmp_path, capsys):
    images = []
    for index, pixels in enumerate(load_digits().images[-5:]):
        images.append(str(tmp_path / f"{index}.png"))
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(images[-1])

    def predict(path: Path) -> list[dict]:
        capsys.readouterr()
        assert main(["predict", str(path), *images, "--top-k", "3", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    reference, fp32, int8 = (predict(path) for path in (digits_run / "last.safetensors", *exports[:2]))
    for ours, theirs in zip(fp32, reference):
        assert [p["class"] for p in ours["predictions"]] == [p["class"] for p in theirs["predictions"]]
        for p, q in zip(ours["predictions"], theirs["predictions"]):
            assert p["probability"] == pytest.approx(q["probability"], abs=1e-4)
    for ours, theirs in zip(int8, reference):
        assert ours["predictions"][0]["probability"] == pytest.approx(
            theirs["predictions"][0]["probability"], abs=0.05
        )


def test_onnx_eval_errors_are_one_line(tmp_path, capsys):
    foreign = tmp_path / "foreign.onnx"
    export_onnx(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()).eval(), foreign, (3, 8, 8))  # no metadata
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    for path, message in (
        (foreign, "foreign.onnx does not say what it classifies (no sepvit metadata"),
        (broken, "broken.onnx is not a readable ONNX file"),
        (tmp_path / "missing.onnx", "missing.onnx does not exist"),
    ):
        capsys.readouterr()
        assert main(["eval", str(path), "--data", "digits"]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1


def test_int8_export_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    output = tmp_path / "m.onnx"
    assert main(["export", "test_convnext", "--int8", "-o", str(output)]) == 2
    assert "--int8 needs a trained checkpoint" in capsys.readouterr().err
    assert main(["export", "test_convnext", "--int8", "--fp16", "-o", str(output)]) == 2
    assert "--int8 and --fp16 exclude each other" in capsys.readouterr().err
    assert not output.exists()
