"""One training run of a task in this process (one of a torchrun job): set up, train, summarise."""

from __future__ import annotations

import signal
from pathlib import Path

from sepvit.engine.checkpoint import BEST, LAST, LAST_EMA, weights_path
from sepvit.engine.distributed import init_distributed, shutdown
from sepvit.engine.loop import RunResult, Task, Trainer
from sepvit.engine.reporting import log


def _metric(values: dict, name: str) -> str:
    value = values.get(name)
    return "n/a" if value is None else f"{value:.4g}"


def run_training(task: Task, resume_dir: Path | None = None) -> tuple[int, RunResult | None]:
    """Train ``task``; returns the run's status and, on rank 0, its result.

    The status is 0 when the run finished and 128 + N when signal N stopped it (a checkpoint was
    saved), as a shell reports a process stopped by a signal; errors propagate as the library's
    exceptions.
    """
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
