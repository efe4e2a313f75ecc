"""What a run does when things go wrong: it never saves or recommends broken weights, keeps what it
wrote, says in one line what happened, and continues where it stopped once the cause is fixed."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

from sepvit.classify.config import ClassifyConfig
from sepvit.classify.task import ClassificationTask
from sepvit.cli import main
from sepvit.engine import checkpoint as ckpt
from sepvit.engine import reporting
from sepvit.engine.distributed import DistContext
from sepvit.engine.loop import Trainer
from sepvit.errors import TrainingError

CPU = DistContext(0, 1, 0, torch.device("cpu"))
# One optimizer step per epoch: 16 training images, batches of 16.
ONE_STEP = dict(
    model="test_vit", img_size=32, batch_size=16, epochs=3, limit_train=16, limit_val=16, aa="none",
    mixup=0.0, cutmix=0.0, tensorboard=False, log_interval=100, lr=1e-3, warmup_epochs=0.0,
)  # fmt: skip
ARGV = ["--model", "test_vit", "--img-size", "32", "--batch-size", "16", "--limit-train", "16",
        "--limit-val", "16", "--aa", "none", "--mixup", "0", "--cutmix", "0", "--no-tensorboard"]  # fmt: skip


def _trainer(tmp_path: Path, resume: bool = False, step_hook=None, **overrides) -> Trainer:
    config = ClassifyConfig(**{**ONE_STEP, "output": str(tmp_path), "experiment": "run", **overrides})
    task = ClassificationTask(config)
    return Trainer(config, task, CPU, resume_dir=tmp_path / "run" if resume else None, step_hook=step_hook)


def _after_step(epoch: int, change) -> callable:
    def hook(trainer: Trainer) -> None:
        if trainer.epoch + 1 == epoch:
            with torch.no_grad():
                change(trainer.model.head.weight)

    return hook


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda weight: weight.fill_(float("nan")), "the weights became NaN or infinite in epoch 2"),
        # finite weights whose logits overflow: the validation loss is NaN
        (lambda weight: weight.mul_(1e38), "validation of the model weights after epoch 2 is not finite"),
    ],
)
def test_non_finite_weights_or_results_are_never_saved_or_recommended(
    tmp_path: Path, change, message: str, capsys: pytest.CaptureFixture
) -> None:
    trainer = _trainer(tmp_path, step_hook=_after_step(2, change), model_ema=False)
    with pytest.raises(TrainingError, match=message) as error:
        trainer.run()
    last = tmp_path / "run" / "last.safetensors"
    assert f"the last checkpoint, {last} (epoch 1, step 0), is kept" in str(error.value)
    for name in ("last", "best"):
        weights, info = ckpt.read_checkpoint(tmp_path / "run" / f"{name}.safetensors")
        assert info.progress["epoch"] == 1 and all(value.isfinite().all() for value in weights.values())
    # predict and eval refuse a checkpoint with non-finite tensors instead of printing nan%
    broken = tmp_path / "broken.safetensors"
    weights, info = ckpt.read_checkpoint(last)
    ckpt.weights_writer({k: v * float("nan") for k, v in weights.items()}, info)(str(broken))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert main(["predict", str(broken), str(image)]) == 2
    assert "holds NaN or infinite values" in capsys.readouterr().err


def test_a_nan_before_the_first_checkpoint_says_none_was_written(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, step_hook=_after_step(1, lambda weight: weight.fill_(float("inf"))))
    with pytest.raises(TrainingError, match="they were not saved and no checkpoint was written yet"):
        trainer.run()
    assert not (tmp_path / "run" / "last.safetensors").exists()


@pytest.mark.parametrize(
    ("target", "failure"),
    [
        ("save_file", SafetensorError("Error while serializing: IoError(No space left on device)")),
        (
            "torch_save",
            RuntimeError("[enforce fail at inline_container.cc:659] . PytorchStreamWriter failed"),
        ),
    ],
)
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    target: str,
    failure: Exception,
) -> None:
    assert main(["train", *ARGV, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run"]) == 0
    real = ckpt.save_file if target == "save_file" else ckpt.torch.save

    def failing(*args, **kwargs):
        raise failure

    if target == "save_file":
        monkeypatch.setattr(ckpt, "save_file", failing)
    else:
        monkeypatch.setattr(ckpt.torch, "save", failing)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sepvit train: error: could not write" in err
    assert "the previous files are kept" in err
    monkeypatch.setattr(ckpt, "save_file", real) if target == "save_file" else None
    assert ckpt.read_checkpoint(tmp_path / "run" / "last.safetensors")[1].progress["epoch"] == 1
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_plots_that_cannot_be_written_do_not_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def full_disk(figure, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reporting, "save_figure", full_disk)
    assert main(["train", *ARGV, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run"]) == 0
    assert "warning: plots not written: No space left on device" in capsys.readouterr().out
    assert (tmp_path / "run" / "last.safetensors").is_file()


def _folder(root: Path, per_class: int = 8) -> None:
    for split in ("train", "val"):
        for label, value in (("dark", 30), ("light", 220)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = np.full((16, 16, 3), value, np.uint8) + np.uint8(index)
                Image.fromarray(pixels).save(folder / f"{index}.jpg")


def test_a_truncated_validation_image_loses_no_epoch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _folder(tmp_path / "data")
    bad = tmp_path / "data" / "val" / "light" / "3.jpg"
    good = bad.read_bytes()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:-600])  # the header still verifies, the pixels do not decode
    argv = [
        *ARGV,
        "--data",
        str(tmp_path / "data"),
        "--epochs",
        "2",
        "--output",
        str(tmp_path),
        "--experiment",
        "run",
    ]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read image {bad}" in err
    assert "the run was saved at epoch 1, step 1" in err and f"--resume {tmp_path / 'run'}" in err
    bad.write_bytes(good)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert "resumed" in capsys.readouterr().out
    history = ckpt.RunCheckpoints(tmp_path / "run").load()[3]["history"]
    assert [row["epoch"] for row in history] == [1, 2]


def test_bad_runs_and_outputs_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *ARGV, "--batch-size", "32", "--output", str(tmp_path)]) == 2
    assert "16 training images make no full step of 32 images" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", *ARGV, "--epochs", "1", "--output", str(blocker / "runs")]) == 2
    assert "cannot write to the run folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_applies_new_schedule_options_and_refuses_run_defining_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *ARGV,
                "--epochs",
                "1",
                "--lr",
                "1e-3",
                "--output",
                str(tmp_path),
                "--experiment",
                "run",
            ]
        )
        == 0
    )
    (run / ".last.safetensors.stale.tmp").write_bytes(b"left by a kill")
    stale_set = run / "checkpoints" / "000009-e0001-s000003"
    stale_set.mkdir()
    assert main(["train", "--resume", str(run), "--epochs", "4", "--lr", "5e-4", "--warmup-epochs", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 file(s) left by an interrupted save" in out
    assert not (run / ".last.safetensors.stale.tmp").exists() and not stale_set.exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["epochs"], saved["lr"]) == (4, 5e-4)
    history = ckpt.RunCheckpoints(run).load()[3]["history"]
    # the 4-epoch cosine from the new peak (the old 1-epoch schedule had ended at --min-lr)
    assert len(history) == 4 and history[1]["lr"] == pytest.approx(1e-5 + (5e-4 - 1e-5) / 2)
    assert main(["train", "--resume", str(run), "--model", "test_convnext"]) == 2
    assert "cannot change --model from test_vit to test_convnext" in capsys.readouterr().err
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(f"resume: {run}\nepochs: 5\n")
    assert main(["train", "--config", str(config_file)]) == 2
    assert "resume cannot be set in a config file" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 4


def test_a_corrupt_training_state_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", *ARGV, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run"]) == 0
    state = ckpt.RunCheckpoints(tmp_path / "run").latest() / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot load training state {state}" in err


def test_eval_of_a_plain_state_dict_takes_the_class_names_from_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _folder(tmp_path / "data")
    import timm

    plain = tmp_path / "plain.safetensors"
    save_file(timm.create_model("test_vit", num_classes=2, img_size=32).state_dict(), plain)
    argv = ["eval", str(plain), "--model", "test_vit", "--num-classes", "2", "--img-size", "32"]
    assert main([*argv, "--data", str(tmp_path / "data"), "--json"]) == 0
    assert '"images": 16' in capsys.readouterr().out


def test_pretrained_from_a_timm_state_dict_replaces_the_classifier(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import timm

    source = timm.create_model("test_vit", num_classes=1000, img_size=32)
    weights = tmp_path / "test_vit_in1k.pth"
    torch.save(source.state_dict(), weights)
    argv = [*ARGV, "--epochs", "1", "--lr", "1e-9", "--pretrained", str(weights), "--no-model-ema"]
    assert main(["train", *argv, "--output", str(tmp_path), "--experiment", "ft"]) == 0
    out = capsys.readouterr().out
    assert (
        "not loaded (2): head.bias (checkpoint 1000, model 10), head.weight (checkpoint 1000×64, model 10×64)"
        in out
    )
    tuned, info = ckpt.read_checkpoint(tmp_path / "ft" / "last.safetensors")
    assert info.class_names == [str(d) for d in range(10)] and tuned["head.weight"].shape == (10, 64)
    body = source.state_dict()
    assert torch.allclose(tuned["patch_embed.proj.weight"], body["patch_embed.proj.weight"], atol=1e-6)


@pytest.mark.slow
def test_pretrained_without_network_or_cache_says_how_to_supply_weights(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}
    command = [sys.executable, "-m", "sepvit", "train", *ARGV, "--pretrained", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "no pretrained weights of test_vit could be loaded" in result.stderr
    assert "pass a local file instead: --pretrained FILE" in result.stderr
