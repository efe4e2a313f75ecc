"""The ablation study's runs: train every (task, variant, seed) with the engine, record each as it ends.

``results.json`` holds one record per finished run (task, variant, seed, test top-1, params, GMACs,
training img/s, epochs, seconds, effective receptive field after stages 1 and 3, trained and at
initialisation: :func:`sepvit.explain.window_range`). It is
rewritten atomically after every run, so a kill at any instant leaves it whole. A rerun skips the
runs it records; a run that was interrupted continues from its last checkpoint through the engine's
exact resume (its run folder under ``runs/``); a run killed before its first checkpoint starts over.

Several processes may share one results file (``shard``: each trains every N-th run of the plan):
every record is merged in under an exclusive lock on ``results.json.lock``, so none is lost.
"""

from __future__ import annotations

import fcntl
import json
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sepvit.ablation.study import VARIANTS, Protocol
from sepvit.ablation.tasks import write_image_folder
from sepvit.engine import checkpoint as ckpt
from sepvit.engine.reporting import log
from sepvit.errors import ConfigError, DataError
from sepvit.utils.files import make_folder, reason, write_text

RECORD_KEY = ("protocol", "task", "variant", "seed")


@dataclass
class StudyOutcome:
    results: Path
    ran: int
    skipped: int
    exit_code: int  # 0, or 128 + N when signal N stopped a run (its checkpoint was saved)


