"""Speed targets of issue 6, measured side by side in one interleaved run per comparison.

1. SepViT-T against Swin-T (timm) and vit-pytorch's SepViT configured as SepViT-T: throughput at the
   batch size, achieved FLOP rate as a share of the machine's dense matmul rate; the same two of
   ours and timm's in ONNX Runtime for batch-1 latency.
2. Table 1: one SepViT block against two Swin blocks and two Twins blocks (56×56, 96 channels).

Usage (CPU, fp32, batch 16 by default; on a GPU e.g. ``--device cuda --dtype bf16 --batch-size 256``):

    .venv/bin/python benchmarks/speed_targets.py [--out-dir runs/speed_targets] [--rounds 5]

Prints each target with its measured value and PASS / MISS, writes the tables, JSON and plots of
both runs to ``--out-dir`` and exits with status 1 when a target is missed.

Measures as the ``sepvit`` command runs (freed memory kept, SepViT's layers in their cpu_inference
form); ``benchmarks/deploy_targets.py`` measures models as a user's own process creates them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sepvit.bench.blocks import table1_subjects
from sepvit.bench.measure import BenchResult, BenchRun, BenchSettings, run_benchmark
from sepvit.bench.models import model_subjects
from sepvit.bench.report import format_table, write_outputs
from sepvit.bench.targets import Target
from sepvit.utils import keep_freed_memory
from sepvit.utils.files import write_text

SEPVIT, SWIN, VIT_PYTORCH = "sepvit_tiny", "swin_tiny_patch4_window7_224", "vitpytorch_sepvit_tiny"


def find(run: BenchRun, name: str, backend: str = "eager") -> BenchResult | None:
    """The result of the subject whose name starts with ``name`` (block names carry a description)."""
    return next((r for r in run.results if r.name.split()[0] == name and r.backend == backend), None)


def vit_pytorch_available() -> bool:
    try:
        import vit_pytorch.sep_vit  # noqa: F401
    except ImportError:
        print("vit-pytorch is not installed (pip install vit-pytorch): skipping its SepViT")
        return False
    return True


def model_targets(run: BenchRun, gpu: bool) -> list[Target]:
    ours, swin, other = find(run, SEPVIT), find(run, SWIN), find(run, VIT_PYTORCH)
    speedup = ours.throughput.median / swin.throughput.median
    targets = [Target("SepViT-T / Swin-T throughput", speedup, 1.1 if gpu else 1.2)]
    if gpu:
        return targets
    targets.append(Target("SepViT-T achieved FLOP rate / dense matmul rate", ours.matmul_fraction, 0.85))
    if other is not None:
        ratio = ours.throughput.median / other.throughput.median
        targets.append(Target("SepViT-T / vit-pytorch SepViT-T throughput", ratio, 1.25))
    ours_ort, swin_ort = find(run, SEPVIT, "onnxruntime"), find(run, SWIN, "onnxruntime")
    if ours_ort is not None and swin_ort is not None:
        latency_ratio = ours_ort.latency_ms / swin_ort.latency_ms
        description = "SepViT-T / Swin-T batch-1 latency in ONNX Runtime"
        targets.append(Target(description, latency_ratio, 1.0, "<"))
    return targets


def block_targets(run: BenchRun) -> list[Target]:
    ours, swin, twins = find(run, "sepvit_block"), find(run, "swin_blocks"), find(run, "twins_blocks")
    return [
        Target(
            "SepViT block / two Swin blocks throughput", ours.throughput.median / swin.throughput.median, 1.6
        ),
        Target("SepViT block / two Swin blocks GMACs", ours.macs / swin.macs, 0.6, "<"),
        Target(
            "SepViT block / two Twins blocks throughput",
            ours.throughput.median / twins.throughput.median,
            1.5,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--latency-iters", type=int, default=20, help="batch-1 calls per model per round")
    parser.add_argument("--skip-blocks", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/speed_targets"))
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the sepvit command does (SEPVIT_KEEP_FREED_MEMORY=0 turns it off)
    gpu = args.device.startswith("cuda")
    command = "python benchmarks/speed_targets.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = BenchSettings(
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, rounds=args.rounds,
        warmup=args.warmup, min_round_seconds=0.5, latency_iters=args.latency_iters, form="cpu_inference",
    )  # fmt: skip
    targets: list[Target] = []
    summary: list[str] = []
    if not args.skip_models:
        subjects = model_subjects([SEPVIT, SWIN], ("eager",) if gpu else ("eager", "onnxruntime"))
        if vit_pytorch_available():
            subjects += model_subjects([VIT_PYTORCH])
        run = run_benchmark(subjects, settings)
        print(format_table(run))
        write_outputs(run, args.out_dir / "models", command)
        targets += model_targets(run, gpu)
    if not args.skip_blocks:
        run = run_benchmark(table1_subjects(), settings)
        print(format_table(run))
        write_outputs(run, args.out_dir / "blocks", command)
        targets += block_targets(run)
    summary = [target.line() for target in targets]
    print("\n".join(summary))
    write_text(args.out_dir / "targets.txt", f"{command}\n" + "\n".join(summary) + "\n")
    return 0 if all(target.met for target in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
