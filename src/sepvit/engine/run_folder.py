"""Where a new run may write: one folder inside ``--output``, never a folder some other program owns.

``--experiment`` (from a flag or a config file) names the run folder inside ``--output``; it is a
relative path that stays there (no ``..``, not absolute, not through a link that leads out). An
existing folder is taken only when it is empty or holds what a run of ours left before its first
checkpoint (its ``config.yaml``, TensorBoard files, a half-written checkpoint set): that is cleared
and the run starts again. A folder holding a run's weights or checkpoints is a run to ``--resume``
or to leave alone; a folder holding anything else is someone else's and is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePath

from sepvit.errors import ConfigError
from sepvit.utils.files import TEMP_SUFFIX

# What a run writes before its first checkpoint set is complete.
BEFORE_FIRST_CHECKPOINT = frozenset({"config.yaml", "tensorboard", "checkpoints", "metrics.csv"})
# What makes a folder a run: a checkpoint pointer, or any weights file a run publishes.
RUN_FILES = ("checkpoints/LATEST", "last.safetensors", "last_ema.safetensors", "best.safetensors")


def check_experiment_name(name: str) -> str:
    """``name`` as a run folder name relative to ``--output``, or a :class:`ConfigError`."""
    path = PurePath(name)
    if not name.strip() or path.is_absolute() or ".." in path.parts or str(path) == ".":
        raise ConfigError(
            f"--experiment must name a folder inside --output (no '..', not an absolute path), got {name!r}"
        )
    return name


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _left_before_first_checkpoint(run_dir: Path) -> bool:
    names = [entry.name for entry in run_dir.iterdir()]
    return all(name in BEFORE_FIRST_CHECKPOINT or name.endswith(TEMP_SUFFIX) for name in names)


def new_run_folder(output: str | Path, name: str, clear: bool = True) -> Path:
    """The folder a new run named ``name`` writes to under ``output``, cleared (``clear``: by the one
    process that writes) of what a run that stopped before its first checkpoint left; refuses a
    folder that is not ours to write."""
    output = Path(output)
    run_dir = output / check_experiment_name(name)
    if not _inside(run_dir, output) or run_dir.resolve() == output.resolve():
        raise ConfigError(f"run folder {run_dir} leads outside --output {output} (through a link)")
    if not run_dir.exists() and not run_dir.is_symlink():
        return run_dir
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} exists and is not a folder; choose another --experiment")
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        hint = f"continue it with --resume {run_dir} or " if "checkpoints/LATEST" in held else ""
        raise ConfigError(
            f"run folder {run_dir} already holds a run ({', '.join(held)}): {hint}choose another --experiment"
        )
    if not _left_before_first_checkpoint(run_dir):
        raise ConfigError(
            f"run folder {run_dir} exists and holds files that are not a sepvit run's; it is left as it is: "
            "choose another --experiment or --output"
        )
    for entry in run_dir.iterdir() if clear else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return run_dir
