"""`sepvit detect|segment train` under torchrun: two CPU processes (gloo) train one model in step,
and only rank 0 writes the run folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sepvit.dense import synthetic
from sepvit.dense.detection import build_detection_model
from sepvit.dense.segmentation import build_segmentation_model
from sepvit.engine.checkpoint import read_checkpoint

# `python -m sepvit ARGS` in each process, recording the files this process puts in place (every
# write of the engine ends in an os.replace) and keeping its final weights (only rank 0 writes the
# run folder itself). With NAN_ON_RANK set, that process's second training loss is made NaN.
WORKER = """
import json, os, sys
from safetensors.torch import save_file
from sepvit.cli import main
from sepvit.dense.tasks import DenseTask
from sepvit.utils import files
from sepvit.engine.loop import Trainer

keep, rank, written = sys.argv[1], os.environ["RANK"], []
replace, run, loss, calls = os.replace, Trainer.run, DenseTask.loss, []


def recording_replace(source, target):
    written.append(os.path.basename(target))
    return replace(source, target)


def run_and_keep(trainer):
    result = run(trainer)
    state = {key: value.detach().contiguous() for key, value in trainer.model.state_dict().items()}
    save_file(state, f"{keep}/rank{rank}.safetensors")
    return result


def poisoned_loss(task, *args):
    total, parts = loss(task, *args)
    calls.append(1)
    if os.environ.get("NAN_ON_RANK") == rank and len(calls) == 2:
        total = total * float("nan")
    return total, parts


files.os.replace, Trainer.run, DenseTask.loss = recording_replace, run_and_keep, poisoned_loss
try:
    code = main(sys.argv[2:])
finally:
    with open(f"{keep}/written{rank}.json", "w") as file:
        json.dump(written, file)
sys.exit(code)
"""

RUN_FILES = sorted(
    [
        "best.safetensors",
        "checkpoints",
        "config.yaml",
        "last.safetensors",
        "loss.png",
        "metrics.csv",
        "metrics.png",
    ]
)
WRITTEN = {"config.yaml", "last.safetensors", "best.safetensors", "state.pt", "LATEST", "metrics.csv"}
WRITTEN |= {"loss.png", "metrics.png"}
SEGMENT = ["segment", "train", "--head", "fpn", "--crop-size", "64", "--head-channels", "16"]
DETECT = ["detect", "train", "--min-size", "64", "--max-size", "64", "--fpn-channels", "16"]
# Mask R-CNN covers the whole detection path (RetinaNet's differs only in the model it builds).
COMMANDS = {
    "segment-fpn": (SEGMENT, "val_mIoU"),
    "detect-maskrcnn": ([*DETECT, "--arch", "maskrcnn"], "val_segm_AP"),
}


def _launch(tmp_path: Path, command: list[str], env: dict[str, str] | None = None):
    """Run ``command`` in 2 processes on 8 training images, 2 per process and step: 2 steps an epoch."""
    if command[0] == "detect":
        data = synthetic.write_coco(tmp_path / "data", num_train=8, num_val=2, size=64, seed=4)
        command = [*command, "--train-split", "train", "--val-split", "val"]
    else:
        data = synthetic.write_ade20k(tmp_path / "data", num_train=8, num_val=2, size=64, seed=4)
    run, keep = tmp_path / "runs" / "run", tmp_path / "ranks"
    keep.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    argv = [*command, "--data", str(data), "--model", "sepvit_lite", "--epochs", "1"]
    argv += ["--batch-size", "2", "--warmup-steps", "1", "--workers", "0", "--seed", "0", "--no-tensorboard"]
    argv += ["--output", str(run.parent), "--experiment", run.name]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if env:  # a process that fails gets a second to report before torchrun ends the others
        launcher.append("--monitor-interval=1")
    result = subprocess.run(
        [*launcher, str(worker), str(keep), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    return result, run, keep


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_two_processes_train_in_step_and_rank_zero_writes(tmp_path: Path, name: str) -> None:
    command, metric = COMMANDS[name]
    result, run, keep = _launch(tmp_path, command)
    assert result.returncode == 0, result.stdout + result.stderr

    # Each process trained on its half of the 8 images; only rank 0 reported.
    assert "epoch 1/1 step 2/2" in result.stdout
    assert result.stdout.count("epoch 1/1:") == 1 and result.stdout.count("final:") == 1
    # Rank 0 wrote every file of the run folder; rank 1 wrote nothing.
    assert set(json.loads((keep / "written0.json").read_text())) == WRITTEN
    assert json.loads((keep / "written1.json").read_text()) == []
    assert sorted(path.name for path in run.iterdir()) == RUN_FILES
    with open(run / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 1 and rows[0]["epoch"] == "1" and metric in rows[0]
    assert float(rows[0]["train_loss"]) > 0

    # DDP kept the processes in step: identical weights, and they are the ones saved.
    rank0, rank1 = load_file(keep / "rank0.safetensors"), load_file(keep / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    saved, info = read_checkpoint(run / "last.safetensors")
    assert info.progress["epoch"] == 1 and all(torch.equal(saved[key], rank0[key]) for key in rank0)
    # They are the seeded initialisation (--seed 0) after two small AdamW steps (lr ≤ 1e-4).
    torch.manual_seed(0)
    build = build_detection_model if command[0] == "detect" else build_segmentation_model
    initial = build(info).state_dict()
    change = {key: float((rank0[key].double() - initial[key].double()).abs().max()) for key in rank0}
    assert min(change.values()) > 0 and max(change.values()) < 2e-4, change


@pytest.mark.slow
def test_a_non_finite_loss_in_one_process_stops_both(tmp_path: Path) -> None:
    result, run, keep = _launch(tmp_path, SEGMENT, env={"NAN_ON_RANK": "1"})
    assert result.returncode != 0
    # Both stop at the same step with an error naming it (rank 0 is not left waiting for rank 1).
    assert "error: loss is nan at epoch 1, step 2" in result.stderr, result.stderr
    assert "error: another process's loss is not finite at epoch 1, step 2" in result.stderr, result.stderr
    assert json.loads((keep / "written0.json").read_text()) == ["config.yaml"]
    assert json.loads((keep / "written1.json").read_text()) == []
    assert sorted(path.name for path in run.iterdir()) == ["config.yaml"]
