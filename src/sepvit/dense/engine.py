"""The dense-prediction training loop: schedules, checkpoints, resume, CSV/PNG logs and DDP."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sepvit.train.checkpoint import write_atomically
from sepvit.train.distributed import DistContext, all_reduce, any_process, barrier
from sepvit.train.reporting import Progress


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not belong to this run)."""


@dataclass
class Recipe:
    """Optimiser and schedule. ``schedule`` is 'step' (×``gamma`` at each epoch of ``milestones``,
    mmdetection's 1× schedule) or 'poly' (``(1 - t) ** power``, mmsegmentation); both start with a
    linear warm-up over ``warmup_iters`` iterations from ``warmup_ratio × lr``."""

    epochs: int = 12
    lr: float = 1e-4
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    power: float = 1.0
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    clip_grad: float | None = None


def lr_factor(recipe: Recipe, iteration: int, iters_per_epoch: int) -> float:
    """The learning-rate multiplier at a global ``iteration`` (0-based)."""
    if recipe.schedule == "step":
        epoch = iteration // iters_per_epoch
        factor = recipe.gamma ** sum(epoch >= m for m in recipe.milestones)
    elif recipe.schedule == "poly":
        total = recipe.epochs * iters_per_epoch
        factor = (1 - min(iteration, total) / total) ** recipe.power
    else:
        raise ValueError(f"unknown schedule {recipe.schedule!r}")
    if iteration < recipe.warmup_iters:
        progress = iteration / recipe.warmup_iters
        factor *= recipe.warmup_ratio + (1 - recipe.warmup_ratio) * progress
    return factor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norms and whatever a submodule's ``no_weight_decay()`` names
    (SepViT's window tokens)."""
    exempt = set()
    for prefix, module in model.named_modules():
        if module is not model and callable(getattr(module, "no_weight_decay", None)):
            exempt |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    write_atomically({path: write})


def save_weights(model: nn.Module, path: Path, config: dict, epoch: int) -> None:
    """Model weights as safetensors, with the config needed to rebuild the model in the metadata."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"config": json.dumps(config), "epoch": str(epoch)}
    _atomic_write(path, lambda name: save_file(state, name, metadata=metadata))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(state dict, config, epoch) of a checkpoint written by ``save_weights``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        state = load_file(str(path))
    except Exception as error:  # safetensors raises several types for broken files
        raise TrainingError(f"cannot read checkpoint {path}: {error}") from error
    if "config" not in metadata:
        raise TrainingError(f"{path} is not a detection/segmentation checkpoint of sepvit (no config in it)")
    return state, json.loads(metadata["config"]), int(metadata.get("epoch", 0))


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(name: str) -> None:
        with open(name, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(path, write)


def plot_metrics(path: Path, rows: list[dict], metric_names: Iterable[str]) -> None:
    """Training losses and evaluation metrics against epochs, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key in rows[-1]:
        if key.startswith("train_"):
            loss_axis.plot(epochs, [row.get(key, math.nan) for row in rows], marker="o", label=key[6:])
    loss_axis.set(xlabel="epoch", ylabel="training loss", yscale="log")
    loss_axis.legend()
    for key in metric_names:
        metric_axis.plot(epochs, [row.get(key, math.nan) for row in rows], marker="o", label=key)
    metric_axis.set(xlabel="epoch", ylabel="validation")
    metric_axis.legend()
    figure.tight_layout()
    _atomic_write(path, lambda name: figure.savefig(name, format="png", dpi=100))
    plt.close(figure)


@dataclass
class Trainer:
    """Trains ``model`` (which returns a dict of losses), evaluates after each epoch on rank 0,
    and keeps ``last`` and ``best`` checkpoints in ``output_dir``.

    ``compute_losses(model, batch, device)`` returns the loss dict; ``evaluate(model)`` returns
    metrics (``primary_metric`` picks the best checkpoint). ``config`` goes into every checkpoint.
    """

    model: nn.Module
    train_loader: torch.utils.data.DataLoader
    compute_losses: Callable
    evaluate: Callable[[nn.Module], dict[str, float]]
    recipe: Recipe
    output_dir: Path
    config: dict
    primary_metric: str
    context: DistContext = field(default_factory=lambda: DistContext(0, 1, 0, torch.device("cpu")))
    log_every: int = 20

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.model.to(self.context.device)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, self.recipe.weight_decay), lr=self.recipe.lr
        )
        iters = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(self.recipe, step, iters)
        )
        self.network = self.model
        if self.context.world_size > 1:
            device_ids = [self.context.local_rank] if self.context.device.type == "cuda" else None
            self.network = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.start_epoch, self.best, self.rows = 0, -math.inf, []

    @property
    def paths(self) -> dict[str, Path]:
        out = self.output_dir
        return {
            "last": out / "last.safetensors",
            "best": out / "best.safetensors",
            "state": out / "last_state.pt",
            "csv": out / "metrics.csv",
            "plot": out / "metrics.png",
            "config": out / "config.json",
        }

    def resume(self) -> None:
        """Continue from ``last.safetensors`` + ``last_state.pt`` in ``output_dir``."""
        paths = self.paths
        if not paths["state"].is_file():
            raise TrainingError(f"nothing to resume in {self.output_dir}: {paths['state'].name} is missing")
        weights, config, epoch = read_weights(paths["last"])
        if config != self.config:
            changed = sorted(k for k in set(config) | set(self.config) if config.get(k) != self.config.get(k))
            raise TrainingError(
                f"cannot resume {self.output_dir}: its settings differ in {', '.join(changed)}"
            )
        state = torch.load(paths["state"], map_location="cpu", weights_only=True)
        if state["epoch"] != epoch:
            raise TrainingError(
                f"{paths['state']} (epoch {state['epoch']}) does not match {paths['last']} ({epoch})"
            )
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.best = epoch, state["best"]
        self.rows = [r for r in state["rows"] if r["epoch"] <= epoch]
        if self.context.is_main:
            print(f"resumed from epoch {epoch} of {self.recipe.epochs} in {self.output_dir}", flush=True)

    def _save(self, epoch: int, metrics: dict[str, float]) -> None:
        paths = self.paths
        score = metrics.get(self.primary_metric, -math.inf)
        if score > self.best:
            self.best = score
            save_weights(self.model, paths["best"], self.config, epoch)
        save_weights(self.model, paths["last"], self.config, epoch)
        state = {
            "epoch": epoch,
            "best": self.best,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rows": self.rows,
        }
        _atomic_write(paths["state"], lambda name: torch.save(state, name))
        write_csv(paths["csv"], self.rows)
        plot_metrics(
            paths["plot"], self.rows, [k for k in metrics if k == self.primary_metric or "AP" in k][:6]
        )

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.network.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        totals: dict[str, float] = {}
        steps = len(self.train_loader)
        progress = Progress(epoch + 1, self.recipe.epochs, steps, 0, self.log_every, self.context.is_main)
        world_size = self.context.world_size
        for step, batch in enumerate(self.train_loader):
            losses = self.compute_losses(self.network, batch, self.context.device)
            loss = sum(losses.values())
            # Every process must stop at the same step, or the others would wait in the next all-reduce.
            finite = bool(torch.isfinite(loss))
            if any_process(not finite, self.context):
                where = f"at epoch {epoch + 1}, step {step + 1}"
                cause = (
                    f"another process's loss is not finite {where}"
                    if finite
                    else f"loss is {loss.item()} {where} "
                    f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())})"
                )
                raise TrainingError(f"{cause}; the last good checkpoint is kept in {self.output_dir}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.recipe.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad)
            self.optimizer.step()
            self.scheduler.step()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.item()
            totals["loss"] = totals.get("loss", 0.0) + loss.item()
            progress.update(
                len(batch[0]) * world_size, totals["loss"] / (step + 1), self.scheduler.get_last_lr()[0]
            )
        progress.close()
        # The logged losses are means over all processes' batches.
        summed = all_reduce(list(totals.values()), self.context)
        return {f"train_{k}": v / max(1, steps * world_size) for k, v in zip(totals, summed)}

    def fit(self) -> dict[str, float]:
        """Train the remaining epochs; returns the last evaluation's metrics."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.context.is_main:
            config_text = json.dumps({"config": self.config, "recipe": asdict(self.recipe)}, indent=2)
            _atomic_write(self.paths["config"], lambda name: Path(name).write_text(config_text))
        metrics: dict[str, float] = {}
        for epoch in range(self.start_epoch, self.recipe.epochs):
            started = time.perf_counter()
            train_stats = self._train_epoch(epoch)
            if self.context.is_main:
                metrics = self.evaluate(self.model)
                row = {"epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0], **train_stats, **metrics}
                row["seconds"] = round(time.perf_counter() - started, 1)
                self.rows.append(row)
                self._save(epoch + 1, metrics)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                print(
                    f"epoch {epoch + 1}/{self.recipe.epochs}: loss {train_stats['train_loss']:.4f}; {shown}",
                    flush=True,
                )
            barrier(self.context)
        return metrics
