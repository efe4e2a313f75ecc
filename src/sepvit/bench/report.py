"""Benchmark output: a table on screen, JSON, Markdown and a PNG plot with the Pareto front."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

from sepvit.bench.measure import BenchResult, BenchRun
from sepvit.errors import MissingExtraError
from sepvit.utils.extras import require
from sepvit.utils.files import write_text
from sepvit.utils.plots import save_figure

COLUMNS = (
    ("model", "{}"),
    ("backend", "{}"),
    ("params (M)", "{:.2f}"),
    ("GMACs", "{:.3f}"),
    ("img/s median", "{:.1f}"),
    ("img/s min–max", "{}"),
    ("batch-1 ms (p50 / p90)", "{}"),
    ("peak mem (MiB)", "{}"),
    ("GFLOP/s", "{:.1f}"),
    ("% of matmul", "{:.0%}"),
    ("top-1 (paper)", "{}"),
)


# Instruction sets behind the fp32, bf16 and int8 rates, reported with every run.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "amx_int8")


def machine_description(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    import timm
    import torch

    from sepvit.utils.memory import freed_memory_kept

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.readlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
        flags = {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    description = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_features": " ".join(flag for flag in CPU_FEATURES if flag in flags) or "–",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "malloc": "freed memory kept (mallopt)" if freed_memory_kept() else "glibc defaults",
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(MissingExtraError):
        description["onnxruntime"] = require("onnxruntime", "export").__version__
    return description


def machine_line(machine: dict[str, Any]) -> str:
    """``Machine: key value, ...`` of a :func:`machine_description`."""
    return "Machine: " + ", ".join(f"{key} {value}" for key, value in machine.items())


def _row(result: BenchResult) -> list[str]:
    latency = "–"
    if result.latency_ms is not None:
        latency = f"{result.latency_ms:.1f} / {result.latency_p90_ms:.1f}"
    values = (
        result.name,
        result.backend,
        result.params / 1e6,
        result.macs / 1e9,
        result.throughput.median,
        f"{result.throughput.low:.1f}–{result.throughput.high:.1f}",
        latency,
        "–" if result.peak_memory_mb is None else f"{result.peak_memory_mb:.0f}",
        result.achieved_gflops,
        result.matmul_fraction,
        "–" if result.top1 is None else f"{result.top1:.1f}",
    )
    return [spec.format(value) for (_, spec), value in zip(COLUMNS, values)]


def _settings_line(run: BenchRun) -> str:
    s = run.settings
    modes = [m for m, on in (("channels-last", s.channels_last), ("deploy", s.deploy)) if on]
    if s.device == "cpu":
        modes.append(
            "SepViT layers in cpu_inference form" if s.form == "cpu_inference" else "models as created"
        )
    if s.training:
        modes.append("training step (train mode, forward + backward, no optimiser; GMACs of both)")
    if any(result.backend.startswith("onnxruntime") for result in run.results):
        modes.append(f"ONNX opset {s.opset}")
    return (
        f"{s.device}, {s.dtype}, batch {s.batch_size}{', ' + ', '.join(modes) if modes else ''}; "
        f"{s.rounds} rounds after {s.warmup} warm-ups, models interleaved; "
        f"dense matmul {run.matmul_flops.median / 1e9:.0f} GFLOP/s "
        f"({run.matmul_flops.low / 1e9:.0f}–{run.matmul_flops.high / 1e9:.0f}); "
        "GMACs = multiply-accumulates per sample (FLOP counter ÷ 2); GFLOP/s = 2 × MACs × img/s"
    )


def format_table(run: BenchRun) -> str:
    """A plain-text table for the terminal."""
    rows = [[name for name, _ in COLUMNS], *(_row(result) for result in run.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(_settings_line(run))
    lines.extend(f"warning: {warning}" for warning in run.warnings)
    return "\n".join(lines)


def to_markdown(run: BenchRun, command: str | None = None) -> str:
    """A Markdown table with the command and the machine that produced it."""
    machine = machine_description(run.settings.device)
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        machine_line(machine),
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_row(result)) + " |" for result in run.results]
    lines += ["", _settings_line(run) + "."]
    lines += [f"- warning: {warning}" for warning in run.warnings]
    return "\n".join(lines) + "\n"


def to_json(run: BenchRun, command: str | None = None) -> str:
    payload = {
        "command": command,
        "machine": machine_description(run.settings.device),
        "settings": dataclasses.asdict(run.settings),
        "units": {
            "macs": "multiply-accumulates per sample (FlopCounterMode total / 2)",
            "throughput": "samples per second at settings.batch_size",
            "latency_ms": "milliseconds per batch-1 call",
            "peak_memory_mb": "MiB above the level before one call at settings.batch_size",
            "achieved_gflops": "2 * macs * throughput / 1e9",
        },
        "matmul_flops": dataclasses.asdict(run.matmul_flops),
        "results": [dataclasses.asdict(result) for result in run.results],
        "warnings": run.warnings,
    }
    return json.dumps(payload, indent=2) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by x."""
    front = [
        i
        for i, (x, y) in enumerate(points)
        if not any(
            (ox >= x and oy >= y) and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i
        )
    ]
    return sorted(front, key=lambda i: points[i][0])


