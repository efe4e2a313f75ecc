"""One training run of a task in this process (one of a torchrun job): set up, train, summarise."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from sepvit.engine.checkpoint import BEST, LAST, LAST_EMA, weights_path
from sepvit.engine.distributed import init_distributed, shutdown
from sepvit.engine.loop import RunResult, Task, Trainer
from sepvit.engine.reporting import log


def _metric(values: dict, name: str) -> str:
    value = values.get(name)
    return "n/a" if value is None else f"{value:.4g}"


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


def print_json(document: dict[str, Any]) -> None:
    print(json.dumps(document, indent=2, default=str), flush=True)


def run_training(
    task: Task, resume_dir: Path | None = None, as_json: bool = False
) -> tuple[int, RunResult | None]:
    """Train ``task``; returns the exit code and, on rank 0, the run's result.

    Exit code 0 when the run finished, 128 + N when signal N stopped it (a checkpoint was saved);
    errors propagate as the library's exceptions. ``as_json``: the log goes to standard error and
    rank 0 prints :func:`run_summary` as JSON on standard output.
    """
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        code, result = _train(task, resume_dir)
    if as_json and result is not None:
        print_json(run_summary(result))
    return code, result


def _train(task: Task, resume_dir: Path | None) -> tuple[int, RunResult | None]:
    context = init_distributed(task.config.device)
    try:
        result = Trainer(task.config, task, context, resume_dir=resume_dir).run()
    finally:
        shutdown(context)
    if result.interrupted_by:
        signum = getattr(signal, result.interrupted_by, None)
        return (128 + int(signum) if signum is not None else 1), result if context.is_main else None
    if not context.is_main:
        return 0, None
    if result.best:
        metric, last = result.best["metric"], result.history[-1]
        log(
            f"best checkpoint: {weights_path(result.run_dir, BEST)} ({metric} {result.best['value']:.4g}, "
            f"epoch {result.best['epoch']}, {result.best['weights']} weights)"
        )
        shown = _metric(last, f"val_{metric}")
        log(f"last checkpoint: {weights_path(result.run_dir, LAST)} ({metric} {shown})")
        if last.get(f"ema_val_{metric}") is not None:
            log(
                f"last EMA checkpoint: {weights_path(result.run_dir, LAST_EMA)} "
                f"({metric} {_metric(last, 'ema_val_' + metric)})"
            )
        plots = ", ".join(str(path) for path in result.plots) or "none"
        log(f"metrics: {result.run_dir / 'metrics.csv'}; plots: {plots}")
    return 0, result
