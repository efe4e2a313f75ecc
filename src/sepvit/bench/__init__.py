"""Side-by-side benchmarks: params, GMACs, throughput, latency, memory and achieved FLOP rate."""

from sepvit.bench.measure import BenchResult, BenchRun, BenchSettings, Subject, run_benchmark
from sepvit.bench.models import bench_model, resolve_model_names
from sepvit.bench.presets import PAPER_TOP1, PRESETS, paper_top1

__all__ = [
    "PAPER_TOP1",
    "PRESETS",
    "BenchResult",
    "BenchRun",
    "BenchSettings",
    "Subject",
    "bench_model",
    "paper_top1",
    "resolve_model_names",
    "run_benchmark",
]
