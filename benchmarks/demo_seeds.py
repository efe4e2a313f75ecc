"""The digits demo over many seeds: per-seed accuracy, mean, std, min and max, against an SVM baseline.

Each seed runs the public command in its own plain process, exactly what a user gets:
``python -m sepvit demo --seed N --data DATA [extra demo options]``; its final (EMA) weights are
evaluated by the demo itself and its accuracy read from its last lines.

``--data digits`` (the default) reports on the fixed test split (360 images). ``--data digits-val``
is for choosing a recipe: the 1,437 training images alone, split again 80/20 (stratified, fixed) into
1,149 training and 288 validation images; the test images are not loaded.

The baselines are computed here on the same split: scikit-learn's ``SVC`` (RBF kernel) on the raw
8×8 pixels (values 0-16) fitted on the training images, once with scikit-learn's digits example
settings (C=1, gamma=0.001) and once with C and gamma chosen by 5-fold stratified cross-validation
on the training images alone, from C in {1, 10, 100} and gamma in {0.0001, 0.0003, 0.001, 0.003}.

Usage (any option it does not know is passed on to ``sepvit demo``, e.g. ``--epochs 2``)::

    python benchmarks/demo_seeds.py                          # seeds 0-9 on the test split
    python benchmarks/demo_seeds.py --data digits-val --seeds 0-3 --lr 1e-3
    python benchmarks/demo_seeds.py --seeds 0 1 --epochs 2 --json runs/demo_seeds.json
    python benchmarks/demo_seeds.py --data digits-val --ensembles 2 3    # also every pair and triple

Seeds run ``--jobs`` at a time (default 2), each with ``OMP_NUM_THREADS=--threads`` (default 1):
on 2 cores, two one-thread runs side by side finish sooner than one two-thread run after another.
``--ensembles K`` also reports what averaging the predicted probabilities of K seeds' final
weights would give, for every K of the seeds run: how much of the seed-to-seed spread is variance
that an ensemble removes. Exits with status 1 when a run fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sepvit.classify.data import DIGITS, DIGITS_DATA, digits_split_indices

SVM_C, SVM_GAMMA = 1.0, 0.001  # scikit-learn's digits example
SVM_C_GRID = (1.0, 10.0, 100.0)
SVM_GAMMA_GRID = (0.0001, 0.0003, 0.001, 0.003)
RESULT_LINE = re.compile(r"^(?:test|validation) top-1 ([\d.]+)% top-5 [\d.]+% on (\d+) ", re.MULTILINE)
THROUGHPUT = re.compile(r"^epoch \d+/\d+: .*, ([\d.]+) img/s$", re.MULTILINE)


def parse_seeds(values: list[str]) -> list[int]:
    """Seeds from ``0-9``-style ranges and single numbers."""
    seeds: list[int] = []
    for value in values:
        first, _, last = value.partition("-")
        try:
            seeds.extend(range(int(first), int(last or first) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seed {value!r}: use numbers or ranges like 0-9") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be given once each, got {seeds}")
    return seeds


def svm_baselines(data: str) -> list[dict[str, Any]]:
    """Top-1 on the evaluation images of two RBF SVMs on the raw pixels (0-16), fitted on the
    training images: scikit-learn's digits example (C=1, gamma=0.001) and one whose C and gamma
    5-fold cross-validation on the training images chooses."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import SVC

    pixels, labels = load_digits(return_X_y=True)
    train_idx, eval_idx = digits_split_indices(data)
    search = GridSearchCV(
        SVC(kernel="rbf"),
        {"C": list(SVM_C_GRID), "gamma": list(SVM_GAMMA_GRID)},
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
    ).fit(pixels[train_idx], labels[train_idx])
    fixed = SVC(kernel="rbf", C=SVM_C, gamma=SVM_GAMMA).fit(pixels[train_idx], labels[train_idx])
    baselines = []
    for name, model in (("SVM", fixed), ("SVM, C and gamma by 5-fold CV", search.best_estimator_)):
        correct = int((model.predict(pixels[eval_idx]) == labels[eval_idx]).sum())
        baselines.append(
            {
                "name": name,
                "C": float(model.C),
                "gamma": float(model.gamma),
                "top1": 100.0 * correct / len(eval_idx),
                "errors": len(eval_idx) - correct,
            }
        )
    return baselines


