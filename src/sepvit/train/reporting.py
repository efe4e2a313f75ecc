"""What a person sees and what is kept: progress bar or lines, epoch summaries, CSV, TensorBoard."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any

from sepvit.train.checkpoint import write_atomically

CSV_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_val_loss",
    "ema_val_top1",
    "ema_val_top5",
    "lr",
    "epoch_seconds",
    "train_images_per_s",
)


def log(message: str) -> None:
    print(message, flush=True)


class Progress:
    """A tqdm bar on a terminal; plain lines every ``interval`` steps otherwise (CI, log files)."""

    def __init__(
        self, epoch: int, epochs: int, total_steps: int, start_step: int, interval: int, enabled: bool
    ) -> None:
        self.epoch, self.epochs, self.total = epoch, epochs, total_steps
        self.step = start_step
        self.interval = interval
        self.enabled = enabled
        self.start = time.perf_counter()
        self.images = 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
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
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def epoch_summary(row: dict[str, Any], epochs: int) -> str:
    line = (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} | val loss "
        f"{row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
    )
    if row.get("ema_val_top1") is not None:
        line += f" | EMA top-1 {row['ema_val_top1']:.2f}%"
    line += f" | lr {row['lr']:.2e} | {row['epoch_seconds']:.1f}s"
    if row["train_images_per_s"] is not None:
        line += f", {row['train_images_per_s']:.0f} img/s"
    return line


def write_csv(history: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_COLUMNS})
    text = buffer.getvalue()
    write_atomically({path: lambda temp: Path(temp).write_text(text)})


class TensorBoard:
    """Scalars per epoch and per logged step; does nothing when disabled."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def epoch(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key in CSV_COLUMNS[1:]:
            if row.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", row[key], row["epoch"])
        self.writer.flush()

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