def record_key(record: dict[str, Any]) -> tuple:
    return tuple(record[name] for name in RECORD_KEY)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` (none if it does not exist); a damaged file is an error, never replaced."""
    if not path.exists():
        return []
    try:
        document = json.loads(path.read_text())
        records = document["records"]
        for record in records:
            record_key(record)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{path} is not a results file of the ablation study ({' '.join(str(error).split())}); "
            "move it away or pass another --results"
        ) from error
    return records


def write_results(path: Path, records: list[dict[str, Any]]) -> None:
    make_folder(path.parent, "results folder")
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    ordered = sorted(records, key=lambda r: (r["protocol"], r["task"], r["variant"], r["seed"]))
    write_text(path, json.dumps({"machine": machine, "records": ordered}, indent=2) + "\n")


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
        records = [r for r in read_results(path) if record_key(r) != record_key(record)]
        write_results(path, [*records, record])


def task_data(protocol: Protocol, task: str, runs_dir: Path) -> Path:
    """The task's image folder (train/val/test), generated once per protocol and reused."""
    spec = protocol.task_spec(task)
    root = runs_dir / "data" / f"{task}-{protocol.name}"
    try:
        with locked(root):  # one process writes the images, the others wait and reuse them
            return write_image_folder(spec, protocol.sizes, root)
    except OSError as error:
        raise ConfigError(f"cannot write the {task} task images to {root}: {reason(error)}") from error


def run_folder(protocol: Protocol, task: str, variant: str, seed: int, runs_dir: Path) -> Path:
    return runs_dir / protocol.name / task / variant / f"seed{seed}"


def receptive_fields(model: torch.nn.Module, init_model: torch.nn.Module, images: torch.Tensor) -> dict:
    """``erf_trained``, ``erf_init`` (after stage 3) and ``erf_stage1_trained``, ``erf_stage1_init``."""
    from sepvit.explain import window_range

    fields = {}
    for when, module in (("trained", model), ("init", init_model)):
        ranges = window_range(module, images)
        fields[f"erf_{when}"] = ranges["stage3"]
        fields[f"erf_stage1_{when}"] = ranges["stage1"]
    return fields


def train_one(
    protocol: Protocol, task: str, variant_name: str, seed: int, runs_dir: Path, device: str
) -> tuple[int, dict[str, Any] | None]:
    """Train (or resume) one run and measure it; (exit code, record), the record None if stopped."""
    from sepvit.classify.config import ClassifyConfig
    from sepvit.classify.data import ClassificationImages, eval_transform, scan_image_folder
    from sepvit.classify.models import build_classifier as create_model
    from sepvit.classify.task import ClassificationTask, classification_loader, evaluate
    from sepvit.engine.distributed import single_process
    from sepvit.engine.loop import seed_everything
    from sepvit.runs import run_training
    from sepvit.utils import count_macs, count_params

    variant = VARIANTS[variant_name]
    data = task_data(protocol, task, runs_dir)
    run_dir = run_folder(protocol, task, variant_name, seed, runs_dir)
    resume = ckpt.RunCheckpoints(run_dir).latest() is not None
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing in it to keep
    config = ClassifyConfig(
        **protocol.recipe(),
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
    model = classify.model
    weights, _ = ckpt.read_weights(ckpt.weights_path(run_dir, ckpt.BEST))
    ckpt.load_strict(model, weights, str(ckpt.weights_path(run_dir, ckpt.BEST)))
    model.to(context.device).eval()
    transform = eval_transform(classify.data_config)
    test_images = ClassificationImages(scan_image_folder(data / "test", classify.classes), transform)
    test = evaluate(model, classification_loader(test_images, protocol.batch_size, 0, context), context)
    erf_images = torch.stack([test_images[i][0] for i in range(protocol.erf_images)]).to(context.device)
    seed_everything(seed)  # the engine seeds so before building: the run's own initial weights
    init_model, _ = create_model(
        variant.factory, len(classify.classes), protocol.img_size, None, False, architecture
    )
    speeds = [row["train_images_per_s"] for row in result.history if row.get("train_images_per_s")]
    record = {
        "protocol": protocol.name,
        "task": task,
        "variant": variant_name,
        "seed": seed,
        "top1": test["top1"],
        "val_top1": result.best.get("value"),
        "params": count_params(model),
        "gmacs": count_macs(model, (3, protocol.img_size, protocol.img_size)) / 1e9,
        "images_per_s": statistics.median(speeds) if speeds else None,
        "epochs": len(result.history),
        "seconds": sum(row["epoch_seconds"] for row in result.history),
        **receptive_fields(model, init_model.to(context.device), erf_images),
        "device": str(context.device),
    }
    return 0, record


def run_study(
    protocol: Protocol,
    results_path: Path,
    runs_dir: Path,
    device: str = "auto",
    tasks: tuple[str, ...] | None = None,
    variants: tuple[str, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
    train: Callable[..., tuple[int, dict[str, Any] | None]] = train_one,
    shard: tuple[int, int] = (0, 1),
) -> StudyOutcome:
    """Run every planned run that ``results_path`` does not record yet, recording each as it ends.

    ``shard`` (k, n): only the runs k, k + n, k + 2n, ... of the plan, for n processes side by side."""
    index, count = shard
    plan = protocol.plan(tasks, variants, seeds)[index::count]
    records = read_results(results_path)  # written atomically: whole even while another shard writes
    done = {record_key(record) for record in records}
    todo = [run for run in plan if (protocol.name, *run) not in done]
    log(
        f"ablation study, protocol {protocol.name}: {len(plan)} runs, "
        f"{len(plan) - len(todo)} already recorded"
    )
    ran = 0
    for index, (task, variant, seed) in enumerate(todo, 1):
        log(f"[{index}/{len(todo)}] {task} {variant} seed {seed}")
        start = time.perf_counter()
        code, record = train(protocol, task, variant, seed, runs_dir, device)
        if record is None:
            return StudyOutcome(results_path, ran, len(plan) - len(todo), code or 1)
        add_record(results_path, record)
        ran += 1
        log(
            f"[{index}/{len(todo)}] {task} {variant} seed {seed}: test top-1 {record['top1']:.2f}%, "
            f"ERF {record['erf_trained']:.3f} (init {record['erf_init']:.3f}), "
            f"{time.perf_counter() - start:.0f} s"
        )
    return StudyOutcome(results_path, ran, len(plan) - len(todo), 0)
