"""The train/demo/eval/predict sub-commands: help, config files, presets, exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from sepvit.classify.config import PRESETS, RUN_DEFINING, ClassifyConfig, apply_recipe_defaults
from sepvit.cli import build_parser, main
from sepvit.cli.options import config_from_args
from sepvit.engine.config import AUTO, flag_name


def resolve_train_config(args: argparse.Namespace) -> ClassifyConfig:
    return config_from_args(ClassifyConfig, args, PRESETS, RUN_DEFINING)[0]


def _help(command: str, capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["train", "demo"])
def test_train_help_explains_every_option_and_its_default(
    command: str, capsys: pytest.CaptureFixture
) -> None:
    text = _help(command, capsys)
    for field in dataclasses.fields(ClassifyConfig):
        assert flag_name(field.name) in text, field.name
    assert "(default: rand-m9-mstd0.5-inc1)" in text and "(default: 300)" in text
    assert "exit codes:" in text and "torchrun" in text


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("eval", ["--data", "--confusion-matrix", "--json", "--batch-size", "--model"]),
        ("predict", ["--top-k", "--json", "--device", "--num-classes"]),
    ],
)
def test_eval_and_predict_help(command: str, options: list[str], capsys: pytest.CaptureFixture) -> None:
    text = _help(command, capsys)
    for option in options:
        assert option in text
    assert "(default: 5)" in text if command == "predict" else "(default: 256)" in text


def test_config_file_stands_in_for_flags_and_flags_win(tmp_path: Path) -> None:
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(
        yaml.safe_dump({"epochs": 7, "batch-size": 24, "scale": [0.5, 1.0], "model": "test_vit"})
    )
    args = build_parser().parse_args(["train", "--config", str(config_file), "--epochs", "9"])
    config = resolve_train_config(args)
    assert (config.epochs, config.batch_size, config.scale, config.model) == (
        9,
        24,
        (0.5, 1.0),
        "test_vit",
    )
    json_file = tmp_path / "recipe.json"
    json_file.write_text(json.dumps({"lr": 0.01}))
    assert resolve_train_config(build_parser().parse_args(["train", "--config", str(json_file)])).lr == 0.01


def test_preset_then_config_then_flags() -> None:
    config = resolve_train_config(build_parser().parse_args(["demo", "--epochs", "1"]))
    assert config.img_size == PRESETS["digits-demo"]["img_size"] and config.epochs == 1


def test_bad_config_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    unknown = tmp_path / "bad.yaml"
    unknown.write_text("epochs: 3\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(unknown)]) == 2
    assert "unknown option(s) learning_rate" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--preset", "imagenet-in-a-minute"])
    assert "invalid choice: 'imagenet-in-a-minute'" in capsys.readouterr().err


def test_recipe_defaults_follow_model_size() -> None:
    def resolved(model: str) -> dict:
        return dataclasses.asdict(apply_recipe_defaults(ClassifyConfig(model=model), world_size=1))

    lite, base, m0 = resolved("sepvit_lite"), resolved("sepvit_base"), resolved("sv_efficientvit_m0")
    assert (lite["drop_path"], lite["weight_decay"], lite["warmup_epochs"]) == (0.1, 0.05, 5)
    assert (base["drop_path"], base["weight_decay"], base["warmup_epochs"]) == (0.5, 0.1, 20)
    assert (m0["weight_decay"], m0["clip_grad"]) == (0.025, 0.02)
    assert lite["lr"] == pytest.approx(1e-3 * 128 / 1024)  # the linear rule of the papers (1e-3 at 1024)
    assert lite["hflip"] == 0.0 and lite["crop_pct"] == 1.0  # digits: no flips, no crop
    assert lite["clip_grad"] is None and AUTO not in (lite["drop_path"], lite["weight_decay"])


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "many"])
    assert exit_info.value.code == 2
    assert "argument --epochs: expected an integer, got 'many'" in capsys.readouterr().err
    assert main(["train", "--model", "sepvit_lyte", "--output", str(tmp_path)]) == 2
    assert (
        "unknown model 'sepvit_lyte'" in capsys.readouterr().err and not (tmp_path / "sepvit_lyte").exists()
    )
    assert main(["train", "--batch-size", "0"]) == 2
    assert main(["predict", str(tmp_path / "missing.safetensors"), "x.png"]) == 2
    assert (
        main(
            [
                "train",
                "--amp",
                "fp16",
                "--device",
                "cpu",
                "--model",
                "test_vit",
                "--img-size",
                "32",
                "--output",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "--amp fp16 needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_classify_commands_and_their_short_forms_are_one(command: str) -> None:
    arguments = {"train": [], "eval": ["best.safetensors"], "predict": ["best.safetensors", "a.png"]}[command]
    grouped = build_parser().parse_args(["classify", command, *arguments])
    short = build_parser().parse_args([command, *arguments])
    assert grouped.func is short.func and vars(grouped) == {
        **vars(short),
        "command": "classify",
        "action": command,
    }
