"""The engine's parts on their own: typed configuration, atomic checkpoint sets, files, messages."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
import yaml

from sepvit.classify.config import ClassifyConfig
from sepvit.cli import main
from sepvit.engine import checkpoint as ckpt
from sepvit.engine.config import build_config, read_config_file
from sepvit.engine.data import output_names
from sepvit.engine.description import RunDescription
from sepvit.errors import CheckpointError, ConfigError
from sepvit.utils import files


def test_yaml_numbers_written_as_strings_are_parsed_and_words_refused(tmp_path: Path) -> None:
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text("lr: 1e-3\nepochs: 3\nscale: [0.5, 1]\nmodel_ema: false\n")
    assert yaml.safe_load(config_file.read_text())["lr"] == "1e-3"  # what PyYAML gives
    config = build_config(ClassifyConfig, {}, config_file=config_file)
    assert (config.lr, config.epochs, config.scale, config.model_ema) == (1e-3, 3, (0.5, 1.0), False)
    config_file.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="--lr: expected a number or none, got 'fast'"):
        build_config(ClassifyConfig, {}, config_file=config_file)
    config_file.write_text("epochs: 2.5\n")
    with pytest.raises(ConfigError, match=r"--epochs: expected an integer, got 2\.5"):
        build_config(ClassifyConfig, {}, config_file=config_file)
    config_file.write_text("amp: fp8\n")
    with pytest.raises(ConfigError, match="--amp: expected 'auto' or 'none' or 'bf16' or 'fp16', got 'fp8'"):
        build_config(ClassifyConfig, {}, config_file=config_file)


def test_a_config_file_cannot_resume_or_name_another_config(tmp_path: Path) -> None:
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text("resume: runs/old\nepochs: 3\n")
    with pytest.raises(ConfigError, match="resume cannot be set in a config file; pass --resume"):
        read_config_file(config_file, ClassifyConfig)
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        read_config_file(tmp_path / "folder.yaml", ClassifyConfig)
    config_file.write_text("epochs: [3\n")
    with pytest.raises(ConfigError, match="is not valid yaml"):
        read_config_file(config_file, ClassifyConfig)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--reprob", "2", "--reprob must lie in [0, 1], got 2.0"),
        ("--smoothing", "2", "--smoothing must lie in [0, 1), got 2.0"),
        ("--ema-decay", "5", "--ema-decay must lie in [0, 1), got 5.0"),
        ("--mixup", "-1", "--mixup must lie in [0, inf], got -1.0"),
        ("--drop-path", "1.5", "--drop-path must lie in [0, 1), got 1.5"),
        ("--lr", "nan", "--lr must be a finite number, got nan"),
        ("--lr", "inf", "--lr must be a finite number, got inf"),
        ("--lr", "0", "--lr must lie in (0, inf], got 0.0"),
        ("--limit-val", "0", "--limit-val must lie in [1, inf], got 0"),
        ("--val-interval", "0", "--val-interval must lie in [1, inf], got 0"),
        ("--batch-size", "0", "--batch-size must lie in [1, inf], got 0"),
        ("--scale", "0.5 1.5", "--scale must lie in (0, 1], got 1.5"),
        ("--scale", "1 0.5", "--scale takes MIN then MAX, got 1.0 > 0.5"),
        ("--ratio", "2 1", "--ratio takes MIN then MAX, got 2.0 > 1.0"),
    ],
)
def test_out_of_range_options_are_refused_in_one_line(
    flag: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", flag, *value.split(), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"sepvit train: error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_values_of_the_wrong_kind_are_refused_by_the_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--amp", "fp8"])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2 and "argument --amp: expected 'auto' or 'none' or 'bf16' or 'fp16'" in err
    )
    with pytest.raises(ConfigError, match="--ema-decay must lie"):
        ClassifyConfig(ema_decay=1.0)  # built without argparse, checked all the same


def _state_dict(value: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((4, 4), value), "bias": torch.full((4,), value)}


def _save(checkpoints: ckpt.RunCheckpoints, epoch: int, best: bool) -> None:
    info = RunDescription("classify", "m", {}, ["a"], (8, 8)).at(epoch=epoch, step_in_epoch=0)
    weights = {ckpt.LAST: (_state_dict(epoch), info), ckpt.LAST_EMA: (_state_dict(-epoch), info)}
    if best:
        weights[ckpt.BEST] = (_state_dict(10 * epoch), info)
    folder = checkpoints.next_folder(epoch, 0)
    state = {"epoch": epoch, "step_in_epoch": 0, "best_folder": folder.name if best else None}
    previous = checkpoints.latest()
    best_from = None if best else previous
    checkpoints.save(folder, weights, state, best_from)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@pytest.mark.parametrize("best", [True, False])
def test_a_kill_at_any_file_operation_of_a_save_leaves_a_resumable_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, best: bool
) -> None:
    operations = 0
    real_replace, real_rmtree = os.replace, ckpt.shutil.rmtree
    for kill_at in range(1, 40):
        run = tmp_path / f"run{kill_at}"
        checkpoints = ckpt.RunCheckpoints(run)
        _save(checkpoints, 1, best=True)
        count = 0

        def counting(real, kill_at=kill_at):
            def operation(*args, **kwargs):
                nonlocal count
                count += 1
                if count == kill_at:
                    raise Killed
                return real(*args, **kwargs)

            return operation

        monkeypatch.setattr(os, "replace", counting(real_replace))
        monkeypatch.setattr(ckpt.shutil, "rmtree", counting(real_rmtree))
        try:
            _save(checkpoints, 2, best=best)
            finished = True
        except Killed:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
        # what a resume does: load the set LATEST names, whole and consistent, and republish it
        folder, weights, info, state = checkpoints.load()
        assert state["epoch"] == info.progress["epoch"] in (1, 2)
        assert torch.equal(weights["weight"], torch.full((4, 4), float(state["epoch"])))
        ema = ckpt.read_checkpoint(ckpt.weights_path(folder, ckpt.LAST_EMA))[0]
        assert torch.equal(ema["weight"], torch.full((4, 4), -float(state["epoch"])))
        best_folder = checkpoints.folder / (state["best_folder"] or (folder.name if best else ""))
        checkpoints.clean({folder, best_folder})
        checkpoints.publish(folder, best_folder if best_folder != folder else None)
        published = ckpt.read_checkpoint(run / "last.safetensors")[1]
        assert published.progress["epoch"] == state["epoch"]
        assert (run / "best.safetensors").is_file()
        assert not list(run.rglob("*.tmp"))
        operations = max(operations, count)
        if finished:
            break
    assert finished and operations > 5  # every operation of a save was interrupted once


def test_written_files_follow_the_umask_and_failures_keep_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.csv"
    old = os.umask(0o022)
    try:
        files.write_text(target, "a\n")
        assert target.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        files.write_text(target, "b\n")
        assert target.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)

    def full_disk(path: str) -> None:
        Path(path).write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.WriteError, match="No space left on device; the previous files are kept"):
        files.write_atomically({target: full_disk})
    assert target.read_text() == "b\n" and not list(tmp_path.glob("*.tmp"))


def test_checkpoint_messages_name_the_real_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path} is a folder, not a file"):
        ckpt.read_weights(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.read_weights(tmp_path / "gone.safetensors")
    locked = tmp_path / "locked.safetensors"
    locked.write_bytes(b"x")
    real_open = open

    def refusing_open(path, *args, **kwargs):  # tests run as root, which reads any file
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {locked}: Permission denied"):
        ckpt.read_weights(locked)
    monkeypatch.undo()

    pickled = tmp_path / "model.pth"
    torch.save({"state_dict": _state_dict(1.0), "args": Path("x")}, pickled)
    with pytest.raises(CheckpointError) as error:
        ckpt.read_weights(pickled)
    assert "weights_only" not in str(error.value) and "Python objects besides tensors" in str(error.value)
    (tmp_path / "notes.pth").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        ckpt.read_weights(tmp_path / "notes.pth")


def test_outputs_of_inputs_with_the_same_stem_do_not_collide() -> None:
    paths = [Path("a/cat.jpg"), Path("b/cat.png"), Path("c/dog.jpg"), Path("d/cat.png")]
    assert output_names(paths, ".png") == ["cat.jpg.png", "cat.png.png", "dog.png", "cat.png-2.png"]


def test_an_ordered_option_without_a_metavar_names_min_then_max() -> None:
    import dataclasses

    from sepvit.engine.config import TrainConfig, option
    from sepvit.errors import ConfigError

    @dataclasses.dataclass
    class SpanConfig(TrainConfig):
        span: tuple[float, float] = option((0.0, 1.0), "a range", ordered=True, nargs=2)

    with pytest.raises(ConfigError, match=r"^--span takes MIN then MAX, got 2\.0 > 1\.0$"):
        SpanConfig(span=(2.0, 1.0))
