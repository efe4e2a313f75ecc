"""Property-based checks of every input boundary: generated bad option values for every command,
malformed weights-file and shard metadata, and odd image-folder layouts.

Whatever is generated, a command ends with exit code 2 and one line on standard error, writes
nothing and changes no file; a reader raises the library's own error or returns a checked value.
The examples per property are bounded (see ``PROFILE``) so that the suite takes about two minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from sepvit.classify.config import ClassifyConfig
from sepvit.classify.data import scan_image_folders, shard_label
from sepvit.cli import build_parser, main, options
from sepvit.dense.config import DetectConfig, SegmentConfig
from sepvit.engine import checkpoint as ckpt
from sepvit.engine.config import flag_name
from sepvit.engine.shards import INFO_FILE, read_info
from sepvit.errors import CheckpointError, DataError
from sepvit.models.input_sizes import LARGEST

PROFILE = "sepvit-inputs"
settings.register_profile(
    PROFILE,
    max_examples=12,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
bounded = settings.get_profile(PROFILE)

# Words that no option reads as a number, a boolean, 'auto' or 'none' (no vowel but y).
NOT_A_NUMBER = st.from_regex(r"[bcdfghjkqrsvwxz]{1,6}", fullmatch=True)
CONFIGS = {"train": ClassifyConfig, "demo": ClassifyConfig, "detect train": DetectConfig,
           "segment train": SegmentConfig}  # fmt: skip
# Positional arguments that let each command reach its options; none of these paths exists.
POSITIONALS = {
    "eval": ["missing.safetensors"],
    "predict": ["missing.safetensors", "missing.png"],
    "data pack": ["missing-folder", "missing-shards"],
    "bench": ["sepvit_lite"],
    "export": ["sepvit_lite"],
    "explain": ["missing.safetensors", "missing.png"],
    "detect eval": ["missing.safetensors"],
    "detect predict": ["missing.safetensors", "missing.png"],
    "segment eval": ["missing.safetensors"],
    "segment predict": ["missing.safetensors", "missing.png"],
}
# ``classify train|eval|predict`` are the same parsers as ``train|eval|predict``.
NOT_GENERATED = ("classify",)


def _commands() -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subcommands:
            for name, sub in action.choices.items():
                walk(sub, [*path, name])
        if not subcommands and path and path[0] not in NOT_GENERATED:
            found[" ".join(path)] = parser

    walk(build_parser(), [])
    return found


def _below(hint: Any, low: float, open_: bool) -> st.SearchStrategy:
    if hint is int:
        return st.integers(min_value=int(low) - 10**6, max_value=int(low) - (0 if open_ else 1))
    return st.floats(min_value=low - 1e6, max_value=low, exclude_max=not open_, allow_nan=False)


def _above(hint: Any, high: float, open_: bool) -> st.SearchStrategy:
    if hint is int:
        return st.integers(min_value=int(high) + (0 if open_ else 1), max_value=int(high) + 10**6)
    return st.floats(min_value=high, max_value=high + 1e6, exclude_min=not open_, allow_nan=False)


def _number_type(hint: Any) -> Any:
    """int or float when the field holds a number (possibly also 'auto' or None), else None."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    for candidate in (hint, *args):
        if typing.get_origin(candidate) is tuple:
            candidate = typing.get_args(candidate)[0]
        if candidate in (int, float):
            return candidate
    return None


def _bad_field_values(config_type: type, spec: dataclasses.Field) -> st.SearchStrategy | None:
    """Values the field refuses, as the strings a command line gives, or None when any string goes."""
    meta, hint = spec.metadata, typing.get_type_hints(config_type)[spec.name]
    number = _number_type(hint)
    bad: list[st.SearchStrategy] = []
    if spec.name == "experiment":
        bad.append(st.sampled_from(["..", "../escape", "/tmp/elsewhere", "a/../../b", "."]))
    if meta["choices"]:
        bad.append(NOT_A_NUMBER.filter(lambda text: text not in meta["choices"]))
    if number is not None:
        bad.append(NOT_A_NUMBER)
        bad.append(st.sampled_from(["nan", "inf", "-inf"]))
        if meta["low"] is not None:
            bad.append(_below(number, meta["low"], meta["low_open"]))
        if meta["high"] is not None:
            bad.append(_above(number, meta["high"], meta["high_open"]))
        if spec.name in config_type.INPUT_SIDES:
            bad.append(st.integers(min_value=LARGEST + 1, max_value=10**6))
    if not bad:
        return None
    count = meta["nargs"] if isinstance(meta["nargs"], int) else 1
    return st.one_of(bad).map(lambda value: [str(value)] * count)


