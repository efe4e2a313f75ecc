"""The ablation study's runs: train every planned run with the engine, record each as it ends.

``results.json`` holds one record per finished run: its key (protocol, the fingerprint of the
protocol's settings, data seed, phase, task, variant, seed, learning rate), test and validation
top-1 of the last epoch, the validation curve and training loss of every epoch, params, GMACs,
seconds, and the effective receptive field after stages 1 and 2, trained and at initialisation
(:func:`sepvit.explain.window_range`); and, apart, the throughput of every variant measured alone
(:func:`measure_speeds`). It is rewritten atomically after every run, so a kill at any instant
leaves it whole. A rerun skips the runs it records (and says so); an interrupted run continues from
its last checkpoint through the engine's exact resume (its run folder under ``runs/``); a run
killed before its first checkpoint starts over.

Several processes may share one results file (``shard``: each trains every N-th run of the plan):
every record is merged in under an exclusive lock on ``results.json.lock``, so none is lost.
"""

from __future__ import annotations

import fcntl
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sepvit.ablation.study import FAMILIES, VARIANTS, Protocol, Variant
from sepvit.ablation.tasks import write_image_folder
from sepvit.engine import checkpoint as ckpt
from sepvit.engine.reporting import log
from sepvit.errors import ConfigError, DataError
from sepvit.utils.files import make_folder, reason, write_text

ERF_STAGES = {"stage1": 0, "stage2": 1}
RECORD_KEY = ("protocol", "fingerprint", "data_seed", "phase", "task", "variant", "seed", "lr")
Run = tuple[str, str, int, float]  # task, variant, seed, learning rate


@dataclass
class StudyOutcome:
    results: Path
    ran: int
    skipped: int
    exit_code: int  # 0, or 128 + N when signal N stopped a run (its checkpoint was saved)


@dataclass
class Results:
    """The study's records, and the speed measurements by protocol (``{protocol: {variant: ...}}``)."""

    records: list[dict[str, Any]]
    speeds: dict[str, Any]


def record_key(record: dict[str, Any]) -> tuple:
    return tuple(record[name] for name in RECORD_KEY)


def read_results(path: Path) -> Results:
    """The records of ``path`` (none if it does not exist); a damaged file is an error, never replaced."""
    if not path.exists():
        return Results([], {})
    try:
        document = json.loads(path.read_text())
        records, speeds = document["records"], document.get("speeds", {})
        for record in records:
            record_key(record)
        if not isinstance(speeds, dict):
            raise TypeError("'speeds' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{path} is not a results file of the ablation study ({' '.join(str(error).split())}); "
            "move it away or pass another --results"
        ) from error
    return Results(records, speeds)


def write_results(path: Path, results: Results) -> None:
    make_folder(path.parent, "results folder")
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    ordered = sorted(results.records, key=lambda r: tuple(str(r[name]) for name in RECORD_KEY))
    document = {"machine": machine, "records": ordered, "speeds": results.speeds}
    write_text(path, json.dumps(document, indent=1) + "\n")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a file ``<name>.lock`` beside it) against other study processes."""
    make_folder(path.parent, "study folder")
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_record(path: Path, record: dict[str, Any]) -> None:
    """Merge ``record`` into the results file (another process may have added its own meanwhile)."""
    with locked(path):
        results = read_results(path)
        results.records = [r for r in results.records if record_key(r) != record_key(record)]
        results.records.append(record)
        write_results(path, results)


def chosen_lrs(
    records: list[dict[str, Any]], protocol: Protocol, families: tuple[str, ...] = FAMILIES
) -> dict[str, float]:
    """Each family's learning rate: the pilot's best last-epoch validation top-1 (the smaller rate on
    a tie). The pilot of each of ``families`` must be complete."""
    pilot = [r for r in records if protocol.holds(r) and r["phase"] == "pilot"]
    chosen = {}
    for family in families:
        leader = next(v.name for v in VARIANTS.values() if v.family == family)
        scores = {r["lr"]: r["val_top1"] for r in pilot if r["variant"] == leader}
        missing = [lr for lr in protocol.lrs if lr not in scores]
        if missing:
            rates = ", ".join(f"{lr:g}" for lr in missing)
            raise ConfigError(
                f"the pilot of the {family} family has not run at lr {rates}; "
                "run `sepvit ablate --phase pilot` (or without --phase) first"
            )
        chosen[family] = max(protocol.lrs, key=lambda lr: (scores[lr], -lr))
    return chosen


def task_data(protocol: Protocol, task: str, runs_dir: Path) -> Path:
    """The task's image folder (train/val/test), generated once per protocol and data seed, reused."""
    spec = protocol.task_spec(task)
    root = runs_dir / "data" / f"{task}-{protocol.name}-{protocol.fingerprint}-data{protocol.data_seed}"
    try:
        with locked(root):  # one process writes the images, the others wait and reuse them
            return write_image_folder(spec, protocol.sizes, root)
    except OSError as error:
        raise ConfigError(f"cannot write the {task} task images to {root}: {reason(error)}") from error


