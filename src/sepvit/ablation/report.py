"""The claims page and the plots, generated from the study's records by rules stated before the runs.

Each claim of the paper's Tables 5 and 6 and Figure 4 compares two variants on one measure. Ours is
the mean of the paired differences (seed s of one variant minus seed s of the other) with its 95%
t-interval, judged against the protocol's smallest effect of interest δ (3 top-1 points; 0.05 of
gradient share for the receptive field), in this order:

0. ``not run``: a variant of the pair has no run on the main task yet.
1. ``baseline failed``: a variant of the pair missed the control gate (a seed of the single-digit
   control under ``Protocol.control_gate``), so its task result says nothing about its attention.
2. ``not comparable``: fewer than two paired seeds.
3. ``equivalent``: the interval lies inside (-δ, +δ): any difference is smaller than what matters.
4. ``reproduces``: the interval lies above 0 (the paper's direction).
5. ``contradicts``: the interval lies below 0.
6. ``not resolved``: anything else.

Throughput comes from :func:`sepvit.ablation.runner.measure_speeds` (every variant alone in one
process, interleaved rounds): ``reproduces`` when the slowest round of the paper's faster variant
beats the fastest round of the other, ``contradicts`` the other way round, else ``not resolved``;
it is never set against the paper's GPU figures.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepvit.ablation.study import CONTROL_TASK, FAMILIES, MAIN_TASK, VARIANTS, Protocol
from sepvit.ablation.tasks import NUM_CLASSES, pooled_evidence_ceiling
from sepvit.errors import ConfigError
from sepvit.utils.files import make_folder, write_text
from sepvit.utils.plots import pyplot, save_figure

MEASURES = {
    "top1": "test top-1 (%)",
    "erf_stage1_trained": "ERF after stage 1, trained",
    "erf_stage1_init": "ERF after stage 1, at initialisation",
    "erf_stage2_trained": "ERF after stage 2, trained",
    "erf_stage2_init": "ERF after stage 2, at initialisation",
}
ERF_EFFECT = 0.05  # smallest difference of gradient share that matters
CHANCE = 100 / NUM_CLASSES
CUE_BLIND = 55.0  # a model that ignores the cue (tasks.pooled_evidence_ceiling's docstring)


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``worse`` on ``measure`` of the main task, as the paper says."""

    source: str
    statement: str
    better: str
    worse: str
    measure: str = "top1"
    paper: tuple[float, float] | None = None  # the paper's top-1 of better and worse (ImageNet)


CLAIMS: tuple[Claim, ...] = (
    Claim("Table 5", "DSSA beats Swin + CPVT", "dssa", "swin-cpvt", paper=(82.2, 81.2)),
    Claim("Table 5", "GSA and learnable window tokens improve on DSSA", "sepvit", "dssa", paper=(82.7, 82.2)),
    Claim("Table 5", "SepViT beats Swin + CPVT", "sepvit", "swin-cpvt", paper=(82.7, 81.2)),
    Claim("Table 6", "window tokens beat average pooling", "sepvit", "avgpool", paper=(82.7, 82.2)),
    Claim("Table 6", "window tokens beat a depthwise convolution", "sepvit", "dwconv", paper=(82.7, 82.3)),
    Claim("task", "interaction among windows beats local-only attention", "sepvit", "local"),
    Claim("Figure 4", "SepViT's stage 1 sees further than Swin + CPVT's, trained", "sepvit", "swin-cpvt",
          "erf_stage1_trained"),
    Claim("Figure 4", "SepViT's stage 2 sees further than Swin + CPVT's, trained", "sepvit", "swin-cpvt",
          "erf_stage2_trained"),
    Claim("Figure 4", "SepViT's stage 1 sees further than Swin + CPVT's, at init.", "sepvit", "swin-cpvt",
          "erf_stage1_init"),
    Claim("Figure 4", "SepViT's stage 2 sees further than Swin + CPVT's, at init.", "sepvit", "swin-cpvt",
          "erf_stage2_init"),
    Claim("Figure 4", "SepViT's stage 1 sees further than local-only, trained", "sepvit", "local",
          "erf_stage1_trained"),
    Claim("Figure 4", "SepViT's stage 2 sees further than local-only, trained", "sepvit", "local",
          "erf_stage2_trained"),
)  # fmt: skip
SPEED_CLAIM = Claim("Table 5", "DSSA trains faster than Swin + CPVT", "dssa", "swin-cpvt", "train")


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Interval:
        mean = statistics.fmean(values)
        if len(values) < 2:
            return cls(mean, math.nan, math.nan, len(values))
        from scipy import stats

        quantile = stats.t.ppf(0.975, len(values) - 1)  # two-sided 95%
        half = quantile * statistics.stdev(values) / math.sqrt(len(values))
        return cls(mean, mean - half, mean + half, len(values))

    def shown(self, digits: int) -> str:
        if self.count < 2:
            return f"{self.mean:.{digits}f} (n={self.count})"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] (n={self.count})"


