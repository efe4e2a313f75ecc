"""Checkpoints: weights as safetensors with a JSON description, and one resumable set per run.

The set of files a run resumes from (model weights, EMA weights, best weights, training state)
is written into a new folder ``checkpoints/<n>-e<epoch>-s<step>/``; then the one-line pointer
``checkpoints/LATEST`` is switched to it with an atomic rename, and only then are older folders
removed. A kill at any instant therefore leaves ``LATEST`` naming a complete set. The weights are
also published at the top of the run folder (``last.safetensors``, ``last_ema.safetensors``,
``best.safetensors``, hard links into the set) for ``eval``, ``predict`` and fine-tuning;
resuming republishes them.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sepvit.errors import CheckpointError
from sepvit.utils.files import (
    check_file,
    link_atomically,
    reason,
    remove_temporaries,
    write_atomically,
    write_text,
)

FORMAT = "sepvit-train/1"
LAST, LAST_EMA, BEST = "last", "last_ema", "best"
STATE_FILE = "state.pt"
CHECKPOINTS, POINTER = "checkpoints", "LATEST"
MAX_LISTED_KEYS = 8
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def weights_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / f"{name}.safetensors"


def _cpu_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()}


def weights_writer(state_dict: Mapping[str, torch.Tensor], info: dict[str, Any]):
    """A writer (``write(path)``) of safetensors weights described by ``info`` (JSON metadata)."""
    tensors = _cpu_tensors(state_dict)
    metadata = {"format": FORMAT, "sepvit": json.dumps(info)}
    return lambda path: save_file(tensors, path, metadata=metadata)


def _load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors, which are not loaded (unsafe); save its "
            "state_dict() with torch.save or as safetensors"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch file ({reason(error)})") from error
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return loaded


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights and our description (None for a plain safetensors file or a ``.pth`` state dict)."""
    path = check_file(path, "checkpoint")
    if path.suffix in PICKLE_SUFFIXES:
        state_dict, info = _load_pickled_state_dict(path), None
    else:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            state_dict = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({reason(error)})") from error
        info = json.loads(metadata["sepvit"]) if metadata.get("format") == FORMAT else None
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict, info