def run_seed(seed: int, data: str, output: Path, threads: int, demo_args: list[str]) -> dict[str, Any]:
    """One ``python -m sepvit demo`` run; its accuracy, errors, wall seconds and training speed."""
    command = [sys.executable, "-m", "sepvit", "demo", "--seed", str(seed), "--data", data]
    command += ["--output", str(output), "--experiment", f"seed{seed}", *demo_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (output / f"seed{seed}.log").write_text(process.stdout + process.stderr)
    match = RESULT_LINE.search(process.stdout)
    if process.returncode != 0 or match is None:
        last = (process.stderr or process.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"seed": seed, "error": f"exit code {process.returncode}: {last[0]}", "seconds": seconds}
    top1, images = float(match.group(1)), int(match.group(2))
    speeds = [float(value) for value in THROUGHPUT.findall(process.stdout)]
    print(f"seed {seed}: top-1 {top1:.2f}% in {seconds:.0f} s", file=sys.stderr, flush=True)
    return {
        "seed": seed,
        "top1": top1,
        "errors": round(images * (100.0 - top1) / 100.0),
        "images": images,
        "seconds": seconds,
        "train_images_per_s": statistics.median(speeds) if speeds else None,
    }


def evaluation_probabilities(run_dir: Path, data: str) -> tuple[Any, Any]:
    """Class probabilities of a run's final EMA weights on the evaluation images, on the images
    and with the preprocessing ``sepvit eval`` uses, and the images' labels."""
    import torch

    from sepvit.classify.inference import held_out_loader, load_model
    from sepvit.engine.distributed import DistContext

    model, info = load_model(str(run_dir / "last_ema.safetensors"))
    loader = held_out_loader(data, info, 256, 0, DistContext(0, 1, 0, torch.device("cpu")))
    probabilities, labels = [], []
    with torch.inference_mode():
        for images, targets in loader:
            probabilities.append(model(images).softmax(-1))
            labels.append(targets)
    return torch.cat(probabilities), torch.cat(labels)


def ensemble_errors(
    output: Path, runs: list[dict[str, Any]], data: str, sizes: list[int]
) -> list[dict[str, Any]]:
    """For each size K, the errors of every K finished seeds' averaged probabilities."""
    import torch

    seeds = [run["seed"] for run in runs if "error" not in run] if sizes else []
    probabilities, labels = {}, torch.zeros(0, dtype=torch.long)
    for seed in seeds:
        probabilities[seed], labels = evaluation_probabilities(output / f"seed{seed}", data)
    results = []
    for size in sizes:
        errors = [
            int((sum(probabilities[seed] for seed in chosen).argmax(-1) != labels).sum())
            for chosen in itertools.combinations(seeds, size)
        ]
        results.append(
            {
                "size": size,
                "ensembles": len(errors),
                "errors": {str(count): errors.count(count) for count in sorted(set(errors))},
                "mean": statistics.fmean(errors) if errors else None,
                "max": max(errors, default=None),
            }
        )
    return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1), min and max of the seeds' top-1."""
    values = [run["top1"] for run in runs]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "seconds_mean": statistics.fmean(run["seconds"] for run in runs),
    }


def format_report(report: dict[str, Any]) -> str:
    split = "test" if report["data"] == DIGITS else "validation"
    lines = [
        f"sepvit demo over {len(report['runs'])} seeds on {report['data']} ({split} split, "
        f"{report['runs'][0].get('images', '?')} images), final EMA weights; "
        f"{report['jobs']} at a time, OMP_NUM_THREADS={report['threads']}",
        f"demo options: {' '.join(report['demo_args']) or '(the digits-demo preset)'}",
        "",
        "| seed | top-1 (%) | errors | seconds | train img/s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| {run['seed']} | failed: {run['error']} | | {run['seconds']:.0f} | |")
            continue
        speed = run["train_images_per_s"]
        lines.append(
            f"| {run['seed']} | {run['top1']:.2f} | {run['errors']} | {run['seconds']:.0f} | "
            f"{'-' if speed is None else f'{speed:.0f}'} |"
        )
    summary = report["summary"]
    if summary:
        lines += [
            "",
            f"top-1 mean {summary['mean']:.2f}% ± {summary['std']:.2f} (std over seeds, n-1), "
            f"min {summary['min']:.2f}%, max {summary['max']:.2f}%; "
            f"{summary['seconds_mean']:.0f} s per seed on average",
        ]
    for baseline in report["baselines"]:
        lines.append(
            f"baseline: {baseline['name']} on raw pixels (RBF, C={baseline['C']:g}, "
            f"gamma={baseline['gamma']:g}): {baseline['top1']:.2f}% {split} top-1 "
            f"({baseline['errors']} errors)"
        )
    for ensemble in report.get("ensembles", []):
        if not ensemble["ensembles"]:
            lines.append(f"ensembles of {ensemble['size']} seeds: fewer finished seeds than that")
            continue
        spread = ", ".join(f"{count} ×{times}" for count, times in ensemble["errors"].items())
        lines.append(
            f"ensembles of {ensemble['size']} seeds (their probabilities averaged), all "
            f"{ensemble['ensembles']}: errors {spread}; mean {ensemble['mean']:.2f}, max {ensemble['max']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other options are passed on to `sepvit demo` (e.g. --epochs 2 --lr 1e-3).",
    )
    parser.add_argument("--seeds", nargs="+", default=["0-9"], help="seeds and ranges (default: 0-9)")
    parser.add_argument(
        "--data",
        choices=DIGITS_DATA,
        default=DIGITS,
        help="digits: report on the test split; digits-val: a validation split carved from the "
        "training images, for choosing a recipe (default: digits)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at a time (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (default: 1)")
    parser.add_argument(
        "--output", type=Path, default=None, help="folder for the runs (default: a temporary one)"
    )
    parser.add_argument(
        "--ensembles",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="also report every K seeds' averaged predictions (K from 2 to the number of seeds)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args, demo_args = parser.parse_known_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    if any(not 2 <= size <= len(seeds) for size in args.ensembles):
        parser.error(
            f"--ensembles takes sizes from 2 to the number of seeds ({len(seeds)}), got {args.ensembles}"
        )

    with tempfile.TemporaryDirectory(prefix="demo_seeds_") as scratch:
        output = args.output or Path(scratch)
        output.mkdir(parents=True, exist_ok=True)
        baselines = svm_baselines(args.data)  # before the runs, so as not to slow them down
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(
                pool.map(lambda seed: run_seed(seed, args.data, output, args.threads, demo_args), seeds)
            )
        ensembles = ensemble_errors(output, runs, args.data, args.ensembles)
    finished = [run for run in runs if "error" not in run]
    report = {
        "data": args.data,
        "seeds": seeds,
        "jobs": args.jobs,
        "threads": args.threads,
        "demo_args": demo_args,
        "runs": runs,
        "summary": summarize(finished) if finished else None,
        "baselines": baselines,
        "ensembles": ensembles,
    }
    print(format_report(report), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_name(args.json.name + ".tmp")
        temporary.write_text(json.dumps(report, indent=2) + "\n")
        temporary.replace(args.json)
    return 0 if len(finished) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
