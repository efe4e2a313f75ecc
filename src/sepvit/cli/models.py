"""``sepvit models``: every registered model with its parameters, GMACs, CPU forward time, and the
published weights it loads with ``pretrained=True`` (tag and published ImageNet-1k top-1)."""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from sepvit.cli.options import add_img_size, img_size, positive
from sepvit.errors import ConfigError
from sepvit.models import create_model, list_models, published_top1
from sepvit.utils import count_macs, count_params


def forward_milliseconds(model: torch.nn.Module, image_size: tuple[int, int], repeats: int) -> float:
    """Median wall time of a batch-1 forward pass in eval mode, after one warm-up pass."""
    x = torch.randn(1, 3, *image_size)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _weights_cell(tagged_name: str) -> str:
    tag = tagged_name.partition(".")[2]
    top1 = published_top1(tagged_name) if tag != "-" else None
    return f"{tag:<26}{top1 if top1 is not None else '-':>6}"


def print_table(pattern: str, image_size: tuple[int, int], repeats: int) -> int:
    names = list_models(pattern)
    if not names:
        raise ConfigError(f"no model matches {pattern!r}; models: {', '.join(list_models())}")
    header = (
        f"{'model':<24}{'params (M)':>12}{'GMACs':>10}{'CPU ms (bs 1)':>16}   {'weights':<26}{'top-1':>6}"
    )
    print(f"{header}   at {image_size[0]}x{image_size[1]}")
    for name in names:
        model = create_model(name).eval()
        macs = count_macs(model, (3, *image_size))
        milliseconds = forward_milliseconds(model, image_size, repeats)
        weights = timm.list_pretrained(name) or [f"{name}.-"]
        print(
            f"{name:<24}{count_params(model) / 1e6:>12.2f}{macs / 1e9:>10.3f}{milliseconds:>16.1f}"
            f"   {_weights_cell(weights[0])}",
            flush=True,
        )
        for tagged in weights[1:]:  # further published weights of the same model
            print(f"{'':<65}{_weights_cell(tagged)}")
    print(f"(torch {torch.__version__}, {torch.get_num_threads()} threads; GMACs = FLOP counter total / 2)")
    print("weights: tag of the published weights that pretrained=True loads (the first is the default),")
    print("top-1: ImageNet-1k top-1 (%) their authors publish; '-': none published or not recorded")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the models with params, GMACs and CPU forward time",
        description="Build every model of this package (random weights) and print its parameters, "
        "GMACs (multiply-accumulates, attention included) and median batch-1 CPU forward time.",
    )
    parser.add_argument(
        "pattern", nargs="?", default="", help="wildcard filter, e.g. 'sepvit_*' (default: all)"
    )
    add_img_size(parser, "input size (default: 224)")
    parser.add_argument(
        "--repeats", type=positive, default=5, help="timed forward passes per model (default: 5)"
    )
    parser.set_defaults(func=models_command)


def models_command(args: argparse.Namespace) -> int:
    size = img_size(args, list_models(args.pattern)) or (224, 224)
    return print_table(args.pattern, size, args.repeats)
