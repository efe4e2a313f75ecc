"""One process or many (torchrun): process group set-up, device choice, metric reduction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sepvit.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks this process's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is available")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name!r} is not a device ({error})") from error


def single_process(device_name: str = "auto") -> DistContext:
    """The context of a command that runs in this process only (eval, predict)."""
    return DistContext(0, 1, 0, choose_device(device_name))


def init_distributed(device_name: str) -> DistContext:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def all_reduce(values: list[float], context: DistContext, op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over all processes; identity for one process."""
    if not context.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def any_process(flag: bool, context: DistContext) -> bool:
    """Whether ``flag`` is true in any process; every process gets the same answer."""
    return bool(all_reduce([1.0 if flag else 0.0], context, op="max")[0])


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()


def from_main(value: Any, context: DistContext) -> Any:
    """Rank 0's ``value`` in every process (any picklable object)."""
    if not context.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value: Any, context: DistContext) -> list[Any]:
    """Every process's ``value``, in rank order, in every process."""
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def shutdown(context: DistContext) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()
