"""What a person sees and what a run keeps: progress, epoch lines, metrics.csv, TensorBoard, plots."""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sepvit.utils.extras import require
from sepvit.utils.files import WRITE_ERRORS, reason, write_text
from sepvit.utils.plots import pyplot, save_figure

# Columns every task's metrics.csv starts and ends with; the task's own metrics go in between.
LEADING_COLUMNS = ("epoch",)
TRAILING_COLUMNS = ("lr", "epoch_seconds", "train_images_per_s")


def log(message: str) -> None:
    print(message, flush=True)


class Progress:
    """A tqdm bar on a terminal; plain lines every ``interval`` steps otherwise (CI, log files)."""

    def __init__(
        self,
        epoch: int,
        epochs: int,
        total_steps: int,
        start_step: int,
        interval: int,
        enabled: bool,
        processes: int = 1,
    ) -> None:
        self.epoch, self.epochs, self.total = epoch, epochs, total_steps
        self.processes = processes
        self.step = start_step
        self.interval = interval
        self.enabled = enabled
        self.start = time.perf_counter()
        self.images = 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = require("tqdm", "train").tqdm(
                total=total_steps,
                initial=start_step,
                desc=f"epoch {epoch}/{epochs}",
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )

    def update(self, images: int, loss: float, lr: float) -> None:
        self.step += 1
        self.images += images
        if not self.enabled:
            return
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
            self.bar.update(1)
        elif self.step % self.interval == 0 or self.step == self.total:
            log(
                f"epoch {self.epoch}/{self.epochs} step {self.step}/{self.total} "
                f"loss {loss:.4f} lr {lr:.2e} {rate:.0f} img/s"
                + (f" ({rate / self.processes:.0f} per process)" if self.processes > 1 else "")
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def epoch_summary(row: dict[str, Any], epochs: int, metric_names: Sequence[str]) -> str:
    """``epoch 3/10: train loss 0.41 | val loss 0.30 top1 92.1 | EMA top1 92.5 | lr 1e-3 | 4.2s``."""
    parts = [f"epoch {row['epoch']}/{epochs}: train loss {_number(row['train_loss'])}"]
    for prefix, title in (("val_", "val"), ("ema_val_", "EMA")):
        shown = [
            f"{name} {_number(row[prefix + name])}"
            for name in metric_names
            if row.get(prefix + name) is not None
        ]
        if shown:
            parts.append(f"{title} " + " ".join(shown))
    timing = f"lr {row['lr']:.2e} | {row['epoch_seconds']:.1f}s"
    if row.get("train_images_per_s") is not None:
        timing += f", {row['train_images_per_s']:.0f} img/s"
    return " | ".join([*parts, timing])


def csv_columns(history: Sequence[dict[str, Any]]) -> list[str]:
    seen = dict.fromkeys(key for row in history for key in row)
    middle = [key for key in seen if key not in LEADING_COLUMNS + TRAILING_COLUMNS]
    return [*LEADING_COLUMNS, *middle, *TRAILING_COLUMNS]


def write_csv(history: Sequence[dict[str, Any]], path: Path) -> None:
    columns = csv_columns(history)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    write_text(path, buffer.getvalue())


class TensorBoard:
    """Scalars per epoch and per logged step; does nothing when disabled."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            self.writer = require("torch.utils.tensorboard", "train").SummaryWriter(str(log_dir))

    def epoch(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: Sequence[dict[str, Any]], run_dir: Path, metric_names: Sequence[str]) -> list[Path]:
    """``loss.png`` (training and validation losses) and ``metrics.png`` (the validation metrics)."""
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    columns = csv_columns(history)
    panels = {
        "loss.png": ("loss", [key for key in columns if key.endswith("loss")]),
        "metrics.png": (
            "validation",
            [f"{prefix}{name}" for prefix in ("val_", "ema_val_") for name in metric_names if name != "loss"],
        ),
    }
    paths = []
    for filename, (ylabel, keys) in panels.items():
        figure, axis = plt.subplots(figsize=(6, 4))
        for key in keys:
            # Epochs that were not validated have no value: plotted points are joined across them.
            points = [(epoch, row[key]) for epoch, row in zip(epochs, history) if row.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=key)
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
        figure.tight_layout()
        paths.append(save_figure(figure, run_dir / filename))
        plt.close(figure)
    return paths


def try_plot_curves(
    history: Sequence[dict[str, Any]], run_dir: Path, metric_names: Sequence[str]
) -> list[Path]:
    """Plots are a convenience: a failure to write them is reported, not fatal."""
    from sepvit.errors import TrainingError

    try:
        return plot_curves(history, run_dir, metric_names)
    except (TrainingError, *WRITE_ERRORS) as error:
        log(f"warning: plots not written: {reason(error)}")
        return []
