"""Typed run configurations: dataclasses whose fields carry their help, range and command-line form.

A task's configuration is a dataclass deriving from :class:`TrainConfig`; it is built without
argparse (``MyConfig(lr=1e-3)``, :func:`build_config`) and checked on construction: every value
has its declared type (``"1e-3"`` from a YAML file becomes a float, ``"many"`` is refused) and
lies in its declared range. Values are resolved in layers, later ones winning: the field
defaults, a preset, the resumed run's ``config.yaml``, a ``--config`` file (YAML or JSON, keys
named like the options), then the options given on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from sepvit.engine.run_folder import check_experiment_name
from sepvit.errors import ConfigError
from sepvit.models.input_sizes import check_input_size
from sepvit.utils.extras import require

AUTO = "auto"
# Keys of a command line that are not part of a run's configuration file.
COMMAND_ONLY = ("config", "preset", "resume")


def option(
    default: Any,
    help: str,
    *,
    group: str = "run",
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    ordered: bool = False,
    choices: tuple[Any, ...] | None = None,
    metavar: str | tuple[str, ...] | None = None,
    nargs: str | int | None = None,
    const: Any = None,
) -> Any:
    """A dataclass field that is also a command-line option (``--name-with-dashes``); ``ordered``: a
    pair of numbers that is a range, its first not above its second."""
    metadata = dict(
        help=help,
        group=group,
        low=low,
        high=high,
        low_open=low_open,
        high_open=high_open,
        ordered=ordered,
        choices=choices,
        metavar=metavar,
        nargs=nargs,
        const=const,
    )
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(value) for value in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        inner = type_name(args[0])
        return f"a list of {inner}s" if args[-1] is Ellipsis else f"{len(args)} {inner}s"
    return {type(None): "none", bool: "true/false", int: "an integer", float: "a number"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``; strings from the command line or YAML are parsed. ValueError if not."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value in allowed:
            return value
        raise ValueError(f"expected {type_name(hint)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        for arg in sorted(args, key=lambda a: typing.get_origin(a) is not Literal):  # literals first
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except ValueError:
                continue
        raise ValueError(f"expected {type_name(hint)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)):
            value = [value]
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ValueError(f"expected {type_name(hint)}, got {value!r}")
        return tuple(coerce(item, args[0]) for item in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.lower() in ("true", "yes", "on")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str and isinstance(value, str):
        return value
    raise ValueError(f"expected {type_name(hint)}, got {value!r}")


def _check_range(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{flag_name(name)} must be a finite number, got {item}")
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        low, high = meta.get("low"), meta.get("high")
        below = low is not None and (item <= low if meta.get("low_open") else item < low)
        above = high is not None and (item >= high if meta.get("high_open") else item > high)
        if below or above:
            left = "(" if meta.get("low_open") else "["
            right = ")" if meta.get("high_open") else "]"
            span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
            raise ConfigError(f"{flag_name(name)} must lie in {span}, got {item}")
    if meta.get("ordered") and value[0] > value[1]:
        first, second = meta.get("metavar") or ("MIN", "MAX")
        raise ConfigError(f"{flag_name(name)} takes {first} then {second}, got {value[0]} > {value[1]}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{flag_name(name)} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclasses.dataclass
class TrainConfig:
    """Options every task's training shares: the run, the data loader, the optimisation."""

    # Fields that are an input side in pixels, checked against the model's sensible sizes.
    INPUT_SIDES: ClassVar[tuple[str, ...]] = ()

    # -- run
    output: str = option("runs", "folder under which each run gets its own folder", metavar="DIR")
    experiment: str | None = option(None, "name of the run folder (default: <task>-<model>-<data>-<time>)")
    seed: int = option(42, "random seed for initialisation, data order and augmentation")
    device: str = option(AUTO, "'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)")
    log_interval: int = option(50, "optimizer steps between progress lines when not on a terminal", low=1)
    val_interval: int = option(
        1, "epochs between validations (the last epoch is always validated; the best checkpoint is chosen "
        "among validated epochs)", low=1,
    )  # fmt: skip
    tensorboard: bool = option(True, "write TensorBoard event files to <run>/tensorboard")
    # -- data
    batch_size: int = option(128, "images per process and step", group="data", low=1)
    workers: int | Literal["auto"] = option(
        AUTO,
        "data-loading processes per training process (auto: 0 with 2 or fewer CPU cores, "
        "else min(8, cores // processes - 1))",
        group="data",
        low=0,
    )
    limit_train: int | None = option(None, "use only the first N training images", group="data", low=1)
    limit_val: int | None = option(None, "use only the first N validation images", group="data", low=1)
    # -- model
    model: str = option("sepvit_lite", "model name: ours (sepvit_*, sv_*) or any timm model", group="model")
    drop_path: float | Literal["auto"] = option(
        AUTO, "stochastic depth rate of the model", group="model", low=0, high=1, high_open=True
    )
    channels_last: bool = option(False, "use channels-last memory format", group="model")
    sync_bn: bool = option(
        False, "synchronise BatchNorm statistics across processes (timm's convert_sync_batchnorm; GPUs only)",
        group="model",
    )  # fmt: skip
    compile: bool = option(False, "compile the model with torch.compile", group="model")
    # -- optimisation
    epochs: int = option(300, "number of epochs", group="optimization", low=1)
    opt: str = option("adamw", "timm optimizer name (create_optimizer_v2)", group="optimization")
    lr: float | None = option(None, "peak learning rate", group="optimization", low=0, low_open=True)
    weight_decay: float | Literal["auto"] = option(
        AUTO,
        "weight decay, not applied to biases, norms and the model's no_weight_decay() tensors",
        group="optimization",
        low=0,
    )
    sched: str = option(
        "cosine", "timm learning-rate schedule (cosine, multistep, poly, ...)", group="optimization"
    )
    warmup_epochs: float | Literal["auto"] = option(
        AUTO, "linear warm-up epochs", group="optimization", low=0
    )
    warmup_steps: int | None = option(
        None, "linear warm-up in optimizer steps (instead of --warmup-epochs)", group="optimization", low=0
    )
    warmup_lr: float = option(1e-6, "learning rate at the start of warm-up", group="optimization", low=0)
    min_lr: float = option(1e-5, "learning rate at the end of the schedule", group="optimization", low=0)
    decay_milestones: tuple[int, ...] = option(
        (8, 11), "multistep: epochs at which the lr is multiplied by --decay-rate", group="optimization",
        nargs="+",
    )  # fmt: skip
    decay_rate: float = option(
        0.1, "multistep: lr factor at each milestone; poly: the power", group="optimization", low=0,
        low_open=True,
    )  # fmt: skip
    clip_grad: float | Literal["auto"] | None = option(
        AUTO, "clip the gradient norm to this; 'none' turns it off", group="optimization", low=0,
        low_open=True,
    )  # fmt: skip
    accum_steps: int = option(1, "micro-batches accumulated per optimizer step", group="optimization", low=1)
    model_ema: bool = option(
        True, "keep an exponential moving average of the weights (timm ModelEmaV3), evaluated too",
        group="optimization",
    )  # fmt: skip
    ema_decay: float = option(
        0.9998, "EMA decay (with timm's warm-up of the decay)", group="optimization", low=0, high=1,
        high_open=True,
    )  # fmt: skip
    ema_warmup_power: float = option(
        2 / 3, "power of timm's EMA decay warm-up, decay = min(ema_decay, 1 - (1 + step) ** -power): "
        "at step t the EMA averages about the last t ** power steps",
        group="optimization", low=0, low_open=True, high=1,
    )  # fmt: skip
    amp: Literal["auto", "none", "bf16", "fp16"] = option(
        AUTO,
        "mixed precision: 'none', 'bf16' or 'fp16' (fp16 on a GPU only; auto: bf16 on a GPU that "
        "supports it, none on the CPU)",
        group="optimization",
        choices=(AUTO, "none", "bf16", "fp16"),
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            try:
                value = coerce(value, hints[spec.name])
            except ValueError as error:
                raise ConfigError(f"{flag_name(spec.name)}: {error}") from None
            _check_range(spec.name, value, spec.metadata)
            object.__setattr__(self, spec.name, value)
        if self.experiment is not None:
            check_experiment_name(self.experiment)
        for name in self.INPUT_SIDES:
            side = getattr(self, name)
            if isinstance(side, int):
                check_input_size(self.model, (side,), flag_name(name))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML types (lists for tuples), as written to ``config.yaml``."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def field_names(config_type: type[TrainConfig]) -> list[str]:
    return [spec.name for spec in dataclasses.fields(config_type)]


def read_config_file(path: str | Path, config_type: type[TrainConfig]) -> dict[str, Any]:
    """Options from a YAML or JSON file, keys normalised to field names; unknown keys are refused."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        yaml = require("yaml", "train")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from error
    except (ValueError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:] or 'YAML'}: {reason}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    misplaced = sorted(set(values) & set(COMMAND_ONLY))
    if misplaced:
        raise ConfigError(
            f"config file {path}: {', '.join(misplaced)} cannot be set in a config file; "
            f"pass {' '.join(flag_name(key) for key in misplaced)} on the command line"
        )
    unknown = sorted(set(values) - set(field_names(config_type)))
    if unknown:
        raise ConfigError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return values


def build_config(
    config_type: type[TrainConfig],
    options: Mapping[str, Any],
    *,
    preset: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    resumed: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Defaults < preset < resumed run's config < config file < options; checked on construction."""
    values: dict[str, Any] = {}
    for layer in (
        preset or {},
        resumed or {},
        read_config_file(config_file, config_type) if config_file else {},
        options,
    ):
        values.update(layer)
    unknown = sorted(set(values) - set(field_names(config_type)))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    return config_type(**values)


def resolve_config(
    config_type: type[TrainConfig],
    options: Mapping[str, Any],
    *,
    preset: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    resume: str | Path | None = None,
    run_defining: tuple[str, ...] = (),
) -> tuple[TrainConfig, Path | None]:
    """The configuration ``options`` (the values a user gave) ask for, and the run folder ``resume``
    names (if any).

    A resumed run starts from its saved ``config.yaml``; options given now apply (a longer
    schedule, another learning rate), except those that define the run (``run_defining``: the
    model, the data, the batch), which are refused when they differ.
    """
    from sepvit.engine.checkpoint import find_run

    if not resume:
        return build_config(config_type, options, preset=preset, config_file=config_file), None
    run_dir = find_run(resume)
    saved = read_config_file(run_dir / "config.yaml", config_type)
    config = build_config(config_type, options, config_file=config_file, resumed=saved)
    before = config_type(**saved)
    changed = [
        f"{flag_name(key)} from {getattr(before, key)} to {getattr(config, key)}"
        for key in run_defining
        if getattr(config, key) != getattr(before, key)
    ]
    if changed:
        raise ConfigError(
            f"--resume {run_dir}: cannot change {', '.join(changed)} of a run; start a new run "
            "(--pretrained on its weights) instead"
        )
    return config, run_dir
