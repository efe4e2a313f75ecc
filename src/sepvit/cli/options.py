"""Options shared by the commands: the typed configurations as flags, and the options every command
spells the same way (``--json``, ``--device``, ``--img-size``, counts that must be positive).

Conventions: ``--json`` prints a JSON document on standard output (logs go to standard error);
``--output`` names a folder, except where a command writes exactly one file, whose help says so;
sizes are ``--img-size H [W]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sepvit.engine.config import TrainConfig, coerce, field_names, flag_name, resolve_config, type_name


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


positive = _at_least(1)
non_negative = _at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def output_folder(text: str) -> Path:
    """A folder to write into: refused at once when a file of that name exists, not after the work."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def output_file(text: str) -> Path:
    """A file to write: refused at once when a folder of that name exists, not after the work."""
    path = Path(text)
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file name")
    return path


output_folder.__name__, output_file.__name__ = "folder", "file"


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, default=str), flush=True)


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on standard output")


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help="'cpu', 'cuda', 'cuda:N' or 'auto'")


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """Options every eval/predict command shares (classification, detection, segmentation)."""
    add_json(parser)
    add_device(parser)


def add_img_size(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--img-size", type=positive, nargs="+", metavar="N", help=f"H [W]: {help_text}")


def img_size(args: argparse.Namespace, models: Iterable[str]) -> tuple[int, int] | None:
    """``--img-size H [W]`` as (H, W) (W defaults to H), refused outside any of ``models``' sensible
    sizes (:mod:`sepvit.models.input_sizes`)."""
    from sepvit.errors import ConfigError
    from sepvit.models.input_sizes import check_input_size

    if args.img_size is None:
        return None
    if len(args.img_size) not in (1, 2):
        raise ConfigError("--img-size takes H or H W")
    size = args.img_size[0], args.img_size[-1]
    for model in models:
        check_input_size(model, size)
    return size


def add_options(parser: argparse.ArgumentParser, config_type: type[TrainConfig]) -> None:
    """One option per field, grouped, with the default in the help and left out of the namespace.

    Leaving defaults out (``argparse.SUPPRESS``) tells the options a user typed apart from the
    defaults, so a preset, a resumed run or a config file can fill in the rest.
    """
    hints = typing.get_type_hints(config_type)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in dataclasses.fields(config_type):
        meta = spec.metadata
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], parser.add_argument_group(meta["group"])
        )
        default = spec.default
        if isinstance(default, tuple):
            default = " ".join(map(str, default))
        help_text = meta["help"] if default is None else f"{meta['help']} (default: {default})"
        kwargs: dict[str, Any] = {
            "dest": spec.name,
            "default": argparse.SUPPRESS,
            "help": help_text.replace("%", "%%"),
        }
        hint = hints[spec.name]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=_argparse_type(hint), metavar=meta["metavar"], nargs=meta["nargs"])
            if meta["const"] is not None:
                kwargs["const"] = meta["const"]
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
        group.add_argument(flag_name(spec.name), **kwargs)


def _argparse_type(hint: Any):
    item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint

    def parse(text: str) -> Any:
        try:
            return coerce(text, item)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = type_name(item)
    return parse


def add_command_options(parser: argparse.ArgumentParser, presets: Mapping[str, Any]) -> None:
    """``--config``, ``--preset`` and ``--resume``: where values come from, not values themselves."""
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--config", metavar="FILE", default=None, help="YAML or JSON file whose keys stand in for the options"
    )
    group.add_argument(
        "--preset",
        choices=tuple(presets),
        default=None,
        help="named set of options applied before --config and the flags",
    )
    group.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="continue a run exactly from its folder: its config.yaml is reused; --epochs, --lr and "
        "other schedule or logging options given here are applied, options that define the run are refused",
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="print the run's outcome as JSON on standard output (the log goes to standard error)",
    )


def config_from_args(
    config_type: type[TrainConfig],
    namespace: argparse.Namespace,
    presets: Mapping[str, Mapping[str, Any]],
    run_defining: tuple[str, ...],
    default_preset: str | None = None,
):
    """The configuration a command line asks for, and the run folder it resumes (if any); see
    :func:`sepvit.engine.config.resolve_config`."""
    explicit = {key: value for key, value in vars(namespace).items() if key in field_names(config_type)}
    preset_name = getattr(namespace, "preset", None) or default_preset
    resume = getattr(namespace, "resume", None)
    return resolve_config(
        config_type,
        explicit,
        preset=presets[preset_name] if preset_name and not resume else None,
        config_file=getattr(namespace, "config", None),
        resume=resume,
        run_defining=run_defining,
    )