def plot(run: BenchRun, path: str | os.PathLike) -> None:
    """Throughput against GMACs (with lines of equal share of the matmul rate) and, for the models
    whose paper top-1 is known, top-1 against throughput with the Pareto front."""

    import numpy as np

    require("matplotlib", "bench").use("Agg")
    plt = require("matplotlib.pyplot", "bench")
    ticker = require("matplotlib.ticker", "bench")

    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    results = run.results
    colors = {id(result): f"C{index % 10}" for index, result in enumerate(results)}
    with_top1 = [r for r in results if r.top1 is not None]
    figure, axes = plt.subplots(1, 2 if with_top1 else 1, figsize=(13 if with_top1 else 7, 5), squeeze=False)
    ax = axes[0][0]
    gmacs = [r.macs / 1e9 for r in results]
    for result, x in zip(results, gmacs):
        y = result.throughput.median
        error = [[y - result.throughput.low], [result.throughput.high - y]]
        ax.errorbar(x, y, yerr=error, fmt="o", capsize=3, color=colors[id(result)])
        ax.annotate(f"{result.name} [{result.backend}]", (x, y), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    span = np.geomspace(min(gmacs) * 0.8, max(gmacs) * 1.25, 50)
    for share in (1.0, 0.5, 0.25):
        equal_share = share * run.matmul_flops.median / (2 * span * 1e9)
        ax.plot(span, equal_share, "--", lw=0.8, color="grey")
        ax.annotate(f"{share:.0%} of matmul", (span[-1], equal_share[-1]), fontsize=7, color="grey")
    ax.set(xscale="log", yscale="log", xlabel="GMACs per image", ylabel="images / s",
           title=f"Throughput vs compute ({run.settings.device}, {run.settings.dtype}, "
           f"batch {run.settings.batch_size})")  # fmt: skip
    if with_top1:
        ax = axes[0][1]
        points = [(r.throughput.median, r.top1) for r in with_top1]
        for result, (x, y) in zip(with_top1, points):
            ax.plot(x, y, "o", color=colors[id(result)])
            ax.annotate(f"{result.name} [{result.backend}]", (x, y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "s-", color="black", lw=1,
                markerfacecolor="none", markersize=10, label="Pareto front")  # fmt: skip
        ax.set(xscale="log", xlabel="images / s (measured)", ylabel="ImageNet top-1 % (paper)",
               title="Accuracy vs measured throughput")  # fmt: skip
        ax.legend()
    for ax in figure.axes:
        ax.grid(True, which="both", alpha=0.3)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
    figure.tight_layout()
    save_figure(figure, Path(path))
    plt.close(figure)


def write_outputs(run: BenchRun, out_dir: str | os.PathLike, command: str | None = None) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``throughput.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "plot": out_dir / "throughput.png",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(paths["json"], to_json(run, command))
    write_text(paths["markdown"], to_markdown(run, command))
    plot(run, paths["plot"])
    return paths
