"""``docs/paper_claims.md`` and the plots, generated from the study's records.

Each claim of the paper's Tables 5–7 and Figure 4 is a comparison of two variants on one measure
(test top-1, training throughput, or the effective receptive field). Ours is the difference of the
seed means; it reproduces the paper's direction when it has the paper's sign and is at least two
standard deviations (the pooled standard deviation over seeds of the two variants,
``sqrt((s_a² + s_b²) / 2)``); a smaller difference is reported as such, not as a result either way.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepvit.ablation.study import VARIANTS
from sepvit.utils.files import make_folder, write_text
from sepvit.utils.plots import pyplot, save_figure

PAIR, SINGLE = "pair-sum", "single"
MEASURES = {
    "top1": "test top-1 (%)",
    "images_per_s": "training img/s",
    "erf_trained": "ERF after stage 3, trained",
    "erf_init": "ERF after stage 3, at initialisation",
    "erf_stage1_trained": "ERF after stage 1, trained",
    "erf_stage1_init": "ERF after stage 1, at initialisation",
}

# The paper's rows (SepViT-T on ImageNet-1K): params (M), FLOPs (G), throughput (img/s), top-1 (%).
PAPER_ROWS: dict[str, tuple[str, float, float, float, float]] = {
    "swin": ("Swin-T+CPVT (Table 5)", 28.0, 4.4, 704, 81.2),
    "dssa": ("DSSA (Table 5)", 32.1, 4.4, 740, 82.2),
    "dssa-gsa": ("DSSA + GSA (Table 5)", 31.2, 4.5, 729, 82.5),
    "sepvit": ("DSSA + GSA + LWT; Win_Tokens; (D, D&G, D&G, D)", 31.2, 4.5, 729, 82.7),
    "avgpool": ("Avg_Pooling (Table 6)", 31.2, 4.5, 734, 82.2),
    "dwconv": ("Dw_Conv (Table 6)", 31.3, 4.5, 720, 82.3),
    "plan-dddd": ("(D, D, D, D) (Table 7)", 32.1, 4.4, 740, 82.2),
    "plan-d-d-dg-d": ("(D, D, D&G, D) (Table 7)", 31.2, 4.5, 733, 82.4),
    "plan-d-gd-gd-d": ("(D, G&D, G&D, D) (Table 7)", 31.2, 4.5, 729, 82.3),
}


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``worse`` on ``measure`` (``same``: they are about equal) on ``task``."""

    source: str
    statement: str
    better: str
    worse: str
    measure: str = "top1"
    task: str = PAIR
    paper: tuple[float, float] | None = None  # the paper's values of better and worse
    same: bool = False


CLAIMS: tuple[Claim, ...] = (
    Claim("Table 5", "DSSA alone beats the Swin baseline", "dssa", "swin", paper=(82.2, 81.2)),
    Claim(
        "Table 5", "DSSA is faster than the Swin baseline", "dssa", "swin", "images_per_s", paper=(740, 704)
    ),
    Claim("Table 5", "adding GSA to DSSA helps", "dssa-gsa", "dssa", paper=(82.5, 82.2)),
    Claim("Table 5", "learnable window tokens beat zero ones", "sepvit", "dssa-gsa", paper=(82.7, 82.5)),
    Claim("Table 6", "window tokens beat average pooling", "sepvit", "avgpool", paper=(82.7, 82.2)),
    Claim("Table 6", "window tokens beat a depthwise convolution", "sepvit", "dwconv", paper=(82.7, 82.3)),
    Claim("Table 7", "(D, D&G, D&G, D) beats (D, D, D, D)", "sepvit", "plan-dddd", paper=(82.7, 82.2)),
    Claim("Table 7", "(D, D&G, D&G, D) beats (D, D, D&G, D)", "sepvit", "plan-d-d-dg-d", paper=(82.7, 82.4)),
    Claim(
        "Table 7", "(D, D&G, D&G, D) beats (D, G&D, G&D, D)", "sepvit", "plan-d-gd-gd-d", paper=(82.7, 82.3)
    ),
    Claim("Figure 4", "SepViT sees a wider range than Swin (trained)", "sepvit", "swin", "erf_trained"),
    Claim(
        "Figure 4", "SepViT sees a wider range than local-only (trained)", "sepvit", "local", "erf_trained"
    ),
    Claim(
        "Figure 4", "SepViT sees a wider range than Swin (at initialisation)", "sepvit", "swin", "erf_init"
    ),
    Claim("Figure 4", "SepViT sees a wider range than local-only (at init.)", "sepvit", "local", "erf_init"),
    Claim(
        "Figure 4",
        "SepViT's first stage reaches beyond a window, unlike local-only (trained)",
        "sepvit",
        "local",
        "erf_stage1_trained",
    ),
    Claim(
        "Figure 4",
        "SepViT's first stage reaches beyond a window, unlike Swin (trained)",
        "sepvit",
        "swin",
        "erf_stage1_trained",
    ),
    Claim("task", "interaction among windows helps on pair-sum", "sepvit", "local"),
    Claim(
        "control",
        "on the single-digit task SepViT and local-only are equal",
        "sepvit",
        "local",
        task=SINGLE,
        same=True,
    ),
    Claim(
        "control",
        "on the single-digit task SepViT and Swin are equal",
        "sepvit",
        "swin",
        task=SINGLE,
        same=True,
    ),
)


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, len(values))


