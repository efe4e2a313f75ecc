"""int8 deployment targets of issue 15, measured in a plain process with ONNX Runtime on the CPU.

1. Speed: int8 (static QDQ, per-channel weights; ``sepvit.export.quantize_qdq``) against fp32 ONNX
   Runtime for SepViT-Lite and SepViT-T at 224×224, batch 1 and batch 16: each round times every
   (model, batch, precision) in turn (interleaved), and the ratio of medians over the rounds is
   compared with the target ×1.5. Weights are random: the speed of a graph does not depend on them.
2. Accuracy (with ``--checkpoint``, e.g. the digits demo's ``last_ema.safetensors``): fp32 and int8
   top-1 on the held-out images, through the gate that ``sepvit export --int8`` runs; target: a drop
   of at most 0.5 points.

Usage:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deploy.py [--threads 2] [--rounds 7] \\
        [--checkpoint runs/demo/last_ema.safetensors] [--json runs/deploy.json]

Prints the census of int8 kernels, the CPU's VNNI flag, every median and ratio with PASS / MISS, and
exits with status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("sepvit_lite", "sepvit_tiny")
BATCHES = {1: 10, 16: 2}  # batch size: calls per timing
SPEED_TARGET, DROP_TARGET = 1.5, 0.5


def build_pair(name: str, folder: Path, threads: int) -> dict[str, object]:
    """fp32 and int8 ONNX Runtime sessions of ``name`` (random weights, 224×224)."""
    import timm

    import sepvit  # noqa: F401  (registers the models)
    from sepvit.export import export_onnx, kernel_census, onnxruntime_session, quantize_qdq

    model = timm.create_model(name).eval()
    fp32, int8 = folder / f"{name}.onnx", folder / f"{name}-int8.onnx"
    export_onnx(model, fp32, (3, 224, 224), check_shapes=[(1, 3, 224, 224)])
    rng = np.random.default_rng(0)
    quantize_qdq(fp32, int8, [rng.standard_normal((8, 3, 224, 224), dtype=np.float32) for _ in range(4)])
    kernels, products = kernel_census(int8)
    print(f"{name}: int8 kernels {kernels}, float products left {products or 'none'}", flush=True)
    return {
        "fp32": onnxruntime_session(fp32, threads=threads),
        "int8": onnxruntime_session(int8, threads=threads),
        "int8_kernels": kernels,
    }


def time_calls(session, feed: dict, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        session.run(None, feed)
    return (time.perf_counter() - start) / calls


def speed(threads: int, rounds: int) -> tuple[list[dict], list[str]]:
    results, lines = [], []
    with tempfile.TemporaryDirectory(prefix="sepvit-deploy-") as folder:
        pairs = {name: build_pair(name, Path(folder), threads) for name in MODELS}
        feeds = {
            batch: {"input": np.random.default_rng(1).standard_normal((batch, 3, 224, 224), dtype=np.float32)}
            for batch in BATCHES
        }
        times = {
            (name, batch, precision): []
            for name in MODELS
            for batch in BATCHES
            for precision in ("fp32", "int8")
        }
        for name, batch, precision in times:  # warm-up: first calls allocate and pack weights
            time_calls(pairs[name][precision], feeds[batch], 1)
        for _ in range(rounds):
            for (name, batch, precision), samples in times.items():
                samples.append(time_calls(pairs[name][precision], feeds[batch], BATCHES[batch]))
    for name in MODELS:
        for batch in BATCHES:
            fp32, int8 = (statistics.median(times[name, batch, p]) for p in ("fp32", "int8"))
            per_round = [a / b for a, b in zip(times[name, batch, "fp32"], times[name, batch, "int8"])]
            ratio = fp32 / int8
            verdict = "PASS" if ratio >= SPEED_TARGET else "MISS"
            lines.append(
                f"{verdict}  {name} batch {batch}: fp32 {1e3 * fp32:.1f} ms, int8 {1e3 * int8:.1f} ms "
                f"per call (medians of {rounds}); int8 ×{ratio:.2f} (rounds {min(per_round):.2f}–"
                f"{max(per_round):.2f}; target ≥ ×{SPEED_TARGET:g})"
            )
            results.append({
                "model": name, "batch": batch, "fp32_ms": 1e3 * fp32, "int8_ms": 1e3 * int8, "ratio": ratio,
                "round_ratios": per_round, "met": ratio >= SPEED_TARGET,
            })  # fmt: skip
    return results, lines


def accuracy(checkpoint: Path, calibration_images: int) -> tuple[dict, str]:
    from sepvit.export import export_onnx, quantize_int8
    from sepvit.export.calibration import calibration_and_held_out, image_batches, onnx_top1
    from sepvit.train.inference import load_model

    model, info = load_model(str(checkpoint))
    data_config = info["data_config"]
    calibration, held_out = calibration_and_held_out(
        info["data"], data_config, info["classes"], calibration_images
    )
    with tempfile.TemporaryDirectory(prefix="sepvit-deploy-") as folder:
        fp32 = export_onnx(model, Path(folder) / "fp32.onnx", tuple(data_config["input_size"])).path
        report = quantize_int8(
            fp32,
            Path(folder) / "int8.onnx",
            lambda: image_batches(calibration, data_config),
            lambda path: onnx_top1(path, held_out, data_config),
            max_drop=100.0,  # measure, do not gate
        )
    verdict = "PASS" if report.drop <= DROP_TARGET else "MISS"
    line = (
        f"{verdict}  {checkpoint}: top-1 fp32 {report.float_top1:.2f}%, int8 {report.int8_top1:.2f}% "
        f"on {len(held_out.items)} held-out {info['data']} images (calibrated on "
        f"{len(calibration.items)}): drop {report.drop:.2f} points (target ≤ {DROP_TARGET:g})"
    )
    result = {
        "checkpoint": str(checkpoint), "float_top1": report.float_top1, "int8_top1": report.int8_top1,
        "drop": report.drop, "int8_kernels": report.int8_kernels, "met": report.drop <= DROP_TARGET,
    }  # fmt: skip
    return result, line


def main(argv: list[str] | None = None) -> int:
    from sepvit.export.quantize import cpu_has_vnni

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint for the accuracy target")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)

    import onnxruntime

    print(
        f"onnxruntime {onnxruntime.__version__}, {args.threads} threads, CPU VNNI: {cpu_has_vnni()}",
        flush=True,
    )
    report: dict[str, object] = {"threads": args.threads, "rounds": args.rounds, "vnni": cpu_has_vnni()}
    lines = []
    if args.checkpoint:
        report["accuracy"], line = accuracy(args.checkpoint, args.calibration_images)
        lines.append(line)
    report["speed"], speed_lines = speed(args.threads, args.rounds)
    lines += speed_lines
    print("\n".join(lines))
    if args.json:
        from sepvit.engine.files import write_text

        write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0 if all(line.startswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
