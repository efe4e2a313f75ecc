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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sepvit.engine.description import RunDescription
from sepvit.errors import CheckpointError
from sepvit.models.state_dicts import unwrap_state_dict
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


def weights_writer(state_dict: Mapping[str, torch.Tensor], description: RunDescription):
    """A writer (``write(path)``) of safetensors weights with their description (JSON metadata)."""
    tensors = _cpu_tensors(state_dict)
    metadata = {"format": FORMAT, "sepvit": json.dumps(description.to_metadata())}
    return lambda path: save_file(tensors, path, metadata=metadata)


def load_tensors_only(path: Path, advice: str = "") -> Any:
    """``torch.load`` of tensors and plain containers, never other Python objects (a pickle can run
    code), with torch's errors in our words: its advice to retry with ``weights_only=False`` is not
    one to pass on. ``advice`` follows the message for a file holding other objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} is corrupt or holds Python objects besides tensors, which are not loaded "
            f"(unsafe){advice}"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first_sentence = reason(error).split(". ")[0]
        raise CheckpointError(f"{path} is not a readable PyTorch file ({first_sentence})") from error


def _load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    loaded = load_tensors_only(path, "; save its state_dict() with torch.save or as safetensors")
    if isinstance(loaded, dict):
        loaded = unwrap_state_dict(loaded)
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return loaded


def _stored_description(metadata: Mapping[str, str], path: Path) -> Any:
    """The JSON a sepvit weights file keeps under ``sepvit`` (checked by ``RunDescription``)."""
    try:
        return json.loads(metadata["sepvit"])
    except KeyError:
        raise CheckpointError(f"{path}: its metadata says {FORMAT} but holds no sepvit description") from None
    except ValueError as error:
        raise CheckpointError(f"{path}: its sepvit description is not JSON ({reason(error)})") from error


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], RunDescription | None]:
    """Weights and their description (None for a plain safetensors file or a ``.pth`` state dict)."""
    path = check_file(path, "checkpoint")
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickled_state_dict(path), None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason(error)})") from error
    description = None
    if metadata.get("format") == FORMAT:  # checked before the tensors are read
        description = RunDescription.from_metadata(_stored_description(metadata, path), str(path))
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason(error)})") from error
    return unwrap_state_dict(state_dict), description


def read_checkpoint(
    path: str | os.PathLike, task: str | None = None
) -> tuple[dict[str, torch.Tensor], RunDescription]:
    """Weights and description of a checkpoint written by a sepvit run (of ``task``, if given)."""
    state_dict, description = read_weights(path)
    if description is None:
        raise CheckpointError(
            f"{path} was not written by a sepvit run (no sepvit metadata): pass --model NAME "
            "(and --num-classes) to load it as a plain state dict"
        )
    if task is not None and description.task != task:
        raise CheckpointError(f"{path} is a {description.task} checkpoint, not a {task} one")
    return state_dict, description


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


# A backbone that receives less than this share of its tensors from a checkpoint is not its model's.
MIN_LOADED_FRACTION = 0.5


@dataclass
class LoadReport:
    """What pretrained weights gave a model: tensors loaded, left at initialisation, and left over."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model does not use
    mismatched: list[str] = field(default_factory=list)  # "name (checkpoint shape, model shape)"
    adapted: list[str] = field(default_factory=list)  # reshaped by the family's checkpoint filter

    def summary(self, limit: int = 5) -> str:
        def listed(title: str, names: list[str]) -> str:
            more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
            return f"; {title} ({len(names)}): {', '.join(names[:limit])}{more}" if names else ""

        return (
            f"from {self.source}: loaded {len(self.loaded)} of {len(self.loaded) + len(self.missing)} tensors"
            + listed("adapted to the window grid", self.adapted)
            + listed("left at initialisation", self.missing)
            + listed("not used", self.unexpected)
            + listed("shapes differ, not loaded", self.mismatched)
        )


def checkpoint_filter(model: nn.Module):
    """The ``checkpoint_filter_fn`` of the model's family (converts official and timm layouts,
    resizes window tokens), None when the family has none."""
    import sys

    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple(f"{name}." for name in names)


def _flat_name(name: str) -> str:
    # timm's feature wrappers rename "stages.0.x" to "stages_0.x" (FeatureListNet) or prefix "model.".
    return name.removeprefix("model.").replace(".", "_")


