"""Detection and segmentation runs survive like classification's: a stop at any step, a SIGTERM or
a SIGKILL at a random time, then --resume, end with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sepvit.cli import main
from sepvit.dense import synthetic
from sepvit.dense.config import DetectConfig, SegmentConfig
from sepvit.dense.tasks import DetectionTask, SegmentationTask
from sepvit.engine.checkpoint import RunCheckpoints, read_checkpoint
from sepvit.engine.distributed import DistContext
from sepvit.engine.loop import Trainer

CPU = DistContext(0, 1, 0, torch.device("cpu"))
# Every source of randomness on: flips, colour jitter, random crops and scales, drop path, proposal
# sampling (Mask R-CNN), EMA; two micro-batches per optimizer step.
COMMON = dict(
    model="sepvit_lite", epochs=2, batch_size=2, accum_steps=2, lr=1e-3, warmup_steps=1, drop_path=0.1,
    model_ema=True, ema_decay=0.9, workers=0, tensorboard=False, log_interval=100, device="cpu",
)  # fmt: skip
TASKS = {
    "segment": (SegmentationTask, SegmentConfig, dict(head="upernet", crop_size=64, head_channels=16)),
    "detect": (
        DetectionTask,
        DetectConfig,
        dict(
            arch="maskrcnn", min_size=64, max_size=64, fpn_channels=16, train_split="train", val_split="val"
        ),
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(tmp_path: Path, kind: str) -> Path:
    if kind == "detect":
        return synthetic.write_coco(tmp_path / "coco", num_train=8, num_val=2, size=64, seed=4)
    return synthetic.write_ade20k(tmp_path / "ade", num_train=8, num_val=2, size=64, seed=4)


def _weights(run_dir: Path) -> tuple[dict, dict]:
    state = RunCheckpoints(run_dir).load()[3]
    return read_checkpoint(run_dir / "last.safetensors")[0], state["ema"]


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {k: v for k, v in row.items() if k not in ("epoch_seconds", "train_images_per_s")} for row in rows
    ]


def _assert_same_run(straight: Path, resumed: Path) -> None:
    (model_a, ema_a), (model_b, ema_b) = _weights(straight), _weights(resumed)
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[key], model_b[key]) for key in model_a)
    assert all(torch.equal(ema_a[key], ema_b[key]) for key in ema_a)
    assert _metrics(straight) == _metrics(resumed)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(TASKS))
def test_stopped_and_resumed_runs_equal_a_straight_run(tmp_path: Path, kind: str) -> None:
    task_type, config_type, options = TASKS[kind]
    data = _data(tmp_path, kind)

    def trainer(name: str, resume: bool = False, stop_at: tuple[int, int] | None = None) -> Trainer:
        config = config_type(**COMMON, **options, data=str(data), output=str(tmp_path), experiment=name)

        def hook(trainer: Trainer) -> None:
            if stop_at == (trainer.epoch + 1, trainer.step_in_epoch):
                trainer.stop.request()

        resume_dir = tmp_path / name if resume else None
        return Trainer(config, task_type(config), CPU, resume_dir=resume_dir, step_hook=hook)

    trainer("straight").run()
    # 2 optimizer steps an epoch: stopped mid-epoch 1, then at the end of epoch 1's steps (before its
    # evaluation), then mid-epoch 2; each resume continues exactly.
    assert trainer("pieces", stop_at=(1, 1)).run().interrupted_by == "request"
    assert trainer("pieces", resume=True, stop_at=(1, 2)).run().interrupted_by == "request"
    assert trainer("pieces", resume=True, stop_at=(2, 1)).run().interrupted_by == "request"
    trainer("pieces", resume=True).run()
    _assert_same_run(tmp_path / "straight", tmp_path / "pieces")


@pytest.mark.slow
def test_sigterm_and_sigkill_at_random_times_then_resume_give_the_straight_run(tmp_path: Path) -> None:
    data = _data(tmp_path, "segment")
    argv = ["segment", "train", "--data", str(data), "--head", "fpn", "--crop-size", "64", "--head-channels",
            "16", "--model", "sepvit_lite", "--epochs", "3", "--batch-size", "2", "--lr", "1e-3",
            "--warmup-steps", "1", "--model-ema", "--ema-decay", "0.9", "--workers", "0", "--no-tensorboard",
            "--log-interval", "1", "--device", "cpu", "--output", str(tmp_path)]  # fmt: skip
    assert main([*argv, "--experiment", "straight"]) == 0

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "sepvit"]
    rng = random.Random(0)
    interrupted = 0
    for attempt in range(4):
        started = (run / "checkpoints" / "LATEST").exists()  # else killed before its first save
        args = ["segment", "train", "--resume", str(run)] if started else [*argv, "--experiment", "killed"]
        process = subprocess.Popen(
            [*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        # Kill at a random point of the run's own progress, whatever the machine's speed: after the
        # k-th progress line, then a random fraction of a step later (which can land inside a save).
        progress_lines, target = 0, rng.randint(1, 4)
        output = []
        for line in process.stdout:
            output.append(line)
            progress_lines += line.startswith("epoch ")
            if progress_lines == target:
                time.sleep(rng.uniform(0.0, 0.3))
                process.send_signal(signal.SIGKILL if attempt % 2 else signal.SIGTERM)
                break
        output.append(process.stdout.read())
        code = process.wait(timeout=120)
        assert code in (0, -signal.SIGKILL, 128 + signal.SIGTERM, -signal.SIGTERM), "".join(output)
        interrupted += code != 0
        if not (run / "checkpoints" / "LATEST").exists():  # killed before the first save: start again
            shutil.rmtree(run, ignore_errors=True)
    if not (run / "checkpoints" / "LATEST").exists():
        assert main([*argv, "--experiment", "killed"]) == 0
    else:
        assert main(["segment", "train", "--resume", str(run)]) == 0
    assert interrupted >= 2
    _assert_same_run(tmp_path / "straight", run)
