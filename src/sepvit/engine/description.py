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

VERSION = 2
# Keys of the per-task descriptions written before VERSION 2, other than those every task had.
_LEGACY_EXTRAS = {
    "classify": (),
    "detect": ("arch", "num_classes", "category_ids", "train_min_sizes", "max_size", "fpn_channels",
               "rois_per_image"),
    "segment": ("head", "num_classes", "crop_size", "head_channels"),
}  # fmt: skip
_LEGACY_MODEL = ("task", "model", "model_kwargs", "classes", "class_names", "img_size", "data", "data_config")


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
        object.__setattr__(self, "input_size", tuple(int(size) for size in self.input_size))
        object.__setattr__(self, "class_names", [str(name) for name in self.class_names])

    def at(self, **progress: Any) -> RunDescription:
        """The same run at another point of training."""
        return dataclasses.replace(self, progress=progress)

    def to_metadata(self) -> dict[str, Any]:
        return {"version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = "the checkpoint") -> RunDescription:
        """A stored description, of this version or of an earlier one."""
        try:
            if metadata.get("version") == VERSION:
                fields = {spec.name for spec in dataclasses.fields(cls)}
                return cls(**{key: value for key, value in metadata.items() if key in fields})
            return cls._from_legacy(metadata)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: its sepvit description is incomplete ({error!r})") from error

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
