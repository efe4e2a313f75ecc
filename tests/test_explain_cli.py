"""``sepvit explain``: overlays written as PNG files, the receptive field, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sepvit.classify.models import build_classifier, data_config_for, describe_classifier
from sepvit.cli import main
from sepvit.engine.checkpoint import weights_writer

TINY = dict(window_size=4, embed_dims=(8, 16, 32, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8))


def write_checkpoint(path, **options) -> str:
    torch.manual_seed(0)
    model, kwargs = build_classifier("sepvit_lite", 10, 64, architecture={**TINY, **options})
    info = describe_classifier(
        "sepvit_lite", kwargs, [str(i) for i in range(10)], data_config_for(model, 64, 1.0)
    )
    weights_writer(model.state_dict(), info)(str(path))
    return str(path)


@pytest.fixture
def images(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_overlays_and_receptive_field(tmp_path, images, capsys):
    checkpoint = write_checkpoint(tmp_path / "sepvit.safetensors")
    output = tmp_path / "out"
    assert main(["explain", checkpoint, *images, "--output", str(output), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(path.name for path in output.iterdir()) == [
        "a_gradcam.png", "a_psa.png", "b_gradcam.png", "b_psa.png"
    ]  # fmt: skip
    for path in output.iterdir():
        with Image.open(path) as picture:
            # 64-px inputs are enlarged four times, pixels kept sharp (each 4×4 block one colour)
            assert picture.format == "PNG" and picture.size == (256, 256)
            if path.name.endswith("_gradcam.png"):  # (the PSA overlay's outline is drawn at full size)
                pixels = np.asarray(picture.convert("RGB"))
                assert (pixels == pixels[::4, ::4].repeat(4, 0).repeat(4, 1)).all()
    field = report["effective_receptive_field"]
    assert field["window_pixels"] == 24  # three first-stage windows of a 64-px input
    for when in ("trained", "initialisation"):
        assert 0 < field[when]["stage1"] < field[when]["stage3"] < 1

    local = write_checkpoint(tmp_path / "local.safetensors", window_attention="local", block_plan="D,D,D,D")
    assert main(["explain", local, images[0], "--output", str(tmp_path / "local")]) == 0
    assert "a_gradcam.png" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "local").iterdir()) == ["a_gradcam.png"]  # no PSA


def test_bad_checkpoint_or_image_is_one_line_error(tmp_path, images, capsys):
    checkpoint = write_checkpoint(tmp_path / "sepvit.safetensors")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    output = tmp_path / "out"
    for args, problem in (
        ([str(tmp_path / "missing.safetensors"), *images], "does not exist"),
        ([str(garbage), *images], "not a readable safetensors file"),
        ([checkpoint, images[0], str(broken)], "broken.png"),
    ):
        assert main(["explain", *args, "--output", str(output)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("sepvit explain: error:") and problem in error[0]
    assert not output.exists()  # nothing written before every input was read
