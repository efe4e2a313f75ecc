"""What a run's weights are: the description stored with every checkpoint (and ONNX export).

One shape for every task: the task, the model and the keyword arguments that rebuild it, the class
names, the input size, the data and its preprocessing, the task's own options (``extras``) and where
in training the weights were taken (``progress``: epoch, step, which weights, the metrics then).
Checkpoints of earlier versions, whose description was a dict shaped per task, read into the same
type.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sepvit.errors import CheckpointError
from sepvit.models.input_sizes import check_input_size

VERSION = 2
TASKS = ("classify", "detect", "segment")
# Keys of the per-task descriptions written before VERSION 2, other than those every task had.
_LEGACY_EXTRAS = {
    "classify": (),
    "detect": ("arch", "num_classes", "category_ids", "train_min_sizes", "max_size", "fpn_channels",
               "rois_per_image"),
    "segment": ("head", "num_classes", "crop_size", "head_channels"),
}  # fmt: skip
_LEGACY_MODEL = ("task", "model", "model_kwargs", "classes", "class_names", "img_size", "data", "data_config")


def _sides(model: str, sizes: Any, what: str) -> tuple[int, int]:
    """(H, W) from stored ``sizes``, refused unless two whole numbers within ``model``'s sensible sizes."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 2:
        raise ValueError(f"{what} must be (height, width), got {sizes!r}")
    return tuple(check_input_size(model, sizes, what))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class RunDescription:
    """A run's weights described; ``to_metadata``/``from_metadata`` give and read the stored JSON."""

    task: str  # "classify", "detect" or "segment"
    model: str  # the timm name of the model (of the backbone, for dense tasks)
    model_kwargs: dict[str, Any]  # what rebuilds it: create_model(model, **model_kwargs)
    class_names: list[str]
    input_size: tuple[int, int]  # (H, W) it was trained at
    data: str | None = None  # what it was trained on, as the run's --data named it
    data_config: dict[str, Any] | None = None  # preprocessing (timm's data config), classification
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)  # the task's own options
    progress: dict[str, Any] = dataclasses.field(default_factory=dict)  # epoch, step, weights, metrics

    def __post_init__(self) -> None:
        """Checks every field's type and the sizes it would build, before anything is allocated: a
        description is read from files anyone may have written."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not isinstance(self.model, str):
            raise TypeError(f"model must be a name, got {self.model!r}")
        for name in ("model_kwargs", "extras", "progress"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a mapping, got {type(getattr(self, name)).__name__}")
        if self.data_config is not None and not isinstance(self.data_config, dict):
            raise TypeError(f"data_config must be a mapping, got {type(self.data_config).__name__}")
        if not isinstance(self.class_names, (list, tuple)) or not self.class_names:
            raise TypeError("class_names must be a non-empty list")
        object.__setattr__(self, "input_size", _sides(self.model, self.input_size, "input_size"))
        object.__setattr__(self, "class_names", [str(name) for name in self.class_names])
        for sizes, what in (
            (self.model_kwargs.get("img_size"), "model_kwargs img_size"),
            ((self.data_config or {}).get("input_size", (3, *self.input_size))[1:], "data_config input_size"),
        ):
            if sizes is not None:
                _sides(self.model, (sizes, sizes) if isinstance(sizes, int) else sizes, what)

    def at(self, **progress: Any) -> RunDescription:
        """The same run at another point of training."""
        return dataclasses.replace(self, progress=progress)

    def to_metadata(self) -> dict[str, Any]:
        return {"version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = "the checkpoint") -> RunDescription:
        """A stored description, of this version or of an earlier one."""
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{source}: its sepvit description is not a JSON object")
        try:
            if metadata.get("version") == VERSION:
                fields = {spec.name for spec in dataclasses.fields(cls)}
                return cls(**{key: value for key, value in metadata.items() if key in fields})
            return cls._from_legacy(metadata)
        except KeyError as error:
            raise CheckpointError(f"{source}: its sepvit description lacks the field {error}") from error
        except (TypeError, ValueError, AttributeError, IndexError) as error:
            raise CheckpointError(f"{source}: its sepvit description is unusable ({error})") from error

    @classmethod
    def _from_legacy(cls, info: dict[str, Any]) -> RunDescription:
        task = info.get("task", "classify")
        extras = {key: info[key] for key in _LEGACY_EXTRAS[task] if key in info}
        if task == "classify":
            input_size = info["data_config"]["input_size"][-2:]
        else:
            input_size = info["img_size"]
        known = {*_LEGACY_MODEL, *_LEGACY_EXTRAS[task]}
        return cls(
            task=task,
            model=info["model"],
            model_kwargs=dict(info.get("model_kwargs", {})),
            class_names=info.get("classes", info.get("class_names")),
            input_size=input_size,
            data=info.get("data"),
            data_config=info.get("data_config"),
            extras=extras,
            progress={key: value for key, value in info.items() if key not in known},
        )
