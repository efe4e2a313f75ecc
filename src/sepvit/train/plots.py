"""PNG plots: loss and accuracy curves of a run, and a confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    from sepvit.train.checkpoint import write_atomically

    write_atomically({path: lambda temp: figure.savefig(temp, dpi=120, format="png")})
    return path


def plot_curves(history: Sequence[dict], run_dir: Path) -> list[Path]:
    """``loss.png`` (train and validation loss) and ``accuracy.png`` (validation top-1/top-5)."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    paths = []
    panels = {
        "loss.png": (
            "loss",
            [("train_loss", "train"), ("val_loss", "validation"), ("ema_val_loss", "validation (EMA)")],
        ),
        "accuracy.png": (
            "accuracy (%)",
            [("val_top1", "top-1"), ("val_top5", "top-5"), ("ema_val_top1", "top-1 (EMA)")],
        ),
    }
    for filename, (ylabel, series) in panels.items():
        figure, axis = plt.subplots(figsize=(6, 4))
        for key, label in series:
            values = [row.get(key) for row in history]
            if any(value is not None for value in values):
                axis.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        paths.append(_save(figure, run_dir / filename))
        plt.close(figure)
    return paths


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Counts of (true class, predicted class), annotated when there are few classes."""
    plt = _pyplot()
    size = max(4.0, 0.45 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(classes))
    axis.set_xticks(ticks, classes, rotation=90 if len(classes) > 10 else 0)
    axis.set_yticks(ticks, classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(classes) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            axis.text(
                col,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if count > threshold else "black",
            )
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
    return path
