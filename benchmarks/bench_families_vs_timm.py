"""Our MobileViTv2 and EfficientViT (deploy mode) against timm's same models, side by side on CPU.

Every round times every model once, in turn, so machine noise hits all of them alike; the
reported figures are medians over the rounds, and the ratios are ours over timm's.

    python benchmarks/bench_families_vs_timm.py --rounds 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch
from timm.utils import reparameterize_model

import sepvit  # registers our models

PAIRS = (("sv_efficientvit_m5", "efficientvit_m5"), ("sv_mobilevitv2_100", "mobilevitv2_100"))


def build(name: str, ours: bool, timm_fused: bool) -> torch.nn.Module:
    model = timm.create_model(name).eval()
    if ours:
        model.fuse()
    elif timm_fused:
        model = reparameterize_model(model)
    return model


def seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int, clock=time.perf_counter) -> float:
    """Median seconds of one forward pass over ``repeats`` passes."""
    times = []
    for _ in range(repeats):
        start = clock()
        model(x)
        times.append(clock() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians over them)")
    parser.add_argument("--batch", type=int, default=16, help="batch of the throughput measurement")
    parser.add_argument("--latency-repeats", type=int, default=10, help="batch-1 passes per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per model and batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall-clock time, or the process's CPU time (steadier on a shared machine with --threads 1)",
    )
    parser.add_argument("--timm-fused", action="store_true", help="also time timm's reparameterize_model")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    entries = []  # (label, model, input size)
    for ours_name, timm_name in PAIRS:
        size = timm.create_model(ours_name, pretrained=False).pretrained_cfg["input_size"]
        entries.append((f"{ours_name} (fused)", build(ours_name, True, False), size))
        entries.append((timm_name, build(timm_name, False, False), size))
        if args.timm_fused:
            entries.append((f"{timm_name} (timm fused)", build(timm_name, False, True), size))

    throughput = {label: [] for label, _, _ in entries}
    latency = {label: [] for label, _, _ in entries}
    with torch.inference_mode():
        inputs = {}
        for label, model, size in entries:
            inputs[label] = (torch.randn(args.batch, *size), torch.randn(1, *size))
            for x in inputs[label]:
                for _ in range(args.warmup):
                    model(x)
        for _ in range(args.rounds):
            for label, model, _ in entries:
                big, single = inputs[label]
                throughput[label].append(args.batch / seconds(model, big, 1, clock))
                latency[label].append(1000 * seconds(model, single, args.latency_repeats, clock))

    print(f"torch {torch.__version__}, timm {timm.__version__}, sepvit {sepvit.__version__}")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, fp32, eval")
    print(
        f"{args.rounds} interleaved rounds, medians; batch {args.batch} throughput, batch 1 latency;"
        f" {args.clock} clock"
    )
    print(f"{'model':40s} {'input':>9s} {'img/s @' + str(args.batch):>11s} {'ms @1':>8s}")
    medians = {}
    for label, _, size in entries:
        tput, lat = statistics.median(throughput[label]), statistics.median(latency[label])
        medians[label] = (tput, lat)
        print(f"{label:40s} {size[1]:>4d}x{size[2]:<4d} {tput:11.1f} {lat:8.2f}")
    print("ratios, ours / timm (throughput: higher is better; latency: timm ms / ours ms)")
    for ours_name, timm_name in PAIRS:
        ours_tput, ours_lat = medians[f"{ours_name} (fused)"]
        for ref in [timm_name] + ([f"{timm_name} (timm fused)"] if args.timm_fused else []):
            ref_tput, ref_lat = medians[ref]
            speedup, latency_gain = ours_tput / ref_tput, ref_lat / ours_lat
            print(f"{ours_name} vs {ref}: throughput x{speedup:.2f}, latency x{latency_gain:.2f}")


if __name__ == "__main__":
    main()