def load_pretrained(
    model: nn.Module, source: str | os.PathLike, reference: nn.Module | None = None
) -> LoadReport:
    """Load pretrained weights (ours, a timm state dict, an official checkpoint) into ``model``.

    The family's checkpoint filter adapts the weights to ``reference``: the model itself, or for a
    backbone (``features_only``) a classifier of the same model built alike, whose tensors the
    backbone's match by name. A classifier may differ from the checkpoint only in its head (another
    number of classes: initialised afresh); a backbone takes what it uses, and fails when shapes
    disagree or it receives less than half its tensors (another model). Raises
    :class:`~sepvit.errors.CheckpointError` naming what does not fit.
    """
    state_dict, _ = read_weights(source)
    target = model if reference is None else reference
    filter_fn = checkpoint_filter(target)
    adapted = dict(state_dict)
    if filter_fn is not None:
        try:
            adapted = dict(filter_fn(dict(state_dict), target))
        except Exception as error:  # a foreign checkpoint can break a filter in any way
            raise CheckpointError(
                f"{source} does not fit {type(target).__name__}: {reason(error)}"
            ) from error
    report = LoadReport(str(source))
    by_flat_name = {_flat_name(key): key for key in adapted}
    loadable = {}
    for name, tensor in model.state_dict().items():
        key = by_flat_name.pop(_flat_name(name), None)
        if key is None:
            report.missing.append(name)
        elif adapted[key].shape != tensor.shape:
            report.mismatched.append(f"{key} (checkpoint {_shape(adapted[key])}, model {_shape(tensor)})")
        else:
            loadable[name] = adapted[key]
            report.loaded.append(name)
            if key in state_dict and state_dict[key].shape != tensor.shape:
                report.adapted.append(key)
    report.unexpected = sorted(by_flat_name.values())
    report.mismatched.sort()
    _check_fit(report, _classifier_prefixes(target) if reference is None else None, len(model.state_dict()))
    model.load_state_dict(loadable, strict=False)
    return report


def _check_fit(report: LoadReport, head: tuple[str, ...] | None, total: int) -> None:
    """A classifier (``head``: its classifier's prefixes) may differ in its head only; a backbone
    (``head`` None) in no shape, and must receive at least half its tensors."""
    if head is not None:
        body = {
            kind: [key for key in keys if not key.startswith(head)]
            for kind, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                               ("mismatched", report.mismatched))
        }  # fmt: skip
        if any(body.values()):
            raise CheckpointError(f"{report.source} does not fit the model: {describe_differences(body)}")
    elif report.mismatched or len(report.loaded) < MIN_LOADED_FRACTION * total:
        raise CheckpointError(f"{report.source} does not fit the model: {report.summary()}")


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
        weights: Mapping[str, tuple[Mapping[str, torch.Tensor], RunDescription]],
        state: dict[str, Any],
        best_from: Path | None = None,
    ) -> None:
        """Write a new set into ``folder`` (``weights``: name → (state dict, description); ``state``: the
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

    def load(self) -> tuple[Path, dict[str, torch.Tensor], RunDescription, dict[str, Any]]:
        """(set folder, model weights, their description, training state) of the latest set."""
        folder = self.latest()
        if folder is None:
            raise CheckpointError(f"{self.run_dir} holds no checkpoint to resume ({self.pointer} is missing)")
        weights, description = read_checkpoint(weights_path(folder, LAST))
        state_file = check_file(folder / STATE_FILE, "training state")
        try:
            state = load_tensors_only(state_file)
        except CheckpointError as error:
            raise CheckpointError(f"cannot load training state {state_file}: {error}") from error
        progress = description.progress
        if not isinstance(state, dict) or (state.get("epoch"), state.get("step_in_epoch")) != (
            progress.get("epoch"),
            progress.get("step_in_epoch"),
        ):
            raise CheckpointError(f"{folder}: the weights and the training state are from different steps")
        return folder, weights, description, state

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
        started = (run_dir / "config.yaml").is_file()
        hint = "; it stopped before its first checkpoint: run the same command again without --resume"
        raise CheckpointError(
            f"--resume {resume}: {run_dir} holds no checkpoints/{POINTER} of a sepvit run"
            + (hint if started else "")
        )
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"--resume {resume}: {run_dir} has no config.yaml")
    return run_dir
