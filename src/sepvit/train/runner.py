"""The training run: set-up, resume, the epoch loop, checkpoints, signals, and the final summary."""

from __future__ import annotations

import contextlib
import math
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from sepvit.cli import CliError
from sepvit.train import checkpoint as ckpt
from sepvit.train.config import apply_recipe_defaults, saved_config
from sepvit.train.data import (
    DIGITS_DATA,
    ImageDecodeError,
    ShardedSampler,
    TransformedImages,
    build_transforms,
    describe,
    limit,
    load_image_sets,
    make_loader,
)
from sepvit.train.distributed import DistContext, all_reduce, any_process
from sepvit.train.engine import (
    amp_dtype,
    autocast,
    build_recipe,
    create_model,
    data_config_for,
    default_img_size,
    evaluate,
)
from sepvit.train.plots import plot_curves
from sepvit.train.reporting import Progress, TensorBoard, epoch_summary, log, write_csv


class TrainingError(RuntimeError):
    """The run cannot go on (loss became NaN, a checkpoint could not be written); exit code 1."""


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any] = field(default_factory=dict)
    interrupted_by: str | None = None
    plots: list[Path] = field(default_factory=list)


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


def gather_objects(value: Any, context: DistContext) -> list[Any]:
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


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


def _new_run_dir(config: dict[str, Any]) -> Path:
    data_name = config["data"] if config["data"] in DIGITS_DATA else Path(config["data"]).name
    name = config["experiment"] or f"{config['model']}-{data_name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config["output"]) / name
    if ckpt.weights_path(run_dir, ckpt.LAST).exists():
        raise CliError(
            f"run folder {run_dir} already holds a run: continue it with --resume {run_dir} "
            "or choose another --experiment"
        )
    return run_dir