def _bad_option_values(parser: argparse.ArgumentParser, config_type: type | None) -> dict[str, Any]:
    """Flag → strategy of bad values (lists of strings) for every option that has a refusal rule."""
    fields = {spec.name: spec for spec in dataclasses.fields(config_type)} if config_type else {}
    found: dict[str, Any] = {}
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        flag = action.option_strings[-1]
        if action.dest in fields:
            strategy = _bad_field_values(config_type, fields[action.dest])
        elif action.type in (options.positive, options.non_negative):
            low = 1 if action.type is options.positive else 0
            strategy = st.one_of(NOT_A_NUMBER, st.integers(max_value=low - 1, min_value=-(10**9))).map(str)
            if action.dest == "img_size":
                strategy = st.one_of(strategy, st.integers(min_value=LARGEST + 1, max_value=10**6).map(str))
            strategy = strategy.map(lambda value: [value])
        elif action.type is options.positive_float:
            strategy = st.one_of(NOT_A_NUMBER, st.sampled_from(["nan", "0", "-1", "-inf"])).map(lambda v: [v])
        elif action.choices:
            strategy = NOT_A_NUMBER.filter(lambda text, c=action.choices: text not in c).map(lambda v: [v])
        elif action.type is options.output_folder:
            strategy = st.just(["a-file"])
        elif action.type is options.output_file:
            strategy = st.just(["a-folder"])
        else:
            strategy = None
        if strategy is not None:
            found[flag] = strategy
    return found


CASES = [
    (command, flag, strategy)
    for command, parser in _commands().items()
    for flag, strategy in _bad_option_values(parser, CONFIGS.get(command)).items()
]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
    }


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder with one file and one folder that outputs could collide with; a command that
    accepted a value would fail the test instead of training or measuring."""
    (tmp_path / "a-file").write_text("kept\n")
    (tmp_path / "a-folder").mkdir()
    monkeypatch.chdir(tmp_path)

    def accepted(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a bad value was accepted")

    monkeypatch.setattr("sepvit.runs.run_training", accepted)
    monkeypatch.setattr("sepvit.cli.models.print_table", accepted)
    monkeypatch.setattr("sepvit.bench.measure.run_benchmark", accepted)
    monkeypatch.setattr("sepvit.cli.ablate.ablate_command", accepted)
    return tmp_path


def run_refused(argv: list[str]) -> str:
    """Run the command in this process; returns its standard error after checking it was refused."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    text = err.getvalue()
    assert code == 2, (argv, code, text)
    assert text.count("\n") == 1 and text.startswith("sepvit"), (argv, text)
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize(("command", "flag", "strategy"), CASES, ids=[f"{c}:{f}" for c, f, _ in CASES])
def test_every_bad_option_value_is_refused_in_one_line(
    workspace: Path, command: str, flag: str, strategy: st.SearchStrategy
) -> None:
    before = _tree(workspace)

    @settings(bounded, max_examples=6)
    @given(values=strategy)
    def refused(values: list[str]) -> None:
        run_refused([*command.split(), *POSITIONALS.get(command, []), flag, *values])
        assert _tree(workspace) == before

    refused()


def test_every_command_has_generated_options() -> None:
    """The generator knows a refusal rule for options of every command (a new command is covered)."""
    covered = {command for command, _, _ in CASES}
    assert covered == set(_commands()), set(_commands()) - covered


# -- weights files -------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
GOOD = {
    "version": 2, "task": "classify", "model": "sepvit_lite", "model_kwargs": {"num_classes": 2},
    "class_names": ["a", "b"], "input_size": [32, 32], "data_config": {"input_size": [3, 32, 32]},
}  # fmt: skip
# A stored description with one field replaced by any JSON value, or a field removed.
DESCRIPTIONS = st.one_of(
    st.tuples(st.sampled_from(sorted(GOOD)), JSON).map(lambda pair: json.dumps({**GOOD, pair[0]: pair[1]})),
    st.sampled_from(sorted(GOOD)).map(lambda key: json.dumps({k: v for k, v in GOOD.items() if k != key})),
    st.tuples(st.integers(-5, 10**6), st.integers(-5, 10**6)).map(
        lambda size: json.dumps({**GOOD, "input_size": list(size)})
    ),
    JSON.map(json.dumps),
    st.text(max_size=20),
)