def read_checkpoint(path: str | os.PathLike, task: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and description of a checkpoint written by a sepvit run (of ``task``, if given)."""
    state_dict, info = read_weights(path)
    if info is None:
        raise CheckpointError(
            f"{path} was not written by a sepvit run (no sepvit metadata): pass --model NAME "
            "(and --num-classes) to load it as a plain state dict"
        )
    found = info.setdefault("task", "classify")
    if task is not None and found != task:
        raise CheckpointError(f"{path} is a {found} checkpoint, not a {task} one")
    return state_dict, info


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    bad = [
        key for key, value in state_dict.items() if value.is_floating_point() and not value.isfinite().all()
    ]
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite values (in {_listed(bad)}); it is unusable")


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
    return "; ".join(f"{kind} {len(keys)}: {_listed(keys)}" for kind, keys in differences.items() if keys)


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every tensor or fail naming the keys and shapes that do not fit."""
    differences = compare_state_dicts(model, state_dict)
    if any(differences.values()):
        raise CheckpointError(
            f"checkpoint {source} does not fit the model: {describe_differences(differences)}"
        )
    model.load_state_dict(state_dict)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple(f"{name}." for name in names)


def family_filter(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model family's ``checkpoint_filter_fn`` applied (official layouts converted, window tokens
    resized), when the family has one and the checkpoint is one it understands."""
    import sys

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state_dict
    try:
        return dict(filter_fn(dict(state_dict), model))
    except Exception:  # a filter written for another layout; compare the raw tensors instead
        return state_dict


def load_for_finetune(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> str:
    """Load weights into a model whose classifier may differ; returns a report of what was loaded.

    Classifier tensors of another shape (another number of classes) are left as initialised; any
    other missing, unexpected or ill-fitting tensor is an error naming the keys and shapes.
    """
    state_dict = family_filter(model, state_dict)
    differences = compare_state_dicts(model, state_dict)
    head = _classifier_prefixes(model)
    expected = model.state_dict()
    body = {kind: [key for key in keys if not key.startswith(head)] for kind, keys in differences.items()}
    if any(body.values()):
        raise CheckpointError(f"{source} does not fit the model: {describe_differences(body)}")
    loadable = {
        key: value
        for key, value in state_dict.items()
        if key in expected and expected[key].shape == value.shape
    }
    model.load_state_dict(loadable, strict=False)
    report = f"fine-tuning from {source}: loaded {len(loadable)}/{len(expected)} tensors"
    fresh = sorted(key for key in expected if key.startswith(head) and key not in loadable)
    if fresh:
        shapes = ", ".join(
            f"{key} {_shape(state_dict[key])}→{_shape(expected[key])}" if key in state_dict else key
            for key in fresh
        )
        report += f"; classifier initialised afresh: {shapes}"
    return report


class RunCheckpoints:
    """The resumable checkpoint sets of one run folder (see the module's description)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / CHECKPOINTS

    @property
    def pointer(self) -> Path:
        return self.folder / POINTER

    def latest(self) -> Path | None:
        """The folder ``LATEST`` names, None when the run has not saved yet."""
        try:
            name = self.pointer.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise CheckpointError(f"cannot read {self.pointer}: {reason(error)}") from error
        folder = self.folder / name
        if not name or not folder.is_dir():
            raise CheckpointError(f"{self.pointer} names {name!r}, which is not a checkpoint folder")
        return folder

    def next_folder(self, epoch: int, step: int) -> Path:
        """Where the next set goes: ``<n>-e<epoch>-s<step>`` with ``n`` one more than ``LATEST``'s."""
        previous = self.latest()
        number = int(previous.name.split("-")[0]) + 1 if previous else 1
        return self.folder / f"{number:06d}-e{epoch:04d}-s{step:06d}"

    def save(
        self,
        folder: Path,
        weights: Mapping[str, tuple[Mapping[str, torch.Tensor], dict[str, Any]]],
        state: dict[str, Any],
        best_from: Path | None = None,
    ) -> None:
        """Write a new set into ``folder`` (``weights``: name → (state dict, info); ``state``: the
        training state) and switch ``LATEST`` to it. ``best_from`` is the set holding the best
        weights when this one has none."""
        if folder.exists():  # left by a save that was killed before the pointer switch
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        writes = {folder / f"{name}.safetensors": weights_writer(*pair) for name, pair in weights.items()}
        writes[folder / STATE_FILE] = lambda path: torch.save(state, path)
        try:
            write_atomically(writes)
            write_text(self.pointer, folder.name + "\n")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.publish(folder, best_from)
        keep = {folder, best_from or folder}
        for other in self.folder.iterdir():
            if other.is_dir() and other not in keep:
                shutil.rmtree(other, ignore_errors=True)

    def publish(self, folder: Path, best_from: Path | None = None) -> None:
        """Link the set's weights to the top of the run folder (after a kill, on resume)."""
        for name in (LAST, LAST_EMA, BEST):
            source = weights_path(folder, name)
            if name == BEST and not source.exists() and best_from is not None:
                source = weights_path(best_from, name)
            if source.exists():
                link_atomically(source, weights_path(self.run_dir, name))

    def load(self) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """(set folder, model weights, their info, training state) of the latest set."""
        folder = self.latest()
        if folder is None:
            raise CheckpointError(f"{self.run_dir} holds no checkpoint to resume ({self.pointer} is missing)")
        weights, info = read_checkpoint(weights_path(folder, LAST))
        state_file = check_file(folder / STATE_FILE, "training state")
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as error:  # a corrupt file raises any of several types
            raise CheckpointError(f"cannot load training state {state_file}: {reason(error)}") from error
        if not isinstance(state, dict) or (state.get("epoch"), state.get("step_in_epoch")) != (
            info["epoch"],
            info["step_in_epoch"],
        ):
            raise CheckpointError(f"{folder}: the weights and the training state are from different steps")
        return folder, weights, info, state

    def clean(self, keep: set[Path]) -> list[Path]:
        """Remove what an interrupted save left: temporary files, and sets other than ``keep``."""
        removed = remove_temporaries(self.run_dir)
        for folder in self.folder.iterdir() if self.folder.is_dir() else ():
            if folder.is_dir() and folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed + remove_temporaries(self.folder)


def find_run(resume: str | os.PathLike) -> Path:
    """The run folder of ``--resume`` (the folder itself or a file inside it)."""
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: {path} does not exist")
    run_dir = path if path.is_dir() else path.parent
    if not (run_dir / CHECKPOINTS / POINTER).is_file():
        raise CheckpointError(f"--resume {resume}: {run_dir} holds no checkpoints/{POINTER} of a sepvit run")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"--resume {resume}: {run_dir} has no config.yaml")
    return run_dir
