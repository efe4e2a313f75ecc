"""Helpers shared by the families' ``checkpoint_filter_fn``: unwrapping and key renaming."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

KeyRenames = Sequence[tuple[str, str | Callable[[re.Match[str]], str]]]


def unwrap_state_dict(checkpoint: Mapping[str, object]) -> dict[str, Tensor]:
    """The state dict inside a training checkpoint, EMA weights first, without DDP's ``module.``.

    A bare state dict passes through; wrappers are ``state_dict_ema``, ``model_ema``,
    ``state_dict`` and ``model``.
    """
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def rename_key(key: str, renames: KeyRenames) -> str:
    """``key`` after every ``(pattern, replacement)`` of ``renames`` in turn (``re.sub``)."""
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key