@settings(bounded, max_examples=60)
@given(description=DESCRIPTIONS)
def test_weights_metadata_is_checked_or_refused(
    tmp_path_factory: pytest.TempPathFactory, description: str
) -> None:
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": ckpt.FORMAT, "sepvit": description})
    try:
        _, checked = ckpt.read_checkpoint(path)
    except CheckpointError as error:
        assert "\n" not in str(error).strip()
        return
    low, high = 16, LARGEST
    assert all(low <= side <= high for side in checked.input_size)
    assert isinstance(checked.model_kwargs, dict) and checked.class_names


# -- shards --------------------------------------------------------------------------------------
@settings(bounded, max_examples=40)
@given(label=st.binary(max_size=6) | st.integers(-100, 100).map(lambda n: str(n).encode()))
def test_shard_labels_are_class_indices_or_refused(label: bytes) -> None:
    try:
        value = shard_label({"cls": label}, "s/0", num_classes=10)
    except DataError:
        return
    assert 0 <= value < 10


@settings(bounded, max_examples=40)
@given(
    info=JSON | st.fixed_dictionaries({"classes": JSON, "splits": st.dictionaries(st.text(max_size=5), JSON)})
)
def test_shard_info_files_are_checked_or_refused(tmp_path_factory: pytest.TempPathFactory, info: Any) -> None:
    folder = tmp_path_factory.mktemp("shards")
    (folder / INFO_FILE).write_text(json.dumps(info))
    try:
        checked = read_info(str(folder))
    except DataError:
        return
    for entry in checked.get("splits", {}).values():
        assert all(os.path.basename(name) == name for name in entry.get("filenames", []))


# -- image folders -------------------------------------------------------------------------------
PNG = io.BytesIO()
Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(PNG, format="PNG")
NAMES = st.from_regex(r"\.?[a-c]{1,3}", fullmatch=True)
ENTRY = st.sampled_from(["image", "text", "broken-link", "empty-folder"])
LAYOUT = st.dictionaries(
    NAMES, st.dictionaries(NAMES.map(lambda n: n + ".png"), ENTRY, max_size=3), max_size=4
)


def _write_split(split: Path, layout: dict[str, dict[str, str]]) -> None:
    split.mkdir(parents=True)
    for class_name, files in layout.items():
        folder = split / class_name
        folder.mkdir()
        for name, kind in files.items():
            if kind == "image":
                (folder / name).write_bytes(PNG.getvalue())
            elif kind == "text":
                (folder / name).write_text("not an image")
            elif kind == "broken-link":
                (folder / name).symlink_to(folder / "nowhere")
            else:
                (folder / name).mkdir()


@settings(bounded, max_examples=30)
@given(layout=LAYOUT)
def test_image_folders_are_scanned_by_one_rule(
    tmp_path_factory: pytest.TempPathFactory, layout: dict
) -> None:
    root = tmp_path_factory.mktemp("folder")
    _write_split(root / "train", layout)
    _write_split(root / "val", layout)
    try:
        train, _ = scan_image_folders(root)
    except DataError as error:
        assert "\n" not in str(error)
        return
    assert len(train.classes) >= 2 and not any(name.startswith(".") for name in train.classes)
    visible = {name: files for name, files in layout.items() if not name.startswith(".")}
    links = [
        str(root / "train" / c / f)
        for c, files in visible.items()
        for f, kind in files.items()
        if kind == "broken-link" and not f.startswith(".")
    ]
    assert set(links) <= {path for path, _ in train.skipped}


def test_config_fields_with_rules_are_all_generated() -> None:
    """Every numeric or constrained field of every training configuration has bad values generated."""
    for config_type in (ClassifyConfig, DetectConfig, SegmentConfig):
        for spec in dataclasses.fields(config_type):
            meta = spec.metadata
            if meta["low"] is not None or meta["high"] is not None or meta["choices"]:
                assert _bad_field_values(config_type, spec) is not None, flag_name(spec.name)
