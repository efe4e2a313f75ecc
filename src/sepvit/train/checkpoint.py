"""Checkpoints: weights as safetensors with a JSON description, training state in a separate file.

A run folder holds ``last.safetensors`` (the model's weights after the latest epoch, or at the step
where the run was interrupted), ``last.state.pt`` (optimizer, scheduler, EMA weights, gradient
scaler, RNG states, position in the run, metrics so far; loaded with ``weights_only=True``),
``last_ema.safetensors`` (the EMA weights at the same point, when EMA is on) and
``best.safetensors`` (the weights, model's or EMA's, with the best validation top-1). Every file is
written to a temporary file in the same folder and then renamed over the old one, so a failed write
(a full disk, a kill) leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sepvit.cli import CliError

FORMAT = "sepvit-train/1"
LAST, LAST_EMA, BEST = "last", "last_ema", "best"
MAX_LISTED_KEYS = 8


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is kept."""


def weights_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.safetensors"


def state_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.state.pt"


def _write_temp(target: Path, write: Callable[[str], None]) -> str:
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(temp)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return temp


def write_atomically(writes: Mapping[Path, Callable[[str], None]]) -> None:
    """Write every file to a temporary name first, then rename all into place.

    If any write fails nothing is renamed, so the files already in place stay as they were.
    """
    temps: dict[Path, str] = {}
    try:
        for target, write in writes.items():
            temps[target] = _write_temp(target, write)
    except OSError as error:
        for temp in temps.values():
            Path(temp).unlink(missing_ok=True)
        names = ", ".join(str(target) for target in writes)
        raise CheckpointWriteError(
            f"could not write {names}: {error}; the previous files are kept"
        ) from error
    except BaseException:
        for temp in temps.values():
            Path(temp).unlink(missing_ok=True)
        raise
    for target, temp in temps.items():
        os.replace(temp, target)


def save_weights_writer(
    state_dict: Mapping[str, torch.Tensor], info: dict[str, Any]
) -> Callable[[str], None]:
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()}
    metadata = {"format": FORMAT, "sepvit": json.dumps(info)}
    return lambda path: save_file(tensors, path, metadata=metadata)


def save_state_writer(state: dict[str, Any]) -> Callable[[str], None]:
    return lambda path: torch.save(state, path)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights and our description (None for a plain safetensors or ``.pth`` state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"checkpoint {path} does not exist")
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CliError(f"cannot load {path} as a PyTorch state dict: {error}") from error
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise CliError(f"{path} does not hold a state dict of tensors")
        return loaded, None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CliError(f"{path} is not a readable safetensors file ({error})") from error
    info = json.loads(metadata["sepvit"]) if metadata.get("format") == FORMAT else None
    return state_dict, info


def read_checkpoint_info(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and description of a checkpoint written by ``sepvit train``; others are refused."""
    state_dict, info = read_weights(path)
    if info is None:
        raise CliError(
            f"{path} was not written by sepvit train (no sepvit metadata): pass --model NAME "
            "(and --num-classes) to load it as a plain state dict"
        )
    return state_dict, info


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(str(size) for size in tensor.shape) or "scalar"


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


def compare_state_dicts(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Keys missing from or unexpected in the checkpoint, and shape mismatches (described)."""
    expected = model.state_dict()
    return {
        "missing": sorted(set(expected) - set(state_dict)),
        "unexpected": sorted(set(state_dict) - set(expected)),
        "mismatched": [
            f"{key} (checkpoint {_shape(state_dict[key])}, model {_shape(expected[key])})"
            for key in sorted(set(expected) & set(state_dict))
            if state_dict[key].shape != expected[key].shape
        ],
    }


def describe_differences(differences: dict[str, list[str]]) -> str:
    parts = [f"{kind} {len(keys)}: {_listed(keys)}" for kind, keys in differences.items() if keys]
    return "; ".join(parts)


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every tensor or fail naming the keys and shapes that do not fit."""
    differences = compare_state_dicts(model, state_dict)
    if any(differences.values()):
        raise CliError(f"checkpoint {source} does not fit the model: {describe_differences(differences)}")
    model.load_state_dict(state_dict)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple(f"{name}." for name in names)


def _filter_for_model(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the model family's checkpoint filter (e.g. resizing window tokens) when it has one."""
    import sys

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state_dict
    try:
        return dict(filter_fn(state_dict, model))
    except Exception:  # a filter written for another layout; compare the raw tensors instead
        return state_dict


def load_for_finetune(model: nn.Module, path: str | os.PathLike) -> str:
    """Load weights into a model whose classifier may differ; returns a report of what was loaded.

    Classifier tensors of another shape (another number of classes) are left as initialised; any
    other missing, unexpected or ill-fitting tensor is an error naming the keys and shapes.
    """
    state_dict, _ = read_weights(path)
    state_dict = _filter_for_model(model, state_dict)
    differences = compare_state_dicts(model, state_dict)
    head = _classifier_prefixes(model)
    expected = model.state_dict()
    head_keys = [key for key in expected if key.startswith(head)]
    reshaped_head = [
        key for key in head_keys if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    body = {
        "missing": [key for key in differences["missing"] if not key.startswith(head)],
        "unexpected": [key for key in differences["unexpected"] if not key.startswith(head)],
        "mismatched": [item for item in differences["mismatched"] if not item.startswith(head)],
    }
    if any(body.values()):
        raise CliError(f"--finetune {path} does not fit model: {describe_differences(body)}")
    loadable = {
        key: value
        for key, value in state_dict.items()
        if key in expected and expected[key].shape == value.shape
    }
    model.load_state_dict(loadable, strict=False)
    report = f"fine-tuning from {path}: loaded {len(loadable)}/{len(expected)} tensors"
    fresh = sorted(set(head_keys) - set(loadable))
    if fresh:
        shapes = ", ".join(
            f"{key} {_shape(state_dict[key])}→{_shape(expected[key])}" if key in reshaped_head else key
            for key in fresh
        )
        report += f"; classifier initialised afresh: {shapes}"
    return report


def load_training_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CliError(f"cannot load training state {path}: {error}") from error


def resolve_run_dir(resume: str | os.PathLike) -> Path:
    """The run folder of ``--resume`` (the folder itself or a file inside it)."""
    path = Path(resume)
    run_dir = path if path.is_dir() else path.parent
    if not weights_path(run_dir, LAST).is_file() or not state_path(run_dir, LAST).is_file():
        raise CliError(f"--resume {resume}: no {LAST}.safetensors and {LAST}.state.pt in {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise CliError(f"--resume {resume}: {run_dir} has no config.yaml")
    return run_dir
