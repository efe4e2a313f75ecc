"""Runs of every task: training one to an outcome, and loading a trained one from its checkpoint,
which evaluation, prediction, export, explanation and the accuracy benchmarks start from."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from torch import nn

from sepvit.engine import checkpoint as ckpt
from sepvit.engine.description import RunDescription
from sepvit.engine.loop import RunResult, Task
from sepvit.engine.run import train
from sepvit.errors import CheckpointError
from sepvit.models import create_model


def run_training(task: Task, resume_dir: Path | None = None) -> tuple[int, RunResult | None]:
    """Train ``task``: its status and, on rank 0, its result. The status is what a process that ran
    it exits with: 0 when it finished, 128 + N when signal N stopped it (a checkpoint was saved)."""
    result = train(task, resume_dir)
    status = 0
    if result.interrupted_by:
        signum = getattr(signal, result.interrupted_by, None)
        status = 128 + int(signum) if signum is not None else 1
    return status, result if result.main_process else None


def build_model(description: RunDescription) -> nn.Module:
    """The model ``description`` specifies, with fresh weights."""
    if description.task == "detect":
        from sepvit.dense.detection import build_detection_model

        return build_detection_model(description)
    if description.task == "segment":
        from sepvit.dense.segmentation import build_segmentation_model

        return build_segmentation_model(description)
    try:
        return create_model(description.model, **description.model_kwargs)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"its model {description.model} cannot be built from the options it records "
            f"({' '.join(str(error).split())})"
        ) from error


def load_run(path: str | os.PathLike, task: str | None = None) -> tuple[nn.Module, RunDescription]:
    """The eval-mode model of a checkpoint a sepvit run wrote (of ``task``, if given), with its
    weights, and the run's description. Raises :class:`~sepvit.errors.CheckpointError` for a
    checkpoint that is not one, is not finite or does not fit the model it names."""
    state_dict, description = ckpt.read_checkpoint(path, task)
    ckpt.check_finite(state_dict, f"checkpoint {path}")
    try:
        model = build_model(description)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    ckpt.load_strict(model, state_dict, str(path))
    return model.eval(), description
