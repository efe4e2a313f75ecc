"""Files a run depends on: written atomically with the user's umask, read with the real reason named."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from safetensors import SafetensorError

from sepvit.errors import CheckpointError, ConfigError, SepViTError, TrainingError

TEMP_SUFFIX = ".tmp"
# What a failed write raises: the OS, safetensors (SafetensorError), torch.save (RuntimeError).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


class WriteError(TrainingError):
    """A file could not be written; the file that was there before is kept."""


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def reason(error: BaseException) -> str:
    """The OS's own words for an error (``No space left on device``), else the message's first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _write_temp(target: Path, write: Callable[[str], None]) -> str:
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    try:
        write(temp)
        os.chmod(temp, new_file_mode())
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return temp


def write_atomically(writes: Mapping[Path, Callable[[str], None]]) -> None:
    """Write every file to a temporary name in its folder, then rename each into place.

    ``write(temp_path)`` writes one file. If any write fails nothing is renamed, so the files in
    place stay as they were; the failure is a :class:`WriteError` naming the files and the reason.
    """
    temps: dict[Path, str] = {}
    try:
        for target, write in writes.items():
            temps[target] = _write_temp(Path(target), write)
    except BaseException as error:
        for temp in temps.values():
            Path(temp).unlink(missing_ok=True)
        if isinstance(error, WRITE_ERRORS) and not isinstance(error, SepViTError):
            names = ", ".join(str(target) for target in writes)
            raise WriteError(
                f"could not write {names}: {reason(error)}; the previous files are kept"
            ) from error
        raise
    for target, temp in temps.items():
        os.replace(temp, target)


def write_text(path: Path, text: str) -> None:
    write_atomically({path: lambda temp: Path(temp).write_text(text)})


def link_atomically(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (a hard link, or a copy where links fail), atomically."""
    if target.exists() and os.path.samefile(source, target):
        return  # already published; renaming a link over itself would leave the temporary behind

    def link(temp: str) -> None:
        os.unlink(temp)
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)

    write_atomically({target: link})


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files an interrupted write left in ``folder``; returns them."""
    stale = [path for path in folder.glob(f".*{TEMP_SUFFIX}") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def make_folder(path: Path, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) or say why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.", suffix=TEMP_SUFFIX):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write to the {what} {path}: {reason(error)}") from error
    return path


def check_file(path: str | os.PathLike, what: str, error_type: type[SepViTError] = CheckpointError) -> Path:
    """``path`` as a readable regular file, or an error naming the real problem."""
    path = Path(path)
    if path.is_dir():
        raise error_type(f"{what} {path} is a folder, not a file")
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise error_type(f"{what} {path} does not exist") from None
    except OSError as error:
        raise error_type(f"cannot read {what} {path}: {reason(error)}") from error
    return path
