"""Optimizer, learning-rate schedule and mixed precision from a run's configuration (timm parts)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from sepvit.engine.config import TrainConfig
from sepvit.errors import ConfigError

# timm optimizer names that map to torch.optim classes with a fused CPU and CUDA implementation.
FUSED_OPTIMIZERS = ("adam", "adamw")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that any submodule's ``no_weight_decay()`` lists (SepViT's window tokens),
    qualified with the submodule's path, so a backbone inside a detector keeps its exemptions."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    return names


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer; no weight decay on biases, norms and ``no_weight_decay()`` tensors."""
    from timm.optim import create_optimizer_v2
    from timm.optim._param_groups import param_groups_weight_decay

    groups = param_groups_weight_decay(
        model, config.weight_decay, no_weight_decay_list=no_weight_decay_names(model)
    )
    try:
        return create_optimizer_v2(
            groups,
            opt=config.opt,
            lr=config.lr,
            weight_decay=config.weight_decay,
            # One fused kernel instead of a loop over tensors: several times faster on CPU, where
            # PyTorch's default is the per-tensor loop.
            **({"fused": True} if config.opt.lower() in FUSED_OPTIMIZERS else {}),
        )
    except (AssertionError, ValueError, KeyError) as error:
        raise ConfigError(f"--opt {config.opt}: {error}") from error


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, updates_per_epoch: int) -> Any:
    """timm's schedule, stepped every optimizer update; warm-up in epochs or in steps."""
    from timm.scheduler import create_scheduler_v2

    warmup = config.warmup_epochs
    if config.warmup_steps is not None:
        warmup = config.warmup_steps / updates_per_epoch
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=config.sched,
            num_epochs=config.epochs,
            warmup_epochs=warmup,
            warmup_lr=config.warmup_lr,
            min_lr=config.min_lr,
            decay_milestones=list(config.decay_milestones),
            decay_rate=config.decay_rate,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
    except (AssertionError, ValueError) as error:
        raise ConfigError(f"--sched {config.sched}: {error}") from error
    if scheduler is None:
        raise ConfigError(
            f"--sched {config.sched} is not a timm schedule (cosine, multistep, poly, step, ...)"
        )
    return scheduler


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp``; ``auto`` is bf16 on a GPU that supports it, else none."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a GPU; use --amp bf16 on the CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
