"""Targets checked by the benchmark scripts: a measured value against a threshold, PASS or MISS."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

from sepvit.bench.measure import BenchResult, BenchRun
from sepvit.bench.report import machine_line

RELATIONS = {"≥": operator.ge, ">": operator.gt, "≤": operator.le, "<": operator.lt}


@dataclass
class Target:
    """``measured`` must stand in ``relation`` to ``threshold``; NaN (not measured) never passes."""

    description: str
    measured: float
    threshold: float
    relation: str = "≥"

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {' '.join(RELATIONS)}, not {self.relation!r}")

    @property
    def met(self) -> bool:
        return not math.isnan(self.measured) and RELATIONS[self.relation](self.measured, self.threshold)

    def line(self) -> str:
        verdict = "PASS" if self.met else "MISS"
        return (
            f"{verdict}  {self.description}: {self.measured:.3f} (target {self.relation} {self.threshold:g})"
        )


def result(run: BenchRun, name: str, backend: str = "eager") -> BenchResult:
    """The result of subject ``name`` on ``backend`` in ``run``."""
    found = [r for r in run.results if r.name == name and r.backend == backend]
    if len(found) != 1:
        raise KeyError(f"{len(found)} results for {name} [{backend}] in the run")
    return found[0]


def speedup(
    run: BenchRun, ours: str, theirs: str, metric: str, backends: tuple[str, str] = ("eager",) * 2
) -> float:
    """How many times faster ``ours`` is than ``theirs`` in ``run``: the ratio of median throughputs
    (``metric="throughput"``) or the inverse ratio of median batch-1 latencies (``"latency"``)."""
    a, b = result(run, ours, backends[0]), result(run, theirs, backends[1])
    if metric == "throughput":
        return a.throughput.median / b.throughput.median
    if metric == "latency":
        if a.latency_ms is None or b.latency_ms is None:
            raise ValueError(f"{ours} or {theirs} has no batch-1 latency in the run")
        return b.latency_ms / a.latency_ms
    raise ValueError(f"metric must be throughput or latency, not {metric!r}")


def targets_table(columns: dict[str, list[dict]], command: str, machine: dict[str, Any]) -> str:
    """A Markdown table of targets measured once or more (one column per label, e.g. per allocator
    setting) with the command and the machine; ``columns`` maps a label to rows with section,
    description, measured, relation, threshold and met, and the first label's rows give the order."""
    first = next(iter(columns.values()))
    measured = {
        (label, row["section"], row["description"]): row for label, rows in columns.items() for row in rows
    }
    lines = [
        f"Command: `{command}`",
        "",
        machine_line(machine),
        "",
        "| section | target | threshold | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for row in first:
        cells = []
        for label in columns:
            other = measured.get((label, row["section"], row["description"]))
            cells.append(
                "–" if other is None else f"{'PASS' if other['met'] else 'MISS'} {other['measured']:.3f}"
            )
        threshold = f"{row['relation']} {row['threshold']:g}"
        lines.append(f"| {row['section']} | {row['description']} | {threshold} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
