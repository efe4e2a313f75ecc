"""``sepvit explain``: Grad-CAM and PSA window-attention overlays of a checkpoint on image files, and
the effective receptive field of the checkpoint against the same model at initialisation.

For each image, ``<stem>_gradcam.png`` (Grad-CAM of the predicted class over the model's input) and,
for models with PSA, ``<stem>_psa.png``: the attention among windows of the first block with PSA,
from the window where Grad-CAM is strongest (outlined) to every window. The receptive field is
:func:`sepvit.explain.window_range`, over the images given: the share of the centre unit's
input-gradient mass after stages 1 and 3 outside a square three first-stage windows wide around the
centre unit's window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepvit.data_io import open_image
from sepvit.errors import ConfigError
from sepvit.explain.gradcam import grad_cam, overlay
from sepvit.explain.receptive_field import RANGE_WINDOWS, window_range
from sepvit.explain.window_attention import attention_heat, psa_window_attention, strongest_window
from sepvit.utils.files import make_folder, write_atomically

OUTLINE = (255, 255, 0)
MIN_SIDE = 256  # smaller inputs are enlarged (by a whole factor, pixels kept sharp) to be seen


@dataclass
class Explanation:
    image: str
    predicted: str
    probability: float
    gradcam: Path
    psa: Path | None


def _save_png(path: Path, pixels: np.ndarray, outline: tuple[int, int, int, int] | None = None) -> Path:
    from PIL import Image, ImageDraw

    picture = Image.fromarray(pixels)
    factor = max(1, MIN_SIDE // max(picture.size))
    picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    if outline is not None:
        left, top, right, bottom = outline
        box = (left * factor, top * factor, (right + 1) * factor - 1, (bottom + 1) * factor - 1)
        ImageDraw.Draw(picture).rectangle(box, outline=OUTLINE, width=2)
    write_atomically({path: lambda temp: picture.save(temp, format="PNG")})
    return path


def _unique_stems(images: list[str]) -> list[str]:
    stems, seen = [], {}
    for image in images:
        stem = Path(image).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _rgb(tensor: torch.Tensor, data_config: dict[str, Any]) -> np.ndarray:
    """The model's normalised input (3, H, W) back to an RGB image (H, W, 3) in [0, 1]."""
    mean = torch.tensor(data_config["mean"])[:, None, None]
    std = torch.tensor(data_config["std"])[:, None, None]
    return (tensor.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def explain_images(
    checkpoint: str, images: list[str], output: Path, device: str = "cpu"
) -> tuple[list[Explanation], dict[str, float]]:
    """Write the overlays of every image; returns them and the receptive fields (trained, at init)."""
    from sepvit.classify.data import eval_transform
    from sepvit.classify.inference import load_model
    from sepvit.engine.distributed import single_process
    from sepvit.runs import build_model

    if Path(checkpoint).suffix.lower() == ".onnx":
        raise ConfigError(
            f"{checkpoint} is an ONNX export; explain needs the run's checkpoint (.safetensors), whose "
            "gradients and attention it reads"
        )
    model, description = load_model(checkpoint)
    transform = eval_transform(description.data_config)
    inputs = torch.stack([transform(open_image(path)) for path in images])  # every image readable first
    context = single_process(device)
    model.to(context.device)
    inputs = inputs.to(context.device)
    make_folder(output, "output folder")
    explanations = []
    for path, stem, image in zip(images, _unique_stems(images), inputs):
        batch = image[None]
        with torch.no_grad():
            probabilities = model.eval()(batch).float().softmax(dim=1)[0]
        predicted = int(probabilities.argmax())
        rgb = _rgb(image, description.data_config)
        heat = grad_cam(model, batch, predicted)
        gradcam = _save_png(output / f"{stem}_gradcam.png", overlay(rgb, heat))
        psa_path = None
        attention = psa_window_attention(model, batch)
        if attention is not None:
            query = strongest_window(attention, heat)
            side = attention.window_pixels
            top, left = divmod(query, attention.grid[1])
            box = (left * side, top * side, (left + 1) * side - 1, (top + 1) * side - 1)
            psa_heat = attention_heat(attention, query, heat.shape)
            psa_path = _save_png(output / f"{stem}_psa.png", overlay(rgb, psa_heat), box)
        explanations.append(
            Explanation(
                path, description.class_names[predicted], float(probabilities[predicted]), gradcam, psa_path
            )
        )

    torch.manual_seed(0)
    initial = build_model(description)
    fields = {
        "window_pixels": RANGE_WINDOWS * (inputs.shape[-1] // 8),
        "trained": window_range(model, inputs),
        "initialisation": window_range(initial.to(context.device), inputs),
    }
    return explanations, fields
