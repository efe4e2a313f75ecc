"""The training loop every task runs: set-up, resume, epochs, checkpoints, signals, reporting.

A task (classification, detection, segmentation) plugs in through :class:`Task`: it loads its
data, builds its model, computes its losses and evaluates; the engine does the rest the same way
for every task: AdamW (or any timm optimizer) and a timm schedule, gradient accumulation, mixed
precision, EMA weights, gradient clipping, DDP, a stop on SIGINT/SIGTERM that saves first,
bit-exact resume (also mid-epoch), a NaN guard that never saves or recommends non-finite weights
or results, and one run folder: ``config.yaml``, ``checkpoints/`` (see
:mod:`sepvit.engine.checkpoint`), ``last.safetensors``, ``last_ema.safetensors``,
``best.safetensors``, ``metrics.csv``, ``loss.png``, ``metrics.png`` and ``tensorboard/``.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from sepvit.engine import checkpoint as ckpt
from sepvit.engine.config import AUTO, TrainConfig
from sepvit.engine.data import SeededItems, ShardedSampler, make_loader, one_line
from sepvit.engine.description import RunDescription
from sepvit.engine.distributed import DistContext, all_reduce, any_process, from_main, gather
from sepvit.engine.optim import amp_dtype, autocast, build_optimizer, build_scheduler
from sepvit.engine.reporting import Progress, TensorBoard, epoch_summary, log, try_plot_curves, write_csv
from sepvit.engine.run_folder import new_run_folder
from sepvit.engine.shards import ShardStream
from sepvit.errors import CheckpointError, ConfigError, DataError, SepViTError, TrainingError
from sepvit.utils.extras import require
from sepvit.utils.files import make_folder, write_text


@dataclass(frozen=True)
class TaskKind:
    """What names a task: ``name`` ("classify", ...), the ``command`` that trains it, the metrics its
    evaluation returns (``primary`` first: higher is better, it picks best.safetensors) and the
    options that define a run (a resume refuses other values for them)."""

    name: str
    command: str
    metrics: tuple[str, ...]
    run_defining: tuple[str, ...]

    @property
    def primary(self) -> str:
        return self.metrics[0]


class Task(abc.ABC):
    """What a task gives the engine. ``setup`` runs after the engine has seeded the generators."""

    kind: ClassVar[TaskKind]
    model: nn.Module
    train_set: Dataset  # map-style, or a ShardStream that orders and seeds itself
    collate_fn: Callable | None = None
    lr_rule: str = ""  # how ``resolve`` derived the learning rate, for the start-up line

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.metric_names = self.kind.metrics  # a task may narrow them once set up

    def resolve(self, config: TrainConfig, world_size: int) -> TrainConfig:
        """Fill the options left at ``auto``; the engine fills ``workers``."""
        return config

    @property
    def data_name(self) -> str:
        """The data's short name, part of a new run folder's name."""
        return Path(str(getattr(self.config, "data", "data"))).name

    @abc.abstractmethod
    def setup(self, context: DistContext) -> None:
        """Load the data, build ``self.model`` and ``self.train_set``; log what was loaded."""

    @abc.abstractmethod
    def loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise and its named parts (floats) for one batch."""

    @abc.abstractmethod
    def evaluate(
        self, model: nn.Module, context: DistContext, dtype: torch.dtype | None
    ) -> dict[str, float] | None:
        """Validation metrics; processes other than rank 0 may return None (rank 0's are used)."""

    @abc.abstractmethod
    def describe(self) -> RunDescription:
        """What rebuilds the model from a checkpoint (stored in every weights file)."""

    def batch_images(self, batch: Any) -> int:
        return len(batch[0])


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any] = field(default_factory=dict)
    interrupted_by: str | None = None  # the signal that stopped the run (after saving), if any
    plots: list[Path] = field(default_factory=list)
    main_process: bool = True  # rank 0 of a torchrun job, which writes the run folder and reports


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors and plain values, so ``torch.load(weights_only=True)`` reads them back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current optimizer step and save."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # asked twice: stop waiting for the step to finish
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        log(f"{self.signal_name} received: stopping after this step and saving a checkpoint")

    def request(self, name: str = "request") -> None:
        self.signal_name = name

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def fill_workers(config: TrainConfig, world_size: int) -> TrainConfig:
    if config.workers != AUTO:
        return config
    cores = os.cpu_count() or 1
    return config.replace(workers=0 if cores <= 2 else min(8, max(0, cores // world_size - 1)))


def _finite(values: dict[str, float] | None) -> bool:
    return values is not None and all(math.isfinite(v) for v in values.values() if isinstance(v, float))


def _weights_finite(module: nn.Module) -> bool:
    return all(bool(t.isfinite().all()) for t in module.state_dict().values() if t.is_floating_point())


class Trainer:
    """One training run of ``task``; every process of a torchrun job builds one."""

    def __init__(
        self,
        config: TrainConfig,
        task: Task,
        context: DistContext,
        resume_dir: Path | None = None,
        step_hook: Callable[[Trainer], None] | None = None,
    ) -> None:
        self.context = context
        self.task = task
        self.config = config = fill_workers(task.resolve(config, context.world_size), context.world_size)
        task.config = config
        for name in ("lr", "weight_decay", "warmup_epochs", "drop_path", "clip_grad"):
            if getattr(config, name) == AUTO or (name == "lr" and config.lr is None):
                raise ConfigError(
                    f"--{name.replace('_', '-')} was not resolved for the {task.kind.name} task"
                )
        self.step_hook = step_hook
        self.stop = StopRequest()
        self.resume_dir = resume_dir
        self.run_dir = resume_dir or self._new_run_dir()
        self.checkpoints = ckpt.RunCheckpoints(self.run_dir)
        if config.sync_bn and context.distributed and context.device.type == "cpu":
            raise ConfigError("--sync-bn needs GPUs: PyTorch synchronises BatchNorm only on accelerators")
        seed_everything(config.seed)
        task.setup(context)
        self.model = self._placed_model()
        self.train_loader = self._train_loader()
        self._build_optimisation()

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimizer steps completed in the current epoch
        self.partial: dict[str, float] = {}  # sums of losses × images, and images, this epoch so far
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.saved_at: tuple[int, int] | None = None  # (epoch, step) of the latest checkpoint
        # Each process draws its own augmentation noise (drop path, mixup); timm offsets by rank too.
        seed_everything(config.seed + context.rank)
        if resume_dir:
            self._resume()
        self.scheduler.step_update(num_updates=self.global_step)

    def _placed_model(self) -> nn.Module:
        """The task's model on the device, synchronised BatchNorm and memory format as configured."""
        config, context = self.config, self.context
        model = self.task.model.to(context.device)
        if config.sync_bn and context.distributed:
            from timm.layers import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)  # same parameters, synchronised statistics
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _train_loader(self) -> torch.utils.data.DataLoader:
        """This process's batches of the (limited) training set; sets the steps per epoch."""
        config, context, task = self.config, self.context, self.task
        train_set = task.train_set
        streamed = isinstance(train_set, ShardStream)
        if config.limit_train is not None:
            count = min(config.limit_train, len(train_set))
            train_set = train_set.first(count) if streamed else Subset(train_set, range(count))
            if context.is_main:
                log(f"train: the first {len(train_set)} images (--limit-train)")
        self.global_batch = config.batch_size * context.world_size
        self.updates_per_epoch = len(train_set) // self.global_batch // config.accum_steps
        if self.updates_per_epoch == 0:
            raise ConfigError(
                f"{len(train_set)} training images make no full step of {self.global_batch} images × "
                f"{config.accum_steps} accumulation steps; lower --batch-size or --accum-steps"
            )
        if streamed:
            batches = self.updates_per_epoch * config.accum_steps
            train_set.configure(context.rank, context.world_size, config.workers, config.batch_size, batches)
            self.train_data = self.train_order = train_set
            sampler = None
        else:
            self.train_data = SeededItems(train_set, seed=config.seed)
            self.train_order = sampler = ShardedSampler(
                len(train_set), context.rank, context.world_size, True, config.seed, self.global_batch
            )
        return make_loader(
            self.train_data,
            sampler,
            config.batch_size,
            config.workers,
            drop_last=True,
            pin_memory=context.device.type == "cuda",
            collate_fn=task.collate_fn,
        )

    def _build_optimisation(self) -> None:
        """EMA, optimizer, schedule, mixed precision, and the model as trained (DDP, compiled)."""
        config, context = self.config, self.context
        self.ema = None
        if config.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(
                self.model, decay=config.ema_decay, use_warmup=True, warmup_power=config.ema_warmup_power
            )
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.updates_per_epoch)
        self.dtype = amp_dtype(config.amp, context.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.train_model: nn.Module = self.model
        if context.distributed:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.train_model = torch.compile(self.train_model)

    @property
    def global_step(self) -> int:
        return self.epoch * self.updates_per_epoch + self.step_in_epoch

    def _new_run_dir(self) -> Path:
        config = self.config
        name = config.experiment or (
            f"{self.task.kind.name}-{config.model}-{self.task.data_name}-{datetime.now():%Y%m%d-%H%M%S}"
        )
        return new_run_folder(config.output, name, clear=self.context.is_main)

    # -- checkpoints --------------------------------------------------------------------------
    def _info(self, weights: str, metrics: dict[str, float] | None) -> RunDescription:
        return self.task.describe().at(
            epoch=self.epoch, step_in_epoch=self.step_in_epoch, weights=weights, **(metrics or {})
        )

    def _kept(self) -> str:
        if self.saved_at is None:
            return "no checkpoint was written yet"
        last = ckpt.weights_path(self.run_dir, ckpt.LAST)
        return f"the last checkpoint, {last} (epoch {self.saved_at[0]}, step {self.saved_at[1]}), is kept"

    def _save(
        self,
        metrics: dict[str, float] | None = None,
        ema_metrics: dict[str, float] | None = None,
        best: tuple[nn.Module, str, dict[str, float]] | None = None,
    ) -> None:
        """Write a checkpoint set on rank 0; every process learns whether that worked."""
        self._check_weights()
        rng = gather(capture_rng(), self.context)
        partial = self._reduced_partial()
        error = ""
        if self.context.is_main:
            folder = self.checkpoints.next_folder(self.epoch, self.step_in_epoch)
            best_from = self.checkpoints.folder / self.best["folder"] if self.best.get("folder") else None
            if best is not None:
                self.best["folder"], best_from = folder.name, None
            state = {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "partial": partial,
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng,
                "history": self.history,
                "best": self.best,
                "data_layout": list(self.train_data.layout)
                if isinstance(self.train_data, ShardStream)
                else None,
            }
            weights = {ckpt.LAST: (self.model.state_dict(), self._info("model", metrics))}
            if self.ema is not None:
                weights[ckpt.LAST_EMA] = (self.ema.module.state_dict(), self._info("ema", ema_metrics))
            if best is not None:
                module, source, best_metrics = best
                weights[ckpt.BEST] = (module.state_dict(), self._info(source, best_metrics))
            try:
                self.checkpoints.save(folder, weights, state, best_from)
            except TrainingError as failure:
                error = str(failure)
        if any_process(bool(error), self.context):
            raise TrainingError(error or "rank 0 could not write the checkpoint; the previous one is kept")
        self.saved_at = (self.epoch, self.step_in_epoch)

    def _check_weights(self) -> None:
        """Stop, saving nothing, when the weights (model's or EMA's) hold a NaN or an infinity."""
        finite = _weights_finite(self.model) and (self.ema is None or _weights_finite(self.ema.module))
        if any_process(not finite, self.context):
            raise TrainingError(
                f"the weights became NaN or infinite in epoch {self.epoch + 1} (step {self.step_in_epoch}); "
                f"they were not saved and {self._kept()}. Try a lower --lr, --clip-grad or --amp none"
            )

    def _reduced_partial(self) -> dict[str, float]:
        keys = sorted(self.partial)
        return dict(zip(keys, all_reduce([self.partial[k] for k in keys], self.context)))

    def _resume(self) -> None:
        folder, weights, _, state = self.checkpoints.load()
        ckpt.load_strict(self.model, weights, str(ckpt.weights_path(folder, ckpt.LAST)))
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.module.load_state_dict(state["ema"])
        except (ValueError, RuntimeError, KeyError) as error:
            raise CheckpointError(f"{folder}: the training state does not fit this run ({error})") from error
        # The schedule is rebuilt from the configuration, not restored: --lr, --epochs, --weight-decay
        # given with --resume apply from here on.
        for group, values in zip(self.optimizer.param_groups, fresh):
            group.update(values)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if len(rng) != self.context.world_size and self.context.is_main:
            log(
                f"resuming with {self.context.world_size} processes instead of {len(rng)}: "
                "augmentation noise will differ from an uninterrupted run"
            )
        restore_rng(rng[self.context.rank % len(rng)])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.partial = (
            dict(state["partial"]) if self.context.is_main else dict.fromkeys(state["partial"], 0.0)
        )
        self.history, self.best = state["history"], state["best"]
        self.saved_at = (self.epoch, self.step_in_epoch)
        layout = state.get("data_layout")
        if self.step_in_epoch and layout and tuple(layout) != self.train_data.layout:
            raise ConfigError(
                f"--resume {self.run_dir}: the run stopped part-way through an epoch of shards read by "
                f"{layout[0]} process(es) with {layout[1]} loader stream(s) each; resume it with as many "
                f"processes and --workers {layout[1] if layout[1] > 1 else 0} to continue that epoch exactly"
            )
        if self.context.is_main:
            best_from = self.checkpoints.folder / self.best["folder"] if self.best.get("folder") else None
            removed = self.checkpoints.clean({folder, best_from or folder})
            self.checkpoints.publish(folder, best_from)
            if removed:
                log(f"removed {len(removed)} file(s) left by an interrupted save")
            log(f"resumed {self.run_dir} at epoch {self.epoch + 1}, step {self.step_in_epoch}")

    # -- the loop -----------------------------------------------------------------------------
    def _train_epoch(self) -> bool:
        """Train one epoch (or its rest); False if a stop was requested and the state saved."""
        config, context = self.config, self.context
        accum = config.accum_steps
        epoch = self.epoch + 1
        self.train_data.epoch = epoch
        self.train_order.set_epoch(epoch, skip_batches=self.step_in_epoch * accum)
        progress = Progress(
            epoch,
            config.epochs,
            self.updates_per_epoch,
            self.step_in_epoch,
            config.log_interval,
            context.is_main,
            context.world_size,
        )
        self.train_model.train()
        self.images_this_session = self.images_here = 0
        batches = iter(self.train_loader)
        try:
            while self.step_in_epoch < self.updates_per_epoch:
                window: dict[str, float] = {}
                finite = True
                for micro in range(accum):
                    batch = next(batches)
                    loss, parts, images = self._forward_backward(batch, sync=micro == accum - 1)
                    finite = finite and math.isfinite(loss)
                    for key, value in {"loss": loss, **parts}.items():
                        window[key] = window.get(key, 0.0) + value * images
                    window["images"] = window.get("images", 0.0) + images
                if any_process(not finite, context):
                    self._diverged(epoch, finite, window)
                self._optimizer_step()
                if self.ema is not None:
                    self.ema.update(self.model, step=self.global_step + 1)
                self.step_in_epoch += 1
                self.scheduler.step_update(num_updates=self.global_step)
                for key, value in window.items():
                    self.partial[key] = self.partial.get(key, 0.0) + value
                self.images_this_session += int(window["images"]) * context.world_size
                self.images_here += int(window["images"])
                lr = self.optimizer.param_groups[0]["lr"]
                progress.update(
                    int(window["images"]) * context.world_size, window["loss"] / window["images"], lr
                )
                if self.step_hook is not None:
                    self.step_hook(self)
                # Every process must agree, or one would wait for the others in the next collective.
                if any_process(bool(self.stop.signal_name), context):
                    self._save()
                    return False
        except DataError as error:  # from a loader worker it carries the worker's traceback
            self._save_before(DataError(one_line(error)))
        finally:
            progress.close()
        return True

    def _save_before(self, error: SepViTError) -> None:
        """Save the run where it is, then raise ``error`` with how to continue once it is fixed."""
        self._save()
        raise type(error)(
            f"{error}; the run was saved at epoch {self.epoch + 1}, step {self.step_in_epoch}: fix the "
            f"cause and continue with --resume {self.run_dir}"
        ) from error

    def _forward_backward(self, batch: Any, sync: bool) -> tuple[float, dict[str, float], int]:
        context = self.context
        no_sync = getattr(self.train_model, "no_sync", None)
        with no_sync() if no_sync is not None and not sync else contextlib.nullcontext():
            with autocast(context.device, self.dtype):
                loss, parts = self.task.loss(self.train_model, batch, context.device)
            scaled = loss.float() / self.config.accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.item(), parts, self.task.batch_images(batch)

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _diverged(self, epoch: int, finite_here: bool, window: dict[str, float]) -> None:
        where = f"at epoch {epoch}, step {self.step_in_epoch + 1}"
        if finite_here:
            cause = f"another process's loss is not finite {where}"
        else:
            images = max(window.get("images", 1.0), 1.0)
            parts = ", ".join(f"{k}={v / images:.4g}" for k, v in window.items() if k != "images")
            cause = f"loss is {window['loss'] / images} {where} ({parts})"
        raise TrainingError(
            f"{cause} (lr {self.optimizer.param_groups[0]['lr']:.2e}); stopped, {self._kept()}. "
            "Try a lower --lr, --clip-grad or --amp none"
        )

    def _evaluate(self, module: nn.Module) -> dict[str, float]:
        try:
            metrics = self.task.evaluate(module, self.context, self.dtype)
        except DataError as error:
            self._save_before(DataError(one_line(error)))
        return from_main(metrics, self.context)

    def _validates_now(self) -> bool:
        """Whether the epoch now ending is validated: every ``val_interval``-th one and the last."""
        finished = self.epoch + 1
        return finished % self.config.val_interval == 0 or finished == self.config.epochs

    def _end_epoch(self, seconds: float) -> None:
        self._check_weights()
        rates = gather(self.images_here / seconds, self.context)
        partial = self._reduced_partial()
        model_metrics = ema_metrics = None
        if self._validates_now():
            model_metrics = self._evaluate(self.model)
            ema_metrics = self._evaluate(self.ema.module) if self.ema is not None else None
        for source, values in (("model", model_metrics), ("EMA", ema_metrics)):
            if values is not None and not _finite(values):
                shown = ", ".join(f"{k} {v}" for k, v in values.items())
                raise TrainingError(
                    f"validation of the {source} weights after epoch {self.epoch + 1} is not finite "
                    f"({shown}); they were not saved and {self._kept()}. Try a lower --lr or --clip-grad"
                )
        self.epoch += 1
        self.step_in_epoch = 0
        images = max(partial.pop("images", 0.0), 1.0)
        row: dict[str, Any] = {"epoch": self.epoch}
        row.update(
            {
                f"train_{key}": value / images
                for key, value in sorted(partial.items(), key=lambda kv: kv[0] != "loss")
            }
        )
        for prefix, values in (("val_", model_metrics), ("ema_val_", ema_metrics)):
            for name in self.task.metric_names:
                row[prefix + name] = None if values is None else values.get(name)
        row.update(
            lr=self.optimizer.param_groups[0]["lr"],
            epoch_seconds=seconds,
            train_images_per_s=self.images_this_session / seconds if self.images_this_session else None,
        )
        self.partial = {}
        self.history.append(row)
        best = None
        if model_metrics is not None:
            primary = self.task.kind.primary
            candidates = [(self.model, "model", model_metrics)]
            if ema_metrics is not None:
                candidates.append((self.ema.module, "ema", ema_metrics))
            module, source, metrics = max(candidates, key=lambda c: c[2][primary])
            if not self.best or metrics[primary] > self.best["value"]:
                self.best = {
                    "metric": primary,
                    "value": metrics[primary],
                    "epoch": self.epoch,
                    "weights": source,
                }
                best = (module, source, metrics)
        self._save(model_metrics, ema_metrics, best)
        if self.context.is_main:
            write_csv(self.history, self.run_dir / "metrics.csv")
            self.tensorboard.epoch(row)
            log(epoch_summary(row, self.config.epochs, self.task.metric_names))
            if self.context.distributed:
                shown = ", ".join(f"{rate:.0f}" for rate in rates)
                log(f"epoch {self.epoch}: {sum(rates):.0f} img/s in total; per process (rank order): {shown}")

    def run(self) -> RunResult:
        config, context = self.config, self.context
        if context.is_main:
            make_folder(self.run_dir, "run folder")
            write_text(
                self.run_dir / "config.yaml",
                require("yaml", "train").safe_dump(config.to_dict(), sort_keys=False),
            )
            log(f"run folder: {self.run_dir}")
            params = sum(p.numel() for p in self.model.parameters()) / 1e6
            log(
                f"{self.task.kind.name} model {config.model} ({params:.2f}M params) on {context.device}, "
                f"{config.epochs} epochs of {self.updates_per_epoch} steps"
            )
            log(
                f"world size {context.world_size}, per-process batch {config.batch_size}, accumulation "
                f"{config.accum_steps}, effective batch {self.global_batch * config.accum_steps}, "
                f"lr {config.lr:.3g} ({self.task.lr_rule or 'given'})"
            )
        self.tensorboard = TensorBoard(
            self.run_dir / "tensorboard" if config.tensorboard and context.is_main else None
        )
        result = RunResult(self.run_dir, self.history, main_process=context.is_main)
        self.stop.install()
        try:
            while self.epoch < config.epochs:
                start = time.perf_counter()
                if not self._train_epoch():
                    result.interrupted_by = self.stop.signal_name or "request"
                    if context.is_main:
                        log(
                            f"stopped by {result.interrupted_by} at epoch {self.epoch + 1}, step "
                            f"{self.step_in_epoch}; saved {ckpt.weights_path(self.run_dir, ckpt.LAST)}; "
                            f"continue with: {self.task.kind.command} --resume {self.run_dir}"
                        )
                    return result
                self._end_epoch(time.perf_counter() - start)
        finally:
            self.stop.uninstall()
            self.tensorboard.close()
        result.history, result.best = self.history, self.best
        if context.is_main and self.history:
            result.plots = try_plot_curves(self.history, self.run_dir, self.task.metric_names)
        return result