def summaries(records: Iterable[dict[str, Any]], measure: str) -> dict[tuple[str, str], Summary]:
    """(task, variant) -> mean and std over seeds of ``measure``, over the records that have it."""
    groups: dict[tuple[str, str], list[float]] = {}
    for record in records:
        value = record.get(measure)
        if isinstance(value, (int, float)) and math.isfinite(value):
            groups.setdefault((record["task"], record["variant"]), []).append(float(value))
    return {key: Summary.of(values) for key, values in groups.items()}


def verdict(claim: Claim, better: Summary, worse: Summary) -> str:
    """Whether our difference goes the paper's way, at two pooled standard deviations."""
    if min(better.count, worse.count) < 2:
        return "fewer than 2 seeds: no verdict"
    difference = better.mean - worse.mean
    spread = math.sqrt((better.std**2 + worse.std**2) / 2)
    within = abs(difference) < 2 * spread or difference == 0
    if claim.same:
        return "reproduces (difference < 2 std)" if within else "does not reproduce (difference ≥ 2 std)"
    if within:
        return "difference < 2 std: not resolved"
    return "reproduces" if difference > 0 else "reversed"


def _value(summary: Summary | None, measure: str) -> str:
    if summary is None:
        return "not run"
    digits = 2 if measure == "top1" else (0 if measure == "images_per_s" else 3)
    return f"{summary.mean:.{digits}f} ± {summary.std:.{digits}f} (n={summary.count})"


