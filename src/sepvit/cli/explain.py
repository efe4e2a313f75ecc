"""Sub-command ``explain`` of the ``sepvit`` command (wiring only; see :mod:`sepvit.explain.images`).

Exit codes: 0 done; 2 bad input (a missing, corrupt or foreign checkpoint, an unreadable image, an
output folder that cannot be written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sepvit.cli.options import add_device, add_json, output_folder, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="Grad-CAM and PSA window-attention overlays of a checkpoint, and its receptive field",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write <stem>_gradcam.png and (for models with PSA) <stem>_psa.png for each image, "
        "and print the effective receptive field of the checkpoint and of the same model at "
        "initialisation: the share of input-gradient mass outside the centre window (SepViT Figure 4).",
    )
    parser.add_argument("checkpoint", help="best.safetensors or last.safetensors of a run")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument(
        "--output", type=output_folder, default=Path("explain"), help="folder for the PNG files"
    )
    add_device(parser, default="cpu")
    add_json(parser)
    parser.set_defaults(func=explain_command)


def explain_command(args: argparse.Namespace) -> int:
    from sepvit.explain.images import explain_images

    explanations, fields = explain_images(args.checkpoint, args.images, args.output, args.device)
    if args.json:
        document = {
            "images": [
                {**vars(item), "gradcam": str(item.gradcam), "psa": item.psa and str(item.psa)}
                for item in explanations
            ],
            "effective_receptive_field": fields,
        }
        print_json(document)
        return 0
    for item in explanations:
        written = ", ".join(str(path) for path in (item.gradcam, item.psa) if path is not None)
        print(f"{item.image}: {item.predicted} ({100 * item.probability:.1f}%); {written}")
    trained, initial = fields["trained"], fields["initialisation"]
    square = fields["window_pixels"]
    print(f"effective receptive field (input-gradient share outside {square} px around the centre):")
    for stage in trained:
        print(f"  after {stage}: trained {trained[stage]:.3f}, at initialisation {initial[stage]:.3f}")
    return 0
