"""Each kind of input is checked where it enters: the named cases of run folders, weights-file and
shard metadata, image folders, option ranges, a run that stopped before its first checkpoint, and
the features at their edges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sepvit.classify.config import ClassifyConfig
from sepvit.classify.data import pack_image_folder, scan_image_folders, shard_label
from sepvit.cli import main
from sepvit.engine import checkpoint as ckpt
from sepvit.engine.run_folder import new_run_folder
from sepvit.engine.shards import INFO_FILE, read_info, read_samples
from sepvit.errors import CheckpointError, ConfigError, DataError
from sepvit.models.input_sizes import size_limits

TINY = ["--model", "test_vit", "--img-size", "32", "--batch-size", "16", "--limit-train", "16",
        "--limit-val", "16", "--aa", "none", "--mixup", "0", "--cutmix", "0", "--no-tensorboard",
        "--epochs", "1"]  # fmt: skip


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture, code: int = 2) -> str:
    try:
        status = main(argv)
    except SystemExit as stop:  # the command line itself was refused
        status = stop.code
    assert status == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sepvit ") and "Traceback" not in err, err
    return err


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(path)


# -- run folders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../..", "../escaped", "/tmp/sepvit-elsewhere", "a/../../b"])
def test_an_experiment_outside_the_output_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    output = tmp_path / "runs"
    err = _one_line_error(["train", *TINY, "--output", str(output), "--experiment", name], capsys)
    assert "--experiment must name a folder inside --output" in err
    assert list(tmp_path.iterdir()) == [] and not Path("/tmp/sepvit-elsewhere").exists()


def test_a_config_file_cannot_place_a_run_outside_the_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("experiment: ../../outside\n")
    err = _one_line_error(["train", "--config", str(config), "--output", str(tmp_path / "runs")], capsys)
    assert "--experiment must name a folder inside --output" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_link_out_of_the_output_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="leads outside --output"):
        new_run_folder(tmp_path / "runs", "link")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"notes.txt": "mine"}, "holds files that are not a sepvit run's"),
        ({"best.safetensors": "kept weights"}, r"already holds a run \(best.safetensors\)"),
        ({"last.safetensors": "weights"}, "already holds a run"),
    ],
)
def test_an_existing_folder_is_never_written_into(tmp_path: Path, files: dict, message: str) -> None:
    run_dir = tmp_path / "runs" / "taken"
    run_dir.mkdir(parents=True)
    for name, text in files.items():
        (run_dir / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        new_run_folder(tmp_path / "runs", "taken")
    assert {p.name: p.read_text() for p in run_dir.iterdir()} == files


def test_an_absolute_existing_folder_is_refused_by_the_command(tmp_path: Path, capsys) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.yaml").write_text("precious: true\n")
    _one_line_error(["train", *TINY, "--output", str(tmp_path / "runs"), "--experiment", str(victim)], capsys)
    assert (victim / "config.yaml").read_text() == "precious: true\n"
    _one_line_error(
        ["segment", "train", "--output", str(tmp_path / "runs"), "--experiment", str(victim)], capsys
    )


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again(tmp_path: Path, capsys) -> None:
    """A kill or a full disk during the first save leaves config.yaml, a half-written set and
    temporary files: rerunning the command takes the folder; --resume says to rerun."""
    run_dir = tmp_path / "runs" / "first"
    half = run_dir / "checkpoints" / "000001-e0001-s000001"
    half.mkdir(parents=True)
    (half / ".last.safetensors.x.tmp").write_bytes(b"0" * 1000)
    (run_dir / "config.yaml").write_text("model: test_vit\n")
    (run_dir / ".config.yaml.y.tmp").write_text("")
    err = _one_line_error(["train", "--resume", str(run_dir)], capsys)
    assert "run the same command again without --resume" in err
    assert new_run_folder(tmp_path / "runs", "first") == run_dir
    assert list(run_dir.iterdir()) == []


@pytest.mark.slow
def test_rerunning_after_a_failed_first_save_trains(tmp_path: Path, capsys) -> None:
    argv = ["train", *TINY, "--output", str(tmp_path), "--experiment", "run"]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("left: by a killed run\n")
    (tmp_path / "run" / "checkpoints" / ".LATEST.z.tmp").write_text("")
    assert main(argv) == 0
    assert (tmp_path / "run" / "last.safetensors").is_file()
    assert not list((tmp_path / "run").rglob("*.tmp"))


# -- weights-file metadata -----------------------------------------------------------------------
GOOD = {"version": 2, "task": "classify", "model": "test_vit", "model_kwargs": {}, "class_names": ["a", "b"],
        "input_size": [32, 32]}  # fmt: skip


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"format": ckpt.FORMAT}, "holds no sepvit description"),
        ({"format": ckpt.FORMAT, "sepvit": "{not json"}, "is not JSON"),
        ({"format": ckpt.FORMAT, "sepvit": "[1, 2]"}, "not a JSON object"),
        ({"format": ckpt.FORMAT, "sepvit": json.dumps({"version": 2, "task": "classify"})}, "unusable"),
        (
            {"format": ckpt.FORMAT, "sepvit": json.dumps({**GOOD, "input_size": [100000, 100000]})},
            "to 2048 pixels",
        ),
        (
            {
                "format": ckpt.FORMAT,
                "sepvit": json.dumps({**GOOD, "data_config": {"input_size": [3, 10**5, 10**5]}}),
            },
            "data_config input_size",
        ),
        (
            {"format": ckpt.FORMAT, "sepvit": json.dumps({**GOOD, "model_kwargs": [1]})},
            "model_kwargs must be",
        ),
        ({"format": ckpt.FORMAT, "sepvit": json.dumps({**GOOD, "task": "paint"})}, "task must be one of"),
    ],
)
def test_weights_metadata_is_refused_in_one_line_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture, metadata: dict, message: str
) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata=metadata)
    for argv in (["eval", str(path)], ["predict", str(path), "x.png"], ["export", str(path)]):
        assert message in _one_line_error(argv, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_a_random_bytes_training_state_gets_no_unsafe_advice(tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    state.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(CheckpointError) as error:
        ckpt.load_tensors_only(state)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


# -- shards --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("label", "message"),
    [
        (b"abc", "a class index"),
        (b"-1", "a class index"),
        (b"42", "have 10 classes"),
        (b"4.5", "a class index"),
    ],
)
def test_a_shard_label_out_of_range_or_not_an_integer_is_refused(label: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        shard_label({"cls": label}, "shard/0001", num_classes=10)
    assert shard_label({"cls": b"9"}, "shard/0001", num_classes=10) == 9


@pytest.mark.parametrize(
    "info",
    [
        {"splits": {"train": {"filenames": "train-000000.tar"}}},
        {"splits": {"train": {"filenames": ["../../etc/x.tar"]}}},
        {"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": ["7"]}}},
        {"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [1, 2]}}},
        {"classes": "cat", "splits": {}},
        {"splits": {"train": [1, 2]}},
    ],
)
def test_shard_info_fields_of_the_wrong_type_are_refused(tmp_path: Path, info: dict) -> None:
    (tmp_path / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(DataError, match="not a usable shard info file"):
        read_info(str(tmp_path))


@pytest.mark.slow
def test_a_bad_label_in_a_val_shard_keeps_the_epoch_just_trained(
    digits_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import webdataset

    shards = tmp_path / "shards"
    pack_image_folder(digits_folder, shards, 1000)
    val = shards / "val-000000.tar"
    samples = list(read_samples(str(val)))
    samples[5]["cls"] = b"42"
    with webdataset.TarWriter(str(val)) as writer:
        for sample in samples:
            writer.write({key: value for key, value in sample.items() if not key.startswith("__url")})
    argv = ["train", *TINY, "--data", str(shards), "--output", str(tmp_path), "--experiment", "run"]
    err = _one_line_error(argv, capsys)
    assert "has the label 42, but the shards have 10 classes" in err and "--resume" in err
    assert (tmp_path / "run" / "last.safetensors").is_file()


# -- image folders -------------------------------------------------------------------------------
def test_hidden_folders_are_not_classes_and_broken_links_are_listed(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for name in ("cat", "dog", ".ipynb_checkpoints"):
            _image(tmp_path / split / name / "0.png")
    (tmp_path / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    train, val = scan_image_folders(tmp_path)
    assert train.classes == val.classes == ["cat", "dog"]
    assert (str(tmp_path / "train" / "cat" / "gone.png"), "broken link") in train.skipped


def test_a_one_class_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for split in ("train", "val"):
        _image(tmp_path / split / "only" / "0.png")
    err = _one_line_error(
        ["train", *TINY, "--data", str(tmp_path), "--output", str(tmp_path / "runs")], capsys
    )
    assert "has one class folder (only); a classifier needs at least two" in err


# -- option ranges -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--model", "sv_efficientvit_m0", "--img-size", "7"],
        ["train", "--img-size", "100000"],
        ["bench", "sv_efficientvit_m0", "--img-size", "7"],
        ["bench", "sepvit_lite", "--img-size", "0"],
        ["models", "--img-size", "0"],
        ["models", "sv_efficientvit_m0", "--img-size", "7"],
        ["models", "--repeats", "0"],
        ["export", "sepvit_lite", "--img-size", "100000"],
        ["detect", "train", "--fpn-channels", "1"],
        ["segment", "train", "--crop-size", "100000"],
        ["predict", "missing.safetensors", "x.png", "--top-k", "0"],
    ],
)
def test_options_out_of_range_are_refused_before_work(tmp_path: Path, monkeypatch, capsys, argv) -> None:
    monkeypatch.chdir(tmp_path)
    _one_line_error(argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_collide_are_refused_before_work(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").write_text("a file\n")
    (tmp_path / "cm").mkdir()
    _one_line_error(["bench", "sepvit_lite", "--output", "results"], capsys)
    _one_line_error(["eval", "missing.safetensors", "--confusion-matrix", "cm"], capsys)
    assert (tmp_path / "results").read_text() == "a file\n" and list((tmp_path / "cm").iterdir()) == []


def test_every_family_states_its_sensible_sizes() -> None:
    assert size_limits("sepvit_tiny") == (16, 2048)
    assert size_limits("sv_efficientvit_m5.r224_in1k") == (16, 2048)
    assert size_limits("sv_mobilevitv2_100")[0] <= 32
    with pytest.raises(ConfigError, match="16 to 2048"):
        ClassifyConfig(model="sv_efficientvit_m0", img_size=7)


def test_a_bad_option_prints_one_line_and_help_keeps_its_usage() -> None:
    command = [sys.executable, "-m", "sepvit"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    bad = subprocess.run([*command, "models", "--repeats", "0"], capture_output=True, text=True, env=env)
    assert (
        bad.returncode == 2
        and bad.stderr == "sepvit models: error: argument --repeats: must be at least 1, got 0\n"
    )
    helped = subprocess.run([*command, "models", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: sepvit models")


# -- features at their edges ---------------------------------------------------------------------
@pytest.mark.parametrize("fpn_channels", [16, 32])
def test_narrow_retinanet_heads_predict_at_batch_one(fpn_channels: int) -> None:
    import timm

    from sepvit.dense.detection import build_detector

    body = timm.create_model("sepvit_lite", features_only=True, img_size=128)
    detector = build_detector("retinanet", body, 3, 128, 128, fpn_channels).eval()
    with torch.no_grad():
        (found,) = detector([torch.rand(3, 128, 128)])
    assert set(found) >= {"boxes", "scores", "labels"}


def test_explain_of_an_onnx_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    err = _one_line_error(
        ["explain", str(tmp_path / "model.onnx"), "x.png", "--output", str(tmp_path)], capsys
    )
    assert "is an ONNX export" in err


def test_onnx_exports_follow_the_umask(tmp_path: Path) -> None:
    from sepvit.export import export_onnx
    from sepvit.models import create_model

    model = create_model(
        "sepvit_lite", img_size=16, window_size=2, embed_dims=(8, 16, 24), depths=(1, 1, 1),
        num_heads=(1, 1, 1), block_plan="D,D,D",
    ).eval()  # fmt: skip
    previous = os.umask(0o022)
    try:
        export_onnx(model, tmp_path / "m.onnx", (3, 16, 16))
    finally:
        os.umask(previous)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644