def run_folder(protocol: Protocol, phase: str, run: Run, runs_dir: Path) -> Path:
    task, variant, seed, lr = run
    study = runs_dir / f"{protocol.name}-{protocol.fingerprint}" / f"data{protocol.data_seed}" / phase
    return study / task / variant / f"seed{seed}-lr{lr:g}"


def receptive_fields(
    model: torch.nn.Module, init_model: torch.nn.Module, images: torch.Tensor, cell: int
) -> dict:
    """``erf_stage1_trained``, ``erf_stage1_init``, ``erf_stage2_trained``, ``erf_stage2_init``."""
    from sepvit.explain import window_range

    fields = {}
    for when, module in (("trained", model), ("init", init_model)):
        for stage, share in window_range(module, images, cell, ERF_STAGES).items():
            fields[f"erf_{stage}_{when}"] = share
    return fields


def train_one(
    protocol: Protocol, phase: str, run: Run, runs_dir: Path, device: str
) -> tuple[int, dict[str, Any] | None]:
    """Train (or resume) one run and measure it; (exit code, record), the record None if stopped."""
    from sepvit.classify.config import ClassifyConfig
    from sepvit.classify.data import ClassificationImages, eval_transform, scan_image_folder
    from sepvit.classify.models import build_classifier
    from sepvit.classify.task import ClassificationTask, classification_loader, evaluate
    from sepvit.engine.distributed import single_process
    from sepvit.engine.loop import seed_everything
    from sepvit.runs import load_run, run_training
    from sepvit.utils import count_macs, count_params

    task, variant_name, seed, lr = run
    variant = VARIANTS[variant_name]
    data = task_data(protocol, task, runs_dir)
    run_dir = run_folder(protocol, phase, run, runs_dir)
    # A run killed before its first checkpoint starts over: the engine clears what it left.
    resume = ckpt.RunCheckpoints(run_dir).latest() is not None
    config = ClassifyConfig(
        **protocol.recipe(lr, protocol.pilot_epochs if phase == "pilot" else protocol.epochs),
        model=variant.factory,
        data=str(data),
        seed=seed,
        device=device,
        output=str(run_dir.parent),
        experiment=run_dir.name,
    )
    architecture = protocol.architecture(variant)
    classify = ClassificationTask(config, architecture)
    code, result = run_training(classify, run_dir if resume else None)
    if code != 0 or result is None:
        return code, None

    context = single_process(device)
    model, description = load_run(ckpt.weights_path(run_dir, ckpt.LAST), "classify")
    model.to(context.device)
    transform = eval_transform(description.data_config)
    classes = description.class_names
    test_images = ClassificationImages(scan_image_folder(data / "test", classes), transform)
    test = evaluate(model, classification_loader(test_images, protocol.batch_size, 0, context), context)
    record = {
        "protocol": protocol.name,
        "fingerprint": protocol.fingerprint,
        "data_seed": protocol.data_seed,
        "phase": phase,
        "task": task,
        "variant": variant_name,
        "seed": seed,
        "lr": lr,
        "top1": test["top1"],
        "val_top1": result.history[-1]["val_top1"],
        "val_curve": [row["val_top1"] for row in result.history],
        "train_loss": [row["train_loss"] for row in result.history],
        "params": count_params(model),
        "gmacs": count_macs(model, (3, *protocol.img_size)) / 1e9,
        "epochs": len(result.history),
        "seconds": sum(row["epoch_seconds"] for row in result.history),
        "device": str(context.device),
    }
    if not variant.reference:  # the receptive fields compare models with the same convolutions
        images = torch.stack([test_images[i][0] for i in range(protocol.erf_images)]).to(context.device)
        seed_everything(seed)  # the engine seeds so before building: the run's own initial weights
        init_model, _ = build_classifier(variant.factory, len(classes), None, None, False, architecture)
        cell = 4 * protocol.window_size  # a first-stage window, in pixels
        record.update(receptive_fields(model, init_model.to(context.device), images, cell))
    return 0, record


