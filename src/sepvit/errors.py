"""The library's own exceptions.

Everything sepvit raises for a problem a user can fix (bad input, a wrong option, a missing file or
extra) derives from :class:`SepViTError`; the command line prints such errors as one line and exits
non-zero, a program using the library catches them like any other exception.
"""

from __future__ import annotations


class SepViTError(Exception):
    """A problem with the user's input, options or environment, described in one line."""


class ConfigError(SepViTError, ValueError):
    """An option or configuration value is missing, out of range or inconsistent."""


class UnknownModelError(ConfigError):
    """A model name that neither this package nor timm registers."""


class DataError(SepViTError):
    """A dataset, image or annotation cannot be read or is not usable."""


class CheckpointError(SepViTError):
    """A checkpoint or weights file is missing, unreadable, foreign or does not fit the model."""


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """Pretrained weights are neither cached locally nor reachable: says how to supply them."""


class MissingExtraError(SepViTError, ImportError):
    """An optional dependency is not installed: names the ``sepvit[extra]`` that provides it."""


class TrainingError(SepViTError):
    """A run cannot go on (non-finite loss, failed write, interrupted) and has kept what it wrote."""


class ExportError(SepViTError):
    """A model cannot be exported, or the exported graph disagrees with PyTorch."""
