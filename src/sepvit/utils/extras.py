"""Optional dependencies, imported where they are used; a missing one is named with its extra.

``pip install sepvit`` installs the models only (torch, timm, safetensors). The rest comes as
extras of the package (see ``[project.optional-dependencies]`` in pyproject.toml):

- ``train``: scikit-learn (the digits demo), PyYAML, tqdm, matplotlib, TensorBoard
- ``export``: onnx, onnxruntime, onnxscript
- ``dense``: ``train`` and pycocotools
- ``bench``: ``export``, matplotlib and vit-pytorch (a peer model)
- ``explain``: grad-cam (Grad-CAM overlays)
- ``cluster``: ``train``, webdataset and datasets (tar shards, Hugging Face datasets)
- ``all``: all six; ``dev``: ``all``, segmentation-models-pytorch and the test tools
"""

from __future__ import annotations

import importlib
from types import ModuleType

from sepvit.errors import MissingExtraError

EXTRAS = ("train", "export", "dense", "bench", "explain", "cluster", "smp", "all", "dev")


def require(module: str, extra: str) -> ModuleType:
    """``import module`` (dotted names too); raise :class:`MissingExtraError` naming ``sepvit[extra]``.

    Use it where an optional dependency is needed, never at the top of a module the models import.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; sepvit's extras are {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name and (module == error.name or module.startswith(f"{error.name}.")):
            problem = f"{error.name} is not installed"
        else:  # the module is there but something it needs is missing or broken
            problem = f"{module} cannot be imported ({' '.join(str(error).split())})"
        raise MissingExtraError(f"{problem}: pip install 'sepvit[{extra}]'") from error
