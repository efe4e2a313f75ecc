"""One training run of a task in this process (one of a torchrun job): set up, train, summarise."""

from __future__ import annotations

from pathlib import Path

from sepvit.engine.checkpoint import BEST, LAST, LAST_EMA, weights_path
from sepvit.engine.distributed import init_distributed, shutdown
from sepvit.engine.loop import RunResult, Task, Trainer
from sepvit.engine.reporting import log


def _metric(values: dict, name: str) -> str:
    value = values.get(name)
    return "n/a" if value is None else f"{value:.4g}"


def train(task: Task, resume_dir: Path | None = None) -> RunResult:
    """Train ``task`` in this process (every process of a torchrun job calls it); errors propagate as
    the library's exceptions. A run stopped by SIGINT or SIGTERM saves first and returns, naming the
    signal (``interrupted_by``); a finished run tells on rank 0 where its weights are."""
    context = init_distributed(task.config.device)
    try:
        result = Trainer(task.config, task, context, resume_dir=resume_dir).run()
    finally:
        shutdown(context)
    if result.main_process and not result.interrupted_by:
        _log_outcome(result)
    return result


def _log_outcome(result: RunResult) -> None:
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