class Trainer:
    """One training run; every process of a torchrun job builds one."""

    def __init__(
        self, config: dict[str, Any], context: DistContext, step_hook: Callable[[Trainer], None] | None = None
    ) -> None:
        self.context = context
        self.config = config = apply_recipe_defaults(config, context.world_size)
        self.step_hook = step_hook
        self.stop = StopRequest()
        self.resume_dir = ckpt.resolve_run_dir(config["resume"]) if config.get("resume") else None
        self.run_dir = self.resume_dir or _new_run_dir(config)
        if config["img_size"] == "auto":
            config["img_size"] = default_img_size(config["model"])

        torch.manual_seed(config["seed"])
        random.seed(config["seed"])
        np.random.seed(config["seed"])

        train_set, val_set = load_image_sets(config["data"], config["img_size"])
        self.classes = train_set.classes
        train_set, val_set = limit(train_set, config["limit_train"]), limit(val_set, config["limit_val"])
        if context.is_main:
            log(describe(train_set, "train"))
            log(describe(val_set, "val"))

        self.model, self.model_kwargs = create_model(
            config["model"], len(self.classes), config["img_size"], config["drop_path"]
        )
        if config["finetune"] and not self.resume_dir:
            report = ckpt.load_for_finetune(self.model, config["finetune"])
            if context.is_main:
                log(report)
        self.data_config = data_config_for(self.model, config["img_size"], config["crop_pct"])
        self.model.to(context.device)
        if config["channels_last"]:
            self.model.to(memory_format=torch.channels_last)

        self.global_batch = config["batch_size"] * context.world_size
        self.train_data = TransformedImages(
            train_set, build_transforms(config, self.data_config, True), seed=config["seed"]
        )
        self.train_sampler = ShardedSampler(
            len(train_set.items), context.rank, context.world_size, True, config["seed"], self.global_batch
        )
        micro_batches = len(train_set.items) // self.global_batch
        self.updates_per_epoch = micro_batches // config["accum_steps"]
        if self.updates_per_epoch == 0:
            raise CliError(
                f"{len(train_set.items)} training images make no full step of {self.global_batch} images × "
                f"{config['accum_steps']} accumulation steps; lower --batch-size or --accum-steps"
            )
        pin = context.device.type == "cuda"
        self.train_loader = make_loader(
            self.train_data,
            self.train_sampler,
            config["batch_size"],
            config["workers"],
            drop_last=True,
            pin_memory=pin,
        )
        val_data = TransformedImages(val_set, build_transforms(config, self.data_config, False))
        val_sampler = ShardedSampler(len(val_set.items), context.rank, context.world_size, False)
        self.val_loader = make_loader(
            val_data, val_sampler, config["batch_size"], config["workers"], drop_last=False, pin_memory=pin
        )

        self.ema = None
        if config["model_ema"]:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=config["ema_decay"], use_warmup=True)
        self.recipe = build_recipe(self.model, config, len(self.classes), self.updates_per_epoch)
        self.dtype = amp_dtype(config["amp"], context.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

        self.train_model: nn.Module = self.model
        if context.distributed:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if config["compile"]:
            self.train_model = torch.compile(self.train_model)

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimizer steps completed in the current epoch
        self.partial_loss = [0.0, 0.0]  # loss sum and image count of the current epoch so far
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        # Each process draws its own augmentation noise (drop path, mixup); timm offsets by rank too.
        torch.manual_seed(config["seed"] + context.rank)
        np.random.seed(config["seed"] + context.rank)
        random.seed(config["seed"] + context.rank)
        if self.resume_dir:
            self._resume()

    # -- checkpoints --------------------------------------------------------------------------
    def _info(self, weights: str, metrics: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "model": self.config["model"],
            "model_kwargs": self.model_kwargs,
            "classes": self.classes,
            "data": self.config["data"],
            "data_config": self.data_config,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "weights": weights,
            "top1": None if metrics is None else metrics["top1"],
            "top5": None if metrics is None else metrics["top5"],
        }

    def _save(
        self,
        last_metrics: dict[str, Any] | None,
        best_weights: tuple[nn.Module, str, dict] | None,
        ema_metrics: dict[str, Any] | None = None,
    ) -> None:
        """Write last (and best) checkpoints on rank 0; every process learns whether that worked."""
        rng = gather_objects(capture_rng(), self.context)
        partial = all_reduce(self.partial_loss, self.context)
        error = ""
        if self.context.is_main:
            state = {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "partial_loss": partial,
                "optimizer": self.recipe.optimizer.state_dict(),
                "scheduler": self.recipe.scheduler.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng,
                "history": self.history,
                "best": self.best,
            }
            writes = {
                ckpt.weights_path(self.run_dir, ckpt.LAST): ckpt.save_weights_writer(
                    self.model.state_dict(), self._info("model", last_metrics)
                ),
                ckpt.state_path(self.run_dir, ckpt.LAST): ckpt.save_state_writer(state),
            }
            if self.ema is not None:
                writes[ckpt.weights_path(self.run_dir, ckpt.LAST_EMA)] = ckpt.save_weights_writer(
                    self.ema.module.state_dict(), self._info("ema", ema_metrics)
                )
            if best_weights is not None:
                module, source, metrics = best_weights
                writes[ckpt.weights_path(self.run_dir, ckpt.BEST)] = ckpt.save_weights_writer(
                    module.state_dict(), self._info(source, metrics)
                )
            try:
                ckpt.write_atomically(writes)
            except ckpt.CheckpointWriteError as failure:
                error = str(failure)
        failed = any_process(bool(error), self.context)
        if failed:
            raise TrainingError(error or "rank 0 could not write the checkpoint; the previous one is kept")

    def _resume(self) -> None:
        weights, info = ckpt.read_checkpoint_info(ckpt.weights_path(self.run_dir, ckpt.LAST))
        ckpt.load_strict(self.model, weights, str(ckpt.weights_path(self.run_dir, ckpt.LAST)))
        state = ckpt.load_training_state(ckpt.state_path(self.run_dir, ckpt.LAST))
        if (state["epoch"], state["step_in_epoch"]) != (info["epoch"], info["step_in_epoch"]):
            raise CliError(f"{self.run_dir}: last.safetensors and last.state.pt are from different steps")
        self.recipe.optimizer.load_state_dict(state["optimizer"])
        self.recipe.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
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
        self.partial_loss = list(state["partial_loss"]) if self.context.is_main else [0.0, 0.0]
        self.history, self.best = state["history"], state["best"]
        if self.context.is_main:
            log(f"resumed {self.run_dir} at epoch {self.epoch + 1}, step {self.step_in_epoch}")

    # -- the loop -----------------------------------------------------------------------------
    def _train_epoch(self) -> bool:
        """Train one epoch (or its rest); False if a stop was requested and the state saved."""
        config, context = self.config, self.context
        accum = config["accum_steps"]
        epoch = self.epoch + 1
        self.train_data.epoch = epoch
        self.train_sampler.set_epoch(epoch, skip_batches=self.step_in_epoch * accum)
        progress = Progress(
            epoch,
            config["epochs"],
            self.updates_per_epoch,
            self.step_in_epoch,
            config["log_interval"],
            context.is_main,
        )
        optimizer, scheduler = self.recipe.optimizer, self.recipe.scheduler
        self.train_model.train()
        self.images_this_session = 0
        batches = iter(self.train_loader)
        try:
            while self.step_in_epoch < self.updates_per_epoch:
                window_loss, window_images, finite = 0.0, 0, True
                for micro in range(accum):
                    images, labels = next(batches)
                    loss_value = self._forward_backward(images, labels, sync=micro == accum - 1)
                    finite = finite and math.isfinite(loss_value)
                    window_loss += loss_value * labels.shape[0]
                    window_images += labels.shape[0]
                if any_process(not finite, context):
                    self._diverged(epoch)
                self._optimizer_step(optimizer)
                global_step = self.epoch * self.updates_per_epoch + self.step_in_epoch + 1
                if self.ema is not None:
                    self.ema.update(self.model, step=global_step)
                scheduler.step_update(num_updates=global_step)
                self.step_in_epoch += 1
                self.partial_loss[0] += window_loss
                self.partial_loss[1] += window_images
                self.images_this_session += window_images * context.world_size
                lr = optimizer.param_groups[0]["lr"]
                progress.update(window_images * context.world_size, window_loss / window_images, lr)
                if self.step_hook is not None:
                    self.step_hook(self)
                # Every process must agree, or one would wait for the others in the next collective.
                if any_process(bool(self.stop.signal_name), context):
                    self._save(None, None)
                    return False
        except ImageDecodeError as error:  # from a loader worker it carries the worker's traceback
            message = re.search(r"cannot decode image .*", str(error))
            raise CliError(message.group(0) if message else str(error)) from error
        finally:
            progress.close()
        return True

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> float:
        context, config = self.context, self.config
        images = images.to(context.device, non_blocking=True)
        labels = labels.to(context.device, non_blocking=True)
        if self.recipe.mixup is not None:
            images, labels = self.recipe.mixup(images, labels)
        if config["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        no_sync = getattr(self.train_model, "no_sync", None)
        with no_sync() if no_sync is not None and not sync else contextlib.nullcontext():
            with autocast(context.device, self.dtype):
                loss = self.recipe.train_loss(self.train_model(images), labels)
            scaled = loss / config["accum_steps"]
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.item()

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.config["clip_grad"]:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config["clip_grad"])
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _diverged(self, epoch: int) -> None:
        last = ckpt.weights_path(self.run_dir, ckpt.LAST)
        kept = (
            f"the last good checkpoint is {last} (epoch {self.epoch})"
            if last.exists()
            else "no checkpoint was written yet"
        )
        raise TrainingError(
            f"loss became NaN or infinite at epoch {epoch}, step {self.step_in_epoch + 1} "
            f"(lr {self.recipe.optimizer.param_groups[0]['lr']:.2e}); stopped, {kept}. "
            "Try a lower --lr, --clip-grad or --amp none"
        )

    def _end_epoch(self, seconds: float) -> None:
        loss_sum, images = all_reduce(self.partial_loss, self.context)
        model_metrics = evaluate(
            self.model, self.val_loader, self.context, self.dtype, self.config["channels_last"]
        )
        ema_metrics = None
        if self.ema is not None:
            ema_metrics = evaluate(
                self.ema.module, self.val_loader, self.context, self.dtype, self.config["channels_last"]
            )
        self.epoch += 1
        self.step_in_epoch = 0
        self.partial_loss = [0.0, 0.0]
        row = {
            "epoch": self.epoch,
            "train_loss": loss_sum / max(images, 1),
            "val_loss": model_metrics["loss"],
            "val_top1": model_metrics["top1"],
            "val_top5": model_metrics["top5"],
            "ema_val_loss": ema_metrics["loss"] if ema_metrics else None,
            "ema_val_top1": ema_metrics["top1"] if ema_metrics else None,
            "ema_val_top5": ema_metrics["top5"] if ema_metrics else None,
            "lr": self.recipe.optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "train_images_per_s": self.images_this_session / seconds if self.images_this_session else None,
        }
        self.history.append(row)
        candidates = [(self.model, "model", model_metrics)]
        if ema_metrics is not None:
            candidates.append((self.ema.module, "ema", ema_metrics))
        module, source, metrics = max(candidates, key=lambda c: c[2]["top1"])
        best_weights = None
        if not self.best or metrics["top1"] > self.best["top1"]:
            self.best = {
                "top1": metrics["top1"],
                "top5": metrics["top5"],
                "epoch": self.epoch,
                "weights": source,
            }
            best_weights = (module, source, metrics)
        self._save(model_metrics, best_weights, ema_metrics)
        if self.context.is_main:
            write_csv(self.history, self.run_dir / "metrics.csv")
            self.tensorboard.epoch(row)
            log(epoch_summary(row, self.config["epochs"]))

    def run(self) -> RunResult:
        config, context = self.config, self.context
        if context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(saved_config(config), sort_keys=False)
            ckpt.write_atomically({self.run_dir / "config.yaml": lambda temp: Path(temp).write_text(text)})
            log(f"run folder: {self.run_dir}")
            params = sum(p.numel() for p in self.model.parameters()) / 1e6
            log(
                f"model {config['model']} ({params:.2f}M params) at {config['img_size']}px, "
                f"{context.world_size} process(es) on {context.device}, global batch "
                f"{self.global_batch * config['accum_steps']}, lr {config['lr']:.2e}, "
                f"{config['epochs']} epochs of {self.updates_per_epoch} steps"
            )
        self.tensorboard = TensorBoard(
            self.run_dir / "tensorboard" if config["tensorboard"] and context.is_main else None
        )
        result = RunResult(self.run_dir, self.history)
        self.stop.install()
        try:
            while self.epoch < config["epochs"]:
                start = time.perf_counter()
                if not self._train_epoch():
                    result.interrupted_by = self.stop.signal_name or "request"
                    if context.is_main:
                        log(
                            f"stopped by {result.interrupted_by} at epoch {self.epoch + 1}, step "
                            f"{self.step_in_epoch}; saved {ckpt.weights_path(self.run_dir, ckpt.LAST)}; "
                            f"continue with: sepvit train --resume {self.run_dir}"
                        )
                    return result
                self._end_epoch(time.perf_counter() - start)
        finally:
            self.stop.uninstall()
            self.tensorboard.close()
        result.history, result.best = self.history, self.best
        if context.is_main and self.history:
            result.plots = plot_curves(self.history, self.run_dir)
        return result
