"""Options of ``sepvit train``: their defaults and help, presets, config files and per-model recipes.

A run's configuration is resolved in layers, later ones winning: the option defaults, a preset
(``--preset``), a config file (``--config``, YAML or JSON, keys named like the options), then the
flags given on the command line. Options whose default is ``"auto"`` are filled in last from the
model size (drop path, weight decay, warm-up, gradient clipping), the data (flips, crop) and the
machine (mixed precision, workers). The resolved configuration is saved with each run as
``config.yaml`` and can be passed back with ``--config``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sepvit.cli import CliError
from sepvit.train.data import DIGITS_DATA

AUTO = "auto"


@dataclass(frozen=True)
class Option:
    """One command-line option; ``dest`` is its config-file key."""

    dest: str
    default: Any
    help: str
    type: Any = None
    choices: tuple | None = None
    flag: bool = False  # a boolean with --name / --no-name
    nargs: str | int | None = None
    metavar: str | None = None

    @property
    def flag_name(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "") else float(text)


def _auto_or(convert):
    def parse(text: str):
        return AUTO if text == AUTO else convert(text)

    parse.__name__ = convert.__name__
    return parse


_auto_float = _auto_or(float)
_auto_int = _auto_or(int)

TRAIN_OPTION_GROUPS: dict[str, list[Option]] = {
    "run": [
        Option("config", None, "YAML or JSON file whose keys stand in for these options", metavar="FILE"),
        Option(
            "preset",
            None,
            "named set of options applied before --config and the flags: "
            "'digits-demo' is a short sepvit_lite run on digits (docs/training.md)",
        ),
        Option("output", "runs", "folder under which each run gets its own folder", metavar="DIR"),
        Option("experiment", None, "name of the run folder (default: <model>-<data>-<date-time>)"),
        Option(
            "resume",
            None,
            "continue a run exactly from its folder (or its last.safetensors): "
            "the run's config.yaml is reused, flags given here override it",
            metavar="RUN",
        ),
        Option("seed", 42, "random seed for initialisation, data order, augmentation and mixup", type=int),
        Option("device", AUTO, "'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)"),
        Option("log_interval", 50, "optimizer steps between progress lines when not on a terminal", type=int),
        Option("tensorboard", True, "write TensorBoard event files to <run>/tensorboard", flag=True),
    ],
    "data": [
        Option(
            "data",
            "digits",
            "'digits' (scikit-learn's bundled 8×8 digits, 80/20 stratified split "
            "with random_state=0; val is the test split), 'digits-val' (digits' train split alone, "
            "split again the same way, for choosing a recipe without the test images) or a folder "
            "with train/<class>/* and val/<class>/* images",
            metavar="DIGITS|DIR",
        ),
        Option(
            "img_size",
            AUTO,
            "input size in pixels; also the size the model's window grid is built "
            "for (auto: the model's default, 224 for ours)",
            type=_auto_int,
        ),
        Option("batch_size", 128, "images per process and step (global batch = this × processes)", type=int),
        Option(
            "workers",
            AUTO,
            "data-loading processes per training process "
            "(auto: 0 with 2 or fewer CPU cores, else min(8, cores // processes - 1))",
            type=_auto_int,
        ),
        Option("limit_train", None, "use only the first N training images (quick checks)", type=int),
        Option("limit_val", None, "use only the first N validation images (quick checks)", type=int),
    ],
    "augmentation": [
        Option(
            "aa",
            "rand-m9-mstd0.5-inc1",
            "timm auto-augment policy (RandAugment by default); 'none' turns it off",
        ),
        Option(
            "scale",
            (0.08, 1.0),
            "random-resized-crop area range",
            type=float,
            nargs=2,
            metavar=("MIN", "MAX"),
        ),
        Option(
            "hflip",
            AUTO,
            "horizontal flip probability (auto: 0 for digits, 0.5 for folders)",
            type=_auto_float,
        ),
        Option("reprob", 0.25, "random erasing probability", type=float),
        Option("mixup", 0.8, "mixup alpha (0 turns mixup off)", type=float),
        Option("cutmix", 1.0, "cutmix alpha (0 turns cutmix off)", type=float),
        Option("mixup_prob", 1.0, "probability of applying mixup or cutmix to a batch", type=float),
        Option("smoothing", 0.1, "label smoothing", type=float),
        Option(
            "crop_pct",
            AUTO,
            "centre-crop fraction at evaluation (auto: 1.0 for digits, the model's default for folders)",
            type=_auto_float,
        ),
    ],
    "model": [
        Option("model", "sepvit_lite", "model name: ours (sepvit_*, sv_*) or any timm model"),
        Option(
            "drop_path",
            AUTO,
            "stochastic depth rate (auto: per model size: SepViT Lite/T/S/B 0.1/0.2/0.3/0.5)",
            type=_auto_float,
        ),
        Option(
            "finetune",
            None,
            "initialise from these weights (safetensors or a .pth state dict); "
            "a classifier of another shape is left freshly initialised",
            metavar="CKPT",
        ),
        Option("channels_last", False, "use channels-last memory format", flag=True),
        Option("compile", False, "compile the model with torch.compile", flag=True),
    ],
    "optimization": [
        Option("epochs", 300, "number of epochs", type=int),
        Option("opt", "adamw", "timm optimizer name (create_optimizer_v2)"),
        Option(
            "lr",
            None,
            "peak learning rate (default: lr_base × (global batch / lr_base_size), "
            "square-root scaling for Adam-type optimizers, linear otherwise)",
            type=_float_or_none,
        ),
        Option("lr_base", 1e-3, "learning rate at lr_base_size images per step", type=float),
        Option("lr_base_size", 1024, "global batch size that lr_base refers to", type=int),
        Option(
            "weight_decay",
            AUTO,
            "AdamW weight decay, not applied to window tokens, norms and "
            "biases (auto: 0.1 for SepViT-B, 0.025 for EfficientViT, else 0.05)",
            type=_auto_float,
        ),
        Option("sched", "cosine", "timm learning-rate schedule, stepped every optimizer update"),
        Option(
            "warmup_epochs",
            AUTO,
            "linear warm-up epochs (auto: 20 for SepViT-B, else 5, at most a tenth of the epochs)",
            type=_auto_float,
        ),
        Option("warmup_lr", 1e-6, "learning rate at the start of warm-up", type=float),
        Option("min_lr", 1e-5, "learning rate at the end of the cosine", type=float),
        Option(
            "clip_grad",
            AUTO,
            "clip the gradient norm to this (auto: 0.02 for EfficientViT, else none); 'none' turns it off",
            type=_auto_or(_float_or_none),
        ),
        Option("accum_steps", 1, "micro-batches accumulated per optimizer step", type=int),
        Option(
            "model_ema",
            True,
            "keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too",
            flag=True,
        ),
        Option("ema_decay", 0.9998, "EMA decay (with timm's warm-up of the decay)", type=float),
        Option(
            "amp",
            AUTO,
            "mixed precision: 'none', 'bf16' or 'fp16' (GPU only; auto: bf16 on a GPU "
            "that supports it, none on CPU)",
            choices=(AUTO, "none", "bf16", "fp16"),
        ),
    ],
}

TRAIN_OPTIONS = {option.dest: option for group in TRAIN_OPTION_GROUPS.values() for option in group}

# Options that belong to a run's command line but not to its saved configuration.
RUN_ONLY_KEYS = ("config", "resume")

PRESETS: dict[str, dict[str, Any]] = {
    # sepvit_lite with the paper's 7×7 windows on the 8×8 digits upsampled to 32 px (a 2×2 window
    # grid in stage 1), sized for under 3 minutes on 2 CPU cores: batches of 64 (small batches
    # leave the cores idle), a moderate peak learning rate (3e-3 swung the test accuracy by ±0.3
    # points between seeds), random resized crops and one geometric RandAugment op per image
    # (timm's 'weights' choice: mostly rotations, shears and shifts, which handwriting varies by;
    # the full op list with inversions and solarizing hurts), no mixup (it slowed learning on the
    # validation split, digits-val), drop path 0.1, and EMA weights, which the demo evaluates.
    "digits-demo": {
        "model": "sepvit_lite",
        "data": "digits",
        "img_size": 32,
        "epochs": 45,
        "batch_size": 64,
        "lr": 1.5e-3,
        "warmup_epochs": 1,
        "aa": "rand-m5-n1-mstd0.5-tweights",
        "scale": (0.85, 1.0),
        "reprob": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "smoothing": 0.1,
        "drop_path": 0.1,
        "model_ema": True,
        "ema_decay": 0.998,
        "amp": "none",
    },
}

# Recipe defaults by model size (paper settings where the paper gives them); first match wins.
SIZE_RECIPES: list[tuple[str, dict[str, Any]]] = [
    ("sepvit_lite*", {"drop_path": 0.1, "weight_decay": 0.05, "warmup_epochs": 5}),
    ("sepvit_tiny*", {"drop_path": 0.2, "weight_decay": 0.05, "warmup_epochs": 5}),
    ("sepvit_small*", {"drop_path": 0.3, "weight_decay": 0.05, "warmup_epochs": 5}),
    ("sepvit_base*", {"drop_path": 0.5, "weight_decay": 0.1, "warmup_epochs": 20}),
    ("*efficientvit_m*", {"drop_path": 0.0, "weight_decay": 0.025, "warmup_epochs": 5, "clip_grad": 0.02}),
    ("*mobilevitv2*", {"drop_path": 0.0, "weight_decay": 0.05, "warmup_epochs": 5}),
    ("*", {"drop_path": 0.1, "weight_decay": 0.05, "warmup_epochs": 5}),
]


def add_options(parser: argparse.ArgumentParser, groups: dict[str, list[Option]]) -> None:
    """Add options whose defaults are shown in the help but left out of the parsed namespace.

    Leaving them out (``argparse.SUPPRESS``) tells flags the user typed apart from defaults, so a
    preset or config file can fill in the rest.
    """
    for title, options in groups.items():
        group = parser.add_argument_group(title)
        for option in options:
            default = option.default
            if isinstance(default, tuple):
                default = " ".join(str(value) for value in default)
            help_text = option.help if default is None else f"{option.help} (default: {default})"
            help_text = help_text.replace("%%", "%").replace("%", "%%")
            kwargs: dict[str, Any] = {"dest": option.dest, "default": argparse.SUPPRESS, "help": help_text}
            if option.flag:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs.update(
                    type=option.type, choices=option.choices, nargs=option.nargs, metavar=option.metavar
                )
            group.add_argument(option.flag_name, **kwargs)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML or JSON file, keys normalised to option names and checked."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise CliError(f"cannot read config file {path}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"config file {path} must hold a mapping of option names to values")
    config = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(config) - set(TRAIN_OPTIONS))
    if unknown:
        raise CliError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    for key, value in config.items():
        if isinstance(value, list):
            config[key] = tuple(value)
    return config


def resolve_train_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then preset, then the resumed run's config or ``--config``, then explicit flags."""
    explicit = {key: value for key, value in vars(args).items() if key in TRAIN_OPTIONS}
    config = {dest: option.default for dest, option in TRAIN_OPTIONS.items()}
    preset = explicit.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise CliError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        config.update(PRESETS[preset])
    if explicit.get("resume"):
        from sepvit.train.checkpoint import resolve_run_dir

        config.update(load_config_file(resolve_run_dir(explicit["resume"]) / "config.yaml"))
    if explicit.get("config"):
        config.update(load_config_file(explicit["config"]))
    config.update(explicit)
    for key in ("img_size", "batch_size", "epochs", "accum_steps", "log_interval"):
        value = config[key]
        if value != AUTO and (not isinstance(value, int) or value < 1):
            raise CliError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")
    return config