def claims_table(records: list[dict[str, Any]]) -> list[str]:
    tables = {measure: summaries(records, measure) for measure in MEASURES}
    lines = [
        "| source | claim | measure | paper | ours: first | ours: second | direction |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for claim in CLAIMS:
        table = tables[claim.measure]
        better, worse = table.get((claim.task, claim.better)), table.get((claim.task, claim.worse))
        paper = "—" if claim.paper is None else f"{claim.paper[0]:g} vs {claim.paper[1]:g}"
        result = "not run" if better is None or worse is None else verdict(claim, better, worse)
        lines.append(
            f"| {claim.source} | {claim.statement} (`{claim.better}` vs `{claim.worse}`, {claim.task}) | "
            f"{MEASURES[claim.measure]} | {paper} | {_value(better, claim.measure)} | "
            f"{_value(worse, claim.measure)} | {result} |"
        )
    return lines


def variants_table(records: list[dict[str, Any]]) -> list[str]:
    tables = {measure: summaries(records, measure) for measure in (*MEASURES, "params", "gmacs")}
    lines = [
        "| variant | task | top-1 (%) | params (M) | GMACs | train img/s | ERF stage 1 trained "
        "| ERF stage 3 trained | ERF stage 3 init | paper row: params (M), FLOPs (G), img/s, top-1 (%) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = sorted(tables["top1"], key=lambda key: (key[0], list(VARIANTS).index(key[1])))
    for task, variant in keys:
        row = [tables[m].get((task, variant)) for m in ("params", "gmacs")]
        paper = PAPER_ROWS.get(variant)
        shown = "—" if paper is None else f"{paper[0]}: {paper[1]}, {paper[2]}, {paper[3]:g}, {paper[4]}"
        lines.append(
            f"| `{variant}` | {task} | {_value(tables['top1'].get((task, variant)), 'top1')} | "
            f"{row[0].mean / 1e6:.3f} | {row[1].mean:.3f} | "
            f"{_value(tables['images_per_s'].get((task, variant)), 'images_per_s')} | "
            f"{_value(tables['erf_stage1_trained'].get((task, variant)), 'erf_stage1_trained')} | "
            f"{_value(tables['erf_trained'].get((task, variant)), 'erf_trained')} | "
            f"{_value(tables['erf_init'].get((task, variant)), 'erf_init')} | {shown} |"
        )
    return lines


def plot_results(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """``top1.png`` (test top-1 by variant, per task) and ``erf.png`` (range after stages 1 and 3,
    trained and at initialisation)."""
    plt = pyplot()
    paths = []
    for name, measures, title in (
        ("top1.png", ("top1",), "test top-1 (%), mean ± std over seeds"),
        (
            "erf.png",
            ("erf_stage1_trained", "erf_stage1_init", "erf_trained", "erf_init"),
            "effective receptive field: input-gradient share beyond the centre unit's window",
        ),
    ):
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        tables = [summaries(records, measure) for measure in measures]
        width = 0.8 / len(measures)
        for axis, task in zip(axes, (PAIR, SINGLE)):
            names = [v for v in VARIANTS if any((task, v) in table for table in tables)]
            for offset, (measure, table) in enumerate(zip(measures, tables)):
                shown = [table.get((task, v), Summary(math.nan, 0.0, 0)) for v in names]
                axis.bar(
                    [i + (offset - (len(measures) - 1) / 2) * width for i in range(len(names))],
                    [summary.mean for summary in shown],
                    width,
                    yerr=[summary.std for summary in shown],
                    capsize=3,
                    color=f"C{offset}",
                    label=MEASURES[measure],
                )
            axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
            axis.set_title(task)
        if len(measures) > 1:
            handles, labels = axes[0].get_legend_handles_labels()
            figure.legend(handles, labels, loc="lower center", ncol=len(measures), fontsize=8)
        figure.suptitle(title)
        figure.tight_layout(rect=(0, 0.06 if len(measures) > 1 else 0, 1, 1))
        paths.append(save_figure(figure, folder / name))
        plt.close(figure)
    return paths


def write_report(
    records: list[dict[str, Any]], protocol: str, claims_path: Path, plots_folder: Path, results_path: Path
) -> list[Path]:
    """Write the claims page and the plots from the records of ``protocol``; returns the files."""
    chosen = [record for record in records if record["protocol"] == protocol]
    make_folder(plots_folder, "plots folder")
    make_folder(claims_path.parent, "report folder")
    plots = plot_results(chosen, plots_folder) if chosen else []
    seeds = sorted({record["seed"] for record in chosen})
    relative = [Path(os.path.relpath(path, claims_path.parent)) for path in plots]
    lines = [
        "# The paper's claims at small scale",
        "",
        f"Generated by `sepvit ablate --protocol {protocol}` from `{results_path.name}` "
        f"({len(chosen)} runs, seeds {', '.join(map(str, seeds)) or 'none'}); see docs/ablations.md for "
        "the task, the models and the recipe. The paper's numbers are SepViT-T on ImageNet-1K; ours are "
        "mean ± standard deviation over seeds on the generated tasks. A claim reproduces when our "
        "difference has the paper's sign and is at least two pooled standard deviations; a smaller one "
        "is reported as not resolved. ERF, the range of Figure 4 as a number: the share of the centre "
        "unit's input-gradient mass after stage 1 or 3 outside a square three first-stage windows wide "
        "around the centre unit's window (`sepvit.explain.window_range`).",
        "",
        "## Claims",
        "",
        *claims_table(chosen),
        "",
        "## Every variant",
        "",
        *variants_table(chosen),
        "",
        *(f"![{path.stem}]({path.as_posix()})" for path in relative),
        "",
    ]
    write_text(claims_path, "\n".join(lines))
    return [claims_path, *plots]
