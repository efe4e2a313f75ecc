"""What the trained models look at on test canvases of the cue task: one figure per canvas.

Each figure shows the canvas; the Grad-CAM of the predicted class for SepViT, local-only and
Swin + CPVT, those whose runs are at hand (seed 0 of the main runs), from the deepest stage whose
map is at least 4 × 4 (:func:`sepvit.explain.gradcam.cam_stage`); and SepViT's PSA attention among
the windows of its third stage from the window that holds the cued digit's centre (outlined), which
the generator records, so the query is never chosen by the picture itself.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from sepvit.ablation.runner import chosen_lrs, run_folder
from sepvit.ablation.study import MAIN_TASK, VARIANTS, Protocol
from sepvit.ablation.tasks import CUE_LEFT, generate_split
from sepvit.engine import checkpoint as ckpt
from sepvit.errors import ConfigError
from sepvit.utils.plots import pyplot, save_figure

SHOWN = ("sepvit", "local", "swin-cpvt")
PSA_STAGE = 2  # stage 3: windows of 32 px, two per region


def trained_run(protocol: Protocol, variant: str, lr: float, runs_dir: Path) -> tuple | None:
    """Seed 0's last weights of ``variant`` on the main task and the run's description, None if that
    run folder is not here."""
    from sepvit.runs import load_run

    run_dir = run_folder(protocol, "main", (MAIN_TASK, variant, 0, lr), runs_dir)
    path = ckpt.weights_path(run_dir, ckpt.LAST)
    return load_run(path, "classify") if path.exists() else None


def canvas_tensor(image: np.ndarray, data_config: dict) -> torch.Tensor:
    """A generated canvas (H, W) uint8 as the evaluation transform gives it: (1, 3, H, W), normalised."""
    gray = torch.as_tensor(image, dtype=torch.float32) / 255
    mean = torch.tensor(data_config["mean"])[:, None, None]
    std = torch.tensor(data_config["std"])[:, None, None]
    return ((gray.expand(3, -1, -1) - mean) / std)[None]


def write_pictures(
    records: list[dict], protocol: Protocol, runs_dir: Path, folder: Path, count: int = 2
) -> list[Path]:
    """``explain_<n>.png`` for the first ``count`` test canvases whose two digits differ; none when the
    runs' weights are not in ``runs_dir`` (a report from a copied results file)."""
    from sepvit.explain.gradcam import grad_cam
    from sepvit.explain.window_attention import attention_heat, psa_window_attention
    from sepvit.layers import SeparableWindowAttention

    runs = {}
    for name in SHOWN:
        with contextlib.suppress(ConfigError):  # no complete pilot for its family: not trained either
            lr = chosen_lrs(records, protocol, (VARIANTS[name].family,))[VARIANTS[name].family]
            runs[name] = trained_run(protocol, name, lr, runs_dir)
    models = {name: run[0] for name, run in runs.items() if run is not None}
    if "sepvit" not in models:
        return []
    data_config = runs["sepvit"][1].data_config
    test = generate_split(protocol.task_spec(MAIN_TASK), "test", protocol.sizes["test"])
    chosen = [n for n in range(len(test.labels)) if test.digits[n, 0] != test.digits[n, 1]][:count]
    stage = models["sepvit"].stages[PSA_STAGE]
    psa = next(m for m in stage.modules() if isinstance(m, SeparableWindowAttention))
    plt = pyplot()
    paths = []
    for number, index in enumerate(chosen, 1):
        image = canvas_tensor(test.images[index], data_config)
        side = "left" if test.cues[index] == CUE_LEFT else "right"
        figure, axes = plt.subplots(len(models) + 2, 1, figsize=(7, 1.6 * (len(models) + 2)))
        axes[0].imshow(test.images[index], cmap="gray", vmin=0, vmax=255)
        axes[0].set_title(
            f"test canvas {index}: digits {test.digits[index].tolist()}, cue: read the {side} one"
        )
        for axis, name in zip(axes[1:], models):
            with torch.no_grad():
                predicted = int(models[name](image).argmax())
            axis.imshow(test.images[index], cmap="gray", vmin=0, vmax=255)
            axis.imshow(grad_cam(models[name], image, predicted), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axis.set_title(f"{name}: predicts {predicted}; Grad-CAM")
        attention = psa_window_attention(models["sepvit"], image, psa)
        row, col = test.centres[index, 0 if side == "left" else 2]
        query = (row // attention.window_pixels) * attention.grid[1] + col // attention.window_pixels
        heat = attention_heat(attention, int(query), test.images[index].shape)
        axes[-1].imshow(test.images[index], cmap="gray", vmin=0, vmax=255)
        axes[-1].imshow(heat, cmap="viridis", alpha=0.6, vmin=0, vmax=1)
        top, left = divmod(int(query), attention.grid[1])
        side_px = attention.window_pixels
        corner = (left * side_px - 0.5, top * side_px - 0.5)
        axes[-1].add_patch(plt.Rectangle(corner, side_px, side_px, fill=False, color="yellow", linewidth=2))
        axes[-1].set_title("sepvit: stage-3 PSA from the cued digit's window (outlined) to every window")
        for axis in axes:
            axis.set_xticks([])
            axis.set_yticks([])
        figure.tight_layout()
        paths.append(save_figure(figure, folder / f"explain_{number}.png"))
        plt.close(figure)
    return paths
