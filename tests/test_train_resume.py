"""Runs that survive: resume continues exactly, SIGTERM saves a checkpoint before exiting."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sepvit.classify.config import ClassifyConfig
from sepvit.classify.task import ClassificationTask
from sepvit.engine.checkpoint import RunCheckpoints, read_checkpoint
from sepvit.engine.distributed import DistContext
from sepvit.engine.loop import Trainer

CPU = DistContext(0, 1, 0, torch.device("cpu"))

# Every source of randomness on: RandAugment, random erasing, mixup/cutmix, drop path, EMA.
NOISY_RUN = dict(
    model="sepvit_lite",
    img_size=32,
    batch_size=8,
    epochs=3,
    limit_train=24,
    limit_val=16,
    lr=1e-3,
    warmup_epochs=1.0,
    drop_path=0.1,
    mixup=0.8,
    cutmix=1.0,
    reprob=0.25,
    hflip=0.5,
    tensorboard=False,
    log_interval=100,
)


def _trainer(output: Path, experiment: str, resume: bool = False, step_hook=None) -> Trainer:
    config = ClassifyConfig(**NOISY_RUN, output=str(output), experiment=experiment)
    resume_dir = output / experiment if resume else None
    return Trainer(config, ClassificationTask(config), CPU, resume_dir=resume_dir, step_hook=step_hook)


def load_training_state(run_dir: Path) -> dict:
    return RunCheckpoints(run_dir).load()[3]


def _stop_at(epoch: int, step: int):
    def hook(trainer: Trainer) -> None:
        if trainer.epoch + 1 == epoch and trainer.step_in_epoch == step:
            trainer.stop.request()

    return hook


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "last.safetensors")[0]


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    timing = ("epoch_seconds", "train_images_per_s")
    return [{key: value for key, value in row.items() if key not in timing} for row in rows]


@pytest.mark.slow
def test_interrupted_and_resumed_runs_equal_a_straight_run(tmp_path: Path) -> None:
    _trainer(tmp_path, "straight").run()
    straight = _weights(tmp_path / "straight")

    # stopped at the end of epoch 1 (step 3 of 3), then mid-epoch 2 (step 1): each resume continues exactly
    first = _trainer(tmp_path, "pieces", step_hook=_stop_at(1, 3)).run()
    assert first.interrupted_by == "request"
    state = load_training_state(tmp_path / "pieces")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 3)
    second = _trainer(tmp_path, "pieces", resume=True, step_hook=_stop_at(2, 1)).run()
    assert second.interrupted_by == "request"
    _trainer(tmp_path, "pieces", resume=True).run()

    resumed = _weights(tmp_path / "pieces")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "pieces")
    ema_straight = load_training_state(tmp_path / "straight")["ema"]
    ema_resumed = load_training_state(tmp_path / "pieces")["ema"]
    assert all(torch.equal(ema_straight[key], ema_resumed[key]) for key in ema_straight)


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_and_the_run_resumes(tmp_path: Path) -> None:
    options = "--model test_vit --img-size 32 --batch-size 8 --epochs 2 --limit-train 64 --limit-val 16"
    command = [sys.executable, "-m", "sepvit", "train", *options.split(), "--log-interval", "1",
               "--no-tensorboard", "--output", str(tmp_path), "--experiment", "killed"]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch 1/2 step 2/8"):
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, output
    assert "SIGTERM received" in output and "--resume" in output

    run_dir = tmp_path / "killed"
    weights, info = read_checkpoint(run_dir / "last.safetensors")
    state = load_training_state(run_dir)
    assert info.progress["epoch"] == 0 and 2 <= info.progress["step_in_epoch"] < 8
    assert state["step_in_epoch"] == info.progress["step_in_epoch"]
    assert all(torch.isfinite(value).all() for value in weights.values())

    resumed = subprocess.run(
        [sys.executable, "-m", "sepvit", "train", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run_dir} at epoch 1, step {info.progress['step_in_epoch']}" in resumed.stdout
    assert read_checkpoint(run_dir / "last.safetensors")[1].progress["epoch"] == 2


def test_the_ema_decay_warms_up_with_the_configured_power(tmp_path: Path) -> None:
    config = ClassifyConfig(
        **NOISY_RUN, output=str(tmp_path), experiment="ema", ema_decay=0.999, ema_warmup_power=0.85
    )
    ema = Trainer(config, ClassificationTask(config), CPU).ema
    # timm counts the first update as step 0 of its warm-up: 1 - (1 + (step - 1)) ** -power.
    assert ema.get_decay(11) == pytest.approx(1 - 11**-0.85)
    assert ema.get_decay(100_000) == pytest.approx(0.999)  # the decay caps the warm-up