def main_records(records: Iterable[dict[str, Any]], protocol: Protocol) -> list[dict[str, Any]]:
    return [r for r in records if protocol.holds(r) and r["phase"] == "main"]


def by_seed(records: list[dict[str, Any]], task: str, variant: str, measure: str) -> dict[int, float]:
    return {
        r["seed"]: float(r[measure])
        for r in records
        if r["task"] == task and r["variant"] == variant and isinstance(r.get(measure), (int, float))
    }


def gate_failures(records: list[dict[str, Any]], protocol: Protocol) -> dict[str, str]:
    """Variant -> why it fails the control gate (no entry: it passed)."""
    failures = {}
    for variant in VARIANTS:
        control = by_seed(records, CONTROL_TASK, variant, "top1")
        if not control:
            failures[variant] = "no control run"
        elif min(control.values()) < protocol.control_gate:
            worst = min(control, key=control.get)
            failures[variant] = f"seed {worst}: {control[worst]:.1f}% < {protocol.control_gate:g}%"
    return failures


def verdict(claim: Claim, records: list[dict[str, Any]], protocol: Protocol) -> tuple[str, Interval | None]:
    """The rule of the module docstring for one claim: (verdict, interval of the paired differences)."""
    better = by_seed(records, MAIN_TASK, claim.better, claim.measure)
    worse = by_seed(records, MAIN_TASK, claim.worse, claim.measure)
    if not better or not worse:
        return "not run", None
    failed = gate_failures(records, protocol)
    if claim.better in failed or claim.worse in failed:
        return "baseline failed", None
    paired = sorted(set(better) & set(worse))
    if len(paired) < 2:
        return "not comparable", None
    interval = Interval.of([better[s] - worse[s] for s in paired])
    effect = protocol.smallest_effect if claim.measure == "top1" else ERF_EFFECT
    if -effect < interval.low and interval.high < effect:
        return "equivalent", interval
    if interval.low > 0:
        return "reproduces", interval
    if interval.high < 0:
        return "contradicts", interval
    return "not resolved", interval


def speed_verdict(speeds: dict[str, Any]) -> str:
    better, worse = speeds.get(SPEED_CLAIM.better), speeds.get(SPEED_CLAIM.worse)
    if not better or not worse:
        return "not run"
    (_, better_low, better_high), (_, worse_low, worse_high) = better["train"], worse["train"]
    if better_low > worse_high:
        return "reproduces"
    if better_high < worse_low:
        return "contradicts"
    return "not resolved"


