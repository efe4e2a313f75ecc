"""``sepvit bench``: side-by-side speed of models (or of the Table 1 blocks), interleaved."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sepvit.cli.options import (
    add_img_size,
    img_size,
    non_negative,
    output_folder,
    positive,
    positive_float,
)


def register(subparsers) -> None:
    from sepvit.bench.measure import BACKENDS, DTYPES, FORMS
    from sepvit.bench.presets import PRESETS

    parser = subparsers.add_parser(
        "bench",
        help="benchmark models side by side: params, GMACs, throughput, latency, memory",
        description="Benchmark models (ours or timm's, or presets: "
        + ", ".join(PRESETS)
        + ") interleaved round-robin. Prints a table and writes results.json, results.md and "
        "throughput.png to --out-dir.",
    )
    parser.add_argument("models", nargs="*", metavar="MODEL", help="model names or presets")
    parser.add_argument("--blocks", action="store_true", help="the paper's Table 1 blocks instead of models")
    parser.add_argument("--batch-size", "-b", type=positive, default=16, help="throughput batch size (16)")
    add_img_size(parser, "input size (default: each model's)")
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=["eager"], help="one or more")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--deploy", action="store_true", help="fused (conv-BN, re-parameterised) models")
    parser.add_argument(
        "--form", choices=FORMS, default="cpu_inference",
        help="eager CPU models: SepViT's linears as fused oneDNN calls (cpu_inference, the default) or "
        "as timm.create_model returns them (as_created)",
    )  # fmt: skip
    parser.add_argument(
        "--training", action="store_true", help="time a training step (forward + backward) at the batch size"
    )
    parser.add_argument(
        "--warmup", type=non_negative, default=2, help="warm-up calls per model and batch size"
    )
    parser.add_argument("--rounds", type=positive, default=5, help="timed rounds (each visits every model)")
    parser.add_argument(
        "--min-round-seconds", type=positive_float, default=0.5, help="time per model per round"
    )
    parser.add_argument(
        "--latency-iters", type=positive, default=5, help="timed batch-1 calls per model per round"
    )
    parser.add_argument("--no-latency", action="store_true", help="skip batch-1 latency")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--threads", type=positive, help="torch (and ONNX Runtime) threads")
    parser.add_argument(
        "--opset", type=positive, default=18, help="ONNX opset of the onnxruntime backend's export (18)"
    )
    parser.add_argument(
        "--output",
        "--out-dir",
        dest="out_dir",
        type=output_folder,
        default=Path("runs/bench"),
        help="folder for the results",
    )
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from sepvit.bench.blocks import table1_subjects
    from sepvit.bench.measure import BenchSettings, run_benchmark
    from sepvit.bench.models import model_subjects
    from sepvit.bench.report import format_table, write_outputs
    from sepvit.errors import ConfigError

    if not args.models and not args.blocks:
        raise ConfigError("name at least one model or preset, or pass --blocks")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {args.device!r} requested but CUDA is not available")
    if "onnxruntime" in args.backend and args.dtype == "bf16":
        raise ConfigError("the onnxruntime backend runs fp32 or fp16, not bf16")
    if "onnxruntime-int8" in args.backend and args.dtype != "fp32":
        raise ConfigError("the onnxruntime-int8 backend quantises an fp32 export: leave --dtype at fp32")
    if args.training and any(backend.startswith("onnxruntime") for backend in args.backend):
        raise ConfigError("--training times PyTorch's backward: use the eager or compile backend")
    subjects = table1_subjects(tuple(args.backend)) if args.blocks else []
    subjects += model_subjects(args.models, tuple(args.backend), img_size(args, args.models))
    settings = BenchSettings(
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, channels_last=args.channels_last,
        deploy=args.deploy, warmup=args.warmup, rounds=args.rounds,
        min_round_seconds=args.min_round_seconds, latency_iters=args.latency_iters,
        latency=not (args.no_latency or args.training), memory=not args.no_memory, threads=args.threads,
        opset=args.opset, form=args.form, training=args.training,
    )  # fmt: skip
    run = run_benchmark(subjects, settings)
    print(format_table(run))
    command = "sepvit " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    for kind, path in write_outputs(run, args.out_dir, command).items():
        print(f"{kind}: {path}")
    return 0