def planned_runs(
    protocol: Protocol,
    phase: str,
    records: list[dict[str, Any]],
    tasks: tuple[str, ...] | None = None,
    variants: tuple[str, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
) -> list[Run]:
    """The runs of ``phase``: the pilot's grid, or the main runs at the rates the pilot chose."""
    if phase == "pilot":
        return protocol.pilot_plan(variants)
    families = tuple(dict.fromkeys(VARIANTS[name].family for name in protocol.checked(variants)))
    return protocol.main_plan(chosen_lrs(records, protocol, families), tasks, variants, seeds)


def run_study(
    protocol: Protocol,
    phase: str,
    results_path: Path,
    runs_dir: Path,
    device: str = "auto",
    tasks: tuple[str, ...] | None = None,
    variants: tuple[str, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
    train: Callable[..., tuple[int, dict[str, Any] | None]] = train_one,
    shard: tuple[int, int] = (0, 1),
) -> StudyOutcome:
    """Run every planned run of ``phase`` that ``results_path`` does not record yet, recording each as
    it ends. ``shard`` (k, n): only the runs k, k + n, k + 2n, ... of the plan, for n processes."""
    index, count = shard
    records = read_results(results_path).records  # written atomically: whole even while another shard writes
    plan = planned_runs(protocol, phase, records, tasks, variants, seeds)[index::count]
    done = {record_key(record) for record in records}
    todo = [
        run
        for run in plan
        if (protocol.name, protocol.fingerprint, protocol.data_seed, phase, *run) not in done
    ]
    if len(plan) > len(todo):
        log(f"{phase}: reusing {len(plan) - len(todo)} of {len(plan)} runs recorded in {results_path}")
    ran = 0
    for number, run in enumerate(todo, 1):
        task, variant, seed, lr = run
        name = f"{phase} {task} {variant} seed {seed} lr {lr:g}"
        log(f"[{number}/{len(todo)}] {name}")
        start = time.perf_counter()
        code, record = train(protocol, phase, run, runs_dir, device)
        if record is None:
            return StudyOutcome(results_path, ran, len(plan) - len(todo), code or 1)
        add_record(results_path, record)
        ran += 1
        log(
            f"[{number}/{len(todo)}] {name}: test top-1 {record['top1']:.2f}%, "
            f"val top-1 {record['val_top1']:.2f}%, {time.perf_counter() - start:.0f} s"
        )
    return StudyOutcome(results_path, ran, len(plan) - len(todo), 0)


def speed_subjects(protocol: Protocol, variants: list[Variant]) -> list:
    from sepvit.bench.measure import Subject
    from sepvit.classify.models import build_classifier

    def builder(variant: Variant) -> Callable[[], torch.nn.Module]:
        return lambda: build_classifier(
            variant.factory, 10, None, None, False, protocol.architecture(variant)
        )[0]

    return [Subject(v.name, builder(v), (3, *protocol.img_size), form="as_created") for v in variants]


def measure_speeds(
    protocol: Protocol, results_path: Path, threads: int, variants: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Training-step and inference img/s of ``variants`` (all by default) at the study's batch and
    ``threads``, measured in this process alone, interleaved over the protocol's rounds; stored in the
    results file beside earlier measurements of other variants."""
    from sepvit.bench.measure import BenchSettings, run_benchmark

    chosen = [VARIANTS[name] for name in variants or VARIANTS]
    rounds = protocol.speed_rounds
    measured: dict[str, Any] = {"threads": threads, "batch_size": protocol.batch_size, "rounds": rounds}
    for mode, training in (("train", True), ("inference", False)):
        settings = BenchSettings(
            batch_size=protocol.batch_size, threads=threads, rounds=rounds, latency=False, memory=False,
            form="as_created", training=training, warmup=1, min_round_seconds=protocol.speed_seconds,
        )  # fmt: skip
        run = run_benchmark(speed_subjects(protocol, chosen), settings, log=log)
        for result in run.results:
            spread = result.throughput
            measured.setdefault(result.name, {})[mode] = [spread.median, spread.low, spread.high]
    with locked(results_path):
        results = read_results(results_path)
        earlier = results.speeds.get(protocol.name, {})
        if any(earlier.get(key) != measured[key] for key in ("threads", "batch_size", "rounds")):
            earlier = {}  # measured otherwise: not comparable with these
        results.speeds[protocol.name] = {**earlier, **measured}
        write_results(results_path, results)
    return results.speeds[protocol.name]


__all__ = ["Results", "chosen_lrs", "measure_speeds", "read_results", "run_study"]