def apply_recipe_defaults(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Fill ``auto`` options from the model size, the data and the machine; returns a new dict."""
    config = dict(config)
    recipe = dict(next(r for pattern, r in SIZE_RECIPES if fnmatch.fnmatch(config["model"], pattern)))
    recipe["warmup_epochs"] = min(recipe["warmup_epochs"], config["epochs"] // 10)
    recipe.setdefault("clip_grad", None)
    for key, value in recipe.items():
        if config.get(key) == AUTO:
            config[key] = value
    is_digits = config["data"] in DIGITS_DATA
    if config["hflip"] == AUTO:
        config["hflip"] = 0.0 if is_digits else 0.5
    if config["workers"] == AUTO:
        cores = os.cpu_count() or 1
        config["workers"] = 0 if cores <= 2 else min(8, max(0, cores // world_size - 1))
    if config["lr"] is None:
        ratio = config["batch_size"] * config["accum_steps"] * world_size / config["lr_base_size"]
        scale = math.sqrt(ratio) if "adam" in config["opt"].lower() or "lamb" in config["opt"] else ratio
        config["lr"] = config["lr_base"] * scale
    if is_digits and config["crop_pct"] == AUTO:
        config["crop_pct"] = 1.0
    return config


def saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration as written to ``config.yaml``: plain YAML types, run-only keys left out."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in config.items()
        if key not in RUN_ONLY_KEYS
    }
