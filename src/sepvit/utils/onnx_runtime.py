"""ONNX files as models: an ONNX Runtime session, and a classifier that evaluation and prediction run
like a PyTorch model.

``sepvit export`` stores what ``sepvit eval`` and ``sepvit predict`` need of a checkpoint (model
name, classes, data and data configuration) in the file's ``metadata_props`` under ``"sepvit"``;
with it, an exported graph (fp32 or int8) is evaluated on the same data with the same metric.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sepvit.errors import CheckpointError, ExportError
from sepvit.utils.extras import require

METADATA_KEY = "sepvit"


def onnxruntime_session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
    """An ONNX Runtime session on the CPU, or with the CUDA provider first for ``device="cuda"``."""
    ort = require("onnxruntime", "export")
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError("ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers)


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``"sepvit"`` metadata of an ONNX file (None when it has none); CheckpointError if unreadable."""
    onnx = require("onnx", "export")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError, OSError, ... for a file that is not ONNX
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{path} is not a readable ONNX file ({reason})") from error
    entry = next((prop.value for prop in proto.metadata_props if prop.key == METADATA_KEY), None)
    if entry is None:
        return None
    try:
        return json.loads(entry)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its sepvit metadata is not JSON ({error})") from error


class OnnxClassifier(nn.Module):
    """An ONNX classifier behind ``nn.Module``'s call: (B, C, H, W) float tensor -> float32 logits.

    ONNX Runtime runs on the CPU (its CUDA provider for a CUDA device); the logits come back on the
    input's device, so evaluation code written for PyTorch models runs it unchanged.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        super().__init__()
        self.path = Path(path)
        try:
            self.session = onnxruntime_session(path, device)
        except ExportError:
            raise
        except Exception as error:  # ONNX Runtime's own exceptions for a graph it cannot load
            reason = " ".join(str(error).split())
            raise CheckpointError(f"ONNX Runtime cannot load {path}: {reason}") from error
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_dtype = np.float16 if graph_input.type == "tensor(float16)" else np.float32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feed = images.detach().float().cpu().numpy().astype(self.input_dtype)
        try:
            logits = self.session.run(None, {self.input_name: feed})[0]
        except Exception as error:
            raise ExportError(
                f"ONNX Runtime failed on input {tuple(images.shape)} of {self.path.name}: "
                f"{' '.join(str(error).split())}"
            ) from error
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)).to(images.device)
