"""What the training commands share: running a task with its log kept off a JSON standard output."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from sepvit.cli.options import print_json
from sepvit.engine.checkpoint import BEST, LAST, LAST_EMA, weights_path
from sepvit.engine.loop import RunResult, Task


def run_summary(result: RunResult) -> dict[str, Any]:
    """What a run ended with (``--json``): its folder, epochs, best and last metrics, weights files."""
    weights = {name: weights_path(result.run_dir, name) for name in (LAST, LAST_EMA, BEST)}
    return {
        "run_dir": str(result.run_dir),
        "epochs": len(result.history),
        "interrupted_by": result.interrupted_by,
        "best": result.best,
        "last": result.history[-1] if result.history else {},
        "weights": {name: str(path) for name, path in weights.items() if path.exists()},
    }


def train(task: Task, resume_dir: Path | None, as_json: bool) -> tuple[int, RunResult | None]:
    """Train ``task``: (exit code, the result on rank 0). ``as_json``: the log goes to standard error
    and rank 0 prints :func:`run_summary` as JSON on standard output."""
    from sepvit.runs import run_training

    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        code, result = run_training(task, resume_dir)
    if as_json and result is not None:
        print_json(run_summary(result))
    return code, result