def claims_table(records: list[dict[str, Any]], protocol: Protocol, speeds: dict[str, Any]) -> list[str]:
    lines = [
        "| source | claim | measure | paper | ours: paired difference, 95% interval | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for claim in CLAIMS:
        result, interval = verdict(claim, records, protocol)
        digits = 1 if claim.measure == "top1" else 3
        paper = "—" if claim.paper is None else f"{claim.paper[0]:g} vs {claim.paper[1]:g}"
        shown = "—" if interval is None else interval.shown(digits)
        lines.append(
            f"| {claim.source} | {claim.statement} (`{claim.better}` − `{claim.worse}`) | "
            f"{MEASURES[claim.measure]} | {paper} | {shown} | **{result}** |"
        )
    ratio = "—"
    if speeds.get("dssa") and speeds.get("swin-cpvt"):
        ratio = f"×{speeds['dssa']['train'][0] / speeds['swin-cpvt']['train'][0]:.2f} (medians)"
    lines.append(
        f"| {SPEED_CLAIM.source} | {SPEED_CLAIM.statement} (`dssa` / `swin-cpvt`) | training img/s on this "
        f"CPU | faster | {ratio} | **{speed_verdict(speeds)}** |"
    )
    return lines


def _values(values: dict[int, float]) -> str:
    return ", ".join(f"{value:.1f}" for _, value in sorted(values.items()))


def variants_table(records: list[dict[str, Any]], protocol: Protocol, speeds: dict[str, Any]) -> list[str]:
    failed = gate_failures(records, protocol)
    lines = [
        f"| variant | {MAIN_TASK}: test top-1 (%), mean [95% interval] | per seed | control (%) per seed "
        "| control gate | params (M) | GMACs | train img/s | inference img/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in VARIANTS:
        main = by_seed(records, MAIN_TASK, name, "top1")
        control = by_seed(records, CONTROL_TASK, name, "top1")
        if not main and not control:
            continue
        mean = "—"
        if main:
            interval = Interval.of(list(main.values()))
            spread = "" if interval.count < 2 else f" [{interval.low:.1f}, {interval.high:.1f}]"
            mean = f"{interval.mean:.1f}{spread}"
        sample = next(r for r in records if r["variant"] == name)
        speed = speeds.get(name)
        rates = f"{speed['train'][0]:.0f} | {speed['inference'][0]:.0f}" if speed else "— | —"
        lines.append(
            f"| `{name}` | {mean} | {_values(main)} | {_values(control)} | {failed.get(name, 'passed')} | "
            f"{sample['params'] / 1e6:.3f} | {sample['gmacs']:.3f} | {rates} |"
        )
    return lines


def pilot_table(pilot: list[dict[str, Any]], protocol: Protocol, chosen: dict[str, float]) -> list[str]:
    lines = [
        "| family (pilot variant) | " + " | ".join(f"lr {lr:g}" for lr in protocol.lrs) + " | chosen |",
        "| --- | " + " | ".join("---" for _ in protocol.lrs) + " | --- |",
    ]
    for family, lr in chosen.items():
        leader = next(v.name for v in VARIANTS.values() if v.family == family)
        scores = {r["lr"]: r["val_top1"] for r in pilot if r["variant"] == leader}
        cells = " | ".join(f"{scores[rate]:.1f}" if rate in scores else "—" for rate in protocol.lrs)
        lines.append(f"| {family} (`{leader}`) | {cells} | {lr:g} |")
    return lines


def convergence_table(records: list[dict[str, Any]]) -> list[str]:
    """Per variant: validation top-1 at the last epoch and its change over the last quarter of epochs."""
    lines = [
        f"| variant | {MAIN_TASK}: val top-1 at the last epoch (%), mean | change over the last quarter "
        "of epochs (points), mean [95% interval] |",
        "| --- | --- | --- |",
    ]
    for name in VARIANTS:
        curves = [r["val_curve"] for r in records if r["task"] == MAIN_TASK and r["variant"] == name]
        if not curves:
            continue
        quarter = len(curves[0]) // 4
        last = statistics.fmean(curve[-1] for curve in curves)
        change = Interval.of([curve[-1] - curve[-1 - quarter] for curve in curves]) if quarter else None
        shown = "—" if change is None else change.shown(1)
        lines.append(f"| `{name}` | {last:.1f} | {shown} |")
    return lines


def _saved(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    saved = save_figure(figure, path)
    plt.close(figure)
    return saved


def plot_top1(records: list[dict[str, Any]], protocol: Protocol, path: Path) -> Path:
    """Every seed's test top-1 as a dot, the mean and its 95% interval, with chance, the cue task's
    pooled-evidence ceiling and cue-blind level, and the control gate."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for axis, task in zip(axes, (MAIN_TASK, CONTROL_TASK)):
        names = [name for name in VARIANTS if by_seed(records, task, name, "top1")]
        for index, name in enumerate(names):
            values = list(by_seed(records, task, name, "top1").values())
            offsets = [index + 0.12 * (k - (len(values) - 1) / 2) for k in range(len(values))]
            axis.scatter(offsets, values, s=18, color="C0", alpha=0.7, zorder=3)
            interval = Interval.of(values)
            if interval.count > 1:
                error = [[interval.mean - interval.low], [interval.high - interval.mean]]
                axis.errorbar(index + 0.4, interval.mean, yerr=error, fmt="o", color="black", capsize=3)
        axis.axhline(CHANCE, color="grey", linestyle=":", label=f"chance ({CHANCE:g}%)")
        if task == MAIN_TASK:
            ceiling = 100 * pooled_evidence_ceiling()
            axis.axhline(
                ceiling, color="C3", linestyle="--", label=f"pooled-evidence ceiling ({ceiling:.1f}%)"
            )
            axis.axhline(CUE_BLIND, color="C1", linestyle="-.", label=f"ignoring the cue ({CUE_BLIND:g}%)")
        else:
            axis.axhline(
                protocol.control_gate, color="C2", linestyle="--", label=f"gate ({protocol.control_gate:g}%)"
            )
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_ylim(0, 101)
        axis.set_ylabel("test top-1 (%)")
        axis.set_title(f"{task}: dots = seeds, black = mean and 95% interval")
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3)
    return _saved(plt, figure, path)


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Validation top-1 after every epoch: each seed thin, the mean over seeds thick, per task."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, task in zip(axes, (MAIN_TASK, CONTROL_TASK)):
        for index, name in enumerate(VARIANTS):
            curves = [r["val_curve"] for r in records if r["task"] == task and r["variant"] == name]
            if not curves:
                continue
            epochs = range(1, len(curves[0]) + 1)
            for curve in curves:
                axis.plot(epochs, curve, color=f"C{index}", alpha=0.25, linewidth=0.8)
            mean = [statistics.fmean(values) for values in zip(*curves)]
            axis.plot(epochs, mean, color=f"C{index}", linewidth=2, label=name)
        axis.axhline(CHANCE, color="grey", linestyle=":")
        axis.set_xlabel("epoch")
        axis.set_title(f"{task}: validation top-1 (%)")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    return _saved(plt, figure, path)


def plot_erf(records: list[dict[str, Any]], path: Path) -> Path:
    """The receptive-field shares of the models with the same convolutions, every seed a dot."""
    plt = pyplot()
    measures = [m for m in MEASURES if m.startswith("erf_")]
    names = [n for n in VARIANTS if by_seed(records, MAIN_TASK, n, measures[0])]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(names), 1)
    for index, name in enumerate(names):
        for position, measure in enumerate(measures):
            values = list(by_seed(records, MAIN_TASK, name, measure).values())
            x = position + (index - (len(names) - 1) / 2) * width
            axis.scatter([x] * len(values), values, s=14, color=f"C{index}", alpha=0.7,
                         label=name if position == 0 else None)  # fmt: skip
    axis.set_xticks(range(len(measures)), [MEASURES[m] for m in measures], rotation=15, ha="right")
    axis.set_ylabel("gradient share outside 3 × 3 windows")
    axis.set_ylim(0, 1)
    axis.set_title(f"{MAIN_TASK}: effective receptive field, every seed a dot")
    axis.legend(fontsize=8)
    return _saved(plt, figure, path)


def write_report(
    records: list[dict[str, Any]],
    speeds: dict[str, Any],
    protocol: Protocol,
    claims_path: Path,
    plots_folder: Path,
    results_path: Path,
    runs_dir: Path | None = None,
) -> list[Path]:
    """Write the claims page and the plots from the records of ``protocol``, and the pictures of the
    trained models when their run folders are in ``runs_dir``; returns the files."""
    from sepvit.ablation.pictures import write_pictures
    from sepvit.ablation.runner import chosen_lrs

    chosen = main_records(records, protocol)
    pilot = [r for r in records if protocol.holds(r) and r["phase"] == "pilot"]
    make_folder(plots_folder, "plots folder")
    make_folder(claims_path.parent, "report folder")
    plots = []
    if chosen:
        plots = [
            plot_top1(chosen, protocol, plots_folder / "top1.png"),
            plot_curves(chosen, plots_folder / "curves.png"),
            plot_erf(chosen, plots_folder / "erf.png"),
        ]
        if runs_dir is not None:
            plots += write_pictures(records, protocol, runs_dir, plots_folder)
    relative = [Path(os.path.relpath(path, claims_path.parent)).as_posix() for path in plots]
    lrs = {}
    for family in FAMILIES:
        with contextlib.suppress(ConfigError):  # a family whose pilot is incomplete has no row
            lrs.update(chosen_lrs(records, protocol, (family,)))
    seeds = sorted({r["seed"] for r in chosen if r["task"] == MAIN_TASK})
    lines = [
        "# The paper's claims at small scale",
        "",
        f"Generated by `sepvit ablate --protocol {protocol.name}` from `{results_path.name}` "
        f"({len(chosen)} main runs, seeds {', '.join(map(str, seeds)) or 'none'}, task draw "
        f"{protocol.data_seed}); docs/ablations.md describes the task, the models, the recipe and the "
        f"rules. Smallest effect of interest: {protocol.smallest_effect:g} top-1 points, {ERF_EFFECT:g} "
        f"of gradient share. Control gate: every seed ≥ {protocol.control_gate:g}% on `{CONTROL_TASK}`. "
        f"Chance {CHANCE:g}%; the pooled-evidence ceiling of `{MAIN_TASK}` "
        f"{100 * pooled_evidence_ceiling():.1f}%; ignoring the cue {CUE_BLIND:g}%.",
        "",
        "## Claims",
        "",
        *claims_table(chosen, protocol, speeds),
        "",
        "## Every variant",
        "",
        *variants_table(chosen, protocol, speeds),
        "",
        "## Learning rates chosen on the pilot (validation top-1, %, last epoch)",
        "",
        *pilot_table(pilot, protocol, lrs),
        "",
        "## Convergence",
        "",
        *convergence_table(chosen),
        "",
        *(f"![{Path(path).stem}]({path})" for path in relative),
        "",
    ]
    write_text(claims_path, "\n".join(lines))
    return [claims_path, *plots]
