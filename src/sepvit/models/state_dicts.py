"""Helpers shared by the families' weight loading: unwrapping checkpoints, renaming keys, and
building a model with pretrained weights whose problems raise this library's errors."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from safetensors import SafetensorError
from timm.models import PretrainedCfg, build_model_with_cfg, resolve_pretrained_cfg
from torch import Tensor, nn

from sepvit.errors import CheckpointError, WeightsNotFoundError

KeyRenames = Sequence[tuple[str, str | Callable[[re.Match[str]], str]]]


def unwrap_state_dict(checkpoint: Mapping[str, object]) -> dict[str, Tensor]:
    """The state dict inside a training checkpoint, EMA weights first, without DDP's ``module.``.

    A bare state dict passes through; wrappers are ``state_dict_ema``, ``model_ema``,
    ``state_dict``, ``model`` and ``module``.
    """
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def rename_key(key: str, renames: KeyRenames) -> str:
    """``key`` after every ``(pattern, replacement)`` of ``renames`` in turn (``re.sub``)."""
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


_LOCAL_FILE_HINT = "pass a local file with pretrained_cfg_overlay=dict(file=PATH)"


def _missing_weights_message(name: str, cfg: PretrainedCfg) -> str:
    if cfg.file:
        return f"weights file {cfg.file} for {name} not found; {_LOCAL_FILE_HINT}"
    hub_id = cfg.hf_hub_id
    return (
        f"weights {hub_id} for {name} are not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) "
        f"and the hub cannot be reached: download them where there is network (hf download {hub_id}) "
        f"into that cache or one named by HF_HUB_CACHE, or {_LOCAL_FILE_HINT}"
    )


def build_with_weights(
    model_cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any
) -> nn.Module:
    """``timm.models.build_model_with_cfg`` whose weight problems raise this library's errors.

    With ``pretrained=True``, weights that are nowhere to be found (no published ones, a hub
    checkpoint neither cached nor downloadable, a missing ``file``) raise
    :class:`~sepvit.errors.WeightsNotFoundError` saying how to supply them; a file that cannot be
    read raises :class:`~sepvit.errors.CheckpointError`.
    """
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    name = f"{variant}.{cfg.tag}" if cfg.tag else variant
    if not (cfg.file or cfg.hf_hub_id or cfg.url or cfg.state_dict):
        raise WeightsNotFoundError(f"{name} has no published weights; {_LOCAL_FILE_HINT}")
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (FileNotFoundError, ConnectionError, HfHubHTTPError) as error:
        raise WeightsNotFoundError(_missing_weights_message(name, cfg)) from error
    except (SafetensorError, pickle.UnpicklingError, EOFError) as error:
        source = cfg.file or cfg.hf_hub_id or cfg.url
        raise CheckpointError(f"weights {source} for {name} cannot be read: {error}") from error
