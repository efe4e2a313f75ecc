"""Deployment targets of issue 15 (fp32, families, bf16, int8, torch.compile) in a user's own process.

Every model is what ``import sepvit; timm.create_model(name)`` returns (random weights, eval mode),
called under ``torch.inference_mode()`` with torch's default threads; the script prepares nothing
(``sepvit.bench`` with ``form="as_created"``). Each run below times its subjects interleaved: every
round visits every subject in turn, each next to a dense matmul probe, and figures are medians over
the rounds, compared as ratios within the run.

fp32      run "inference": SepViT-T and Swin-T at batch 16 (throughput) and batch 1 (latency), with
          SepViT-T in its cpu_inference form as a third subject (reported, no target); run
          "training": the two in a training step (train mode, forward + backward, no optimiser).
          Targets: SepViT-T ahead of Swin-T in throughput, latency and training (> ×1), and its
          achieved FLOP rate ≥ 95 % of the fp32 dense matmul rate.
families  one run of every EfficientViT and MobileViTv2 size of ours (``--families`` narrows it)
          with timm's model of the same name, each as created and fused (ours ``model.fuse()``,
          timm's ``timm.utils.reparameterize_model``), at each model's own input size. Targets: ours
          ≥ ×1.2 timm's in throughput and in batch-1 latency, as created against as created and
          fused against fused.
bf16      one run of SepViT-T and Swin-T under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (fp32
          weights and inputs) and cast with ``.to(torch.bfloat16)``, against the bf16 matmul rate.
          Targets: SepViT-T ≥ ×1.3 Swin-T and ≥ 80 % of the bf16 matmul rate, in each mode. With
          ``--checkpoint``: top-1 in both modes within 0.3 points of fp32 (held-out images, as
          ``sepvit eval`` measures).
int8      one run of SepViT-Lite and SepViT-T in ONNX Runtime, fp32 and int8 (static QDQ, per-channel
          weights, calibrated on random inputs: the speed of a graph ignores its ranges). Target:
          int8 ≥ ×1.5 fp32 in throughput (batch 16) and batch-1 latency. Prints the int8 kernel
          census and whether the CPU has VNNI. With ``--checkpoint``: the top-1 drop that
          ``sepvit export CHECKPOINT --int8`` measures (default gate), target ≤ 0.5 points.
compile   one run of SepViT-T and Swin-T compiled (``torch.compile``, default mode) and eager,
          throughput only (a batch-1 call would compile again). Targets: compiled SepViT-T ≥ ×1.1
          compiled Swin-T, and not slower than eager SepViT-T.

A section whose dependency is missing (ONNX Runtime for int8, a C++ compiler for compile) is
skipped with the reason printed; the accuracy targets are skipped without ``--checkpoint``.

Allocator: with ``--allocator both`` (the default) the script runs itself twice in fresh processes:
with glibc's defaults (what a user's process does) and then, for the eager sections (fp32,
families, bf16), with freed memory kept (``sepvit.utils.keep_freed_memory``, which the ``sepvit``
command applies). Targets are judged on the first; the summary shows both. ``--allocator glibc``
or ``kept`` runs once, in this process.

Usage, on an otherwise idle machine:

    python benchmarks/deploy_targets.py --checkpoint runs/demo/last_ema.safetensors

Prints every table and target with PASS / MISS; writes each run's results.json, results.md and
throughput.png to ``--out-dir``/[ALLOCATOR/]SECTION/RUN and the targets to targets.md and
targets.json (with the command line and the machine); exits with 1 when a target is missed, 2 on
bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from sepvit.bench.measure import BenchRun, BenchSettings, Subject, run_benchmark
from sepvit.bench.models import model_subjects
from sepvit.bench.report import format_table, machine_description, write_outputs
from sepvit.bench.targets import Target, result, speedup, targets_table
from sepvit.errors import ConfigError, ExportError, MissingExtraError, SepViTError
from sepvit.utils.files import write_text

SEPVIT, SWIN = "sepvit_tiny", "swin_tiny_patch4_window7_224"
INT8_MODELS = ("sepvit_lite", "sepvit_tiny")
FAMILY_PATTERNS = ("sv_efficientvit_*", "sv_mobilevitv2_*")
SECTIONS = ("fp32", "families", "bf16", "int8", "compile")
EAGER_SECTIONS = ("fp32", "families", "bf16")  # where glibc's allocator settings act
ALLOCATORS = {"glibc": "glibc defaults", "kept": "freed memory kept"}
FP32_SPEEDUP, FP32_MATMUL_SHARE = 1.0, 0.95
FAMILY_SPEEDUP = 1.2
BF16_SPEEDUP, BF16_MATMUL_SHARE, BF16_TOP1_POINTS = 1.3, 0.8, 0.3
INT8_SPEEDUP, INT8_DROP_POINTS = 1.5, 0.5
COMPILE_SPEEDUP = 1.1
SCRIPT = "benchmarks/deploy_targets.py"
FUSED = " (fused)"  # suffix of a fused subject's name
BF16_MODES = ("autocast", "cast")  # suffixes of the bf16 subjects' names


@dataclass
class Section:
    """What one section checked: its targets, and lines to print with them (skips, census)."""

    name: str
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- targets


def fp32_targets(inference: BenchRun, training: BenchRun) -> list[Target]:
    batch = inference.settings.batch_size
    return [
        Target(
            f"SepViT-T / Swin-T throughput, fp32 batch {batch}",
            speedup(inference, SEPVIT, SWIN, "throughput"), FP32_SPEEDUP, ">",
        ),
        Target(
            "SepViT-T / Swin-T batch-1 latency (Swin-T ms / SepViT-T ms), fp32",
            speedup(inference, SEPVIT, SWIN, "latency"), FP32_SPEEDUP, ">",
        ),
        Target(
            f"SepViT-T / Swin-T training step (forward + backward), batch {training.settings.batch_size}",
            speedup(training, SEPVIT, SWIN, "throughput"), FP32_SPEEDUP, ">",
        ),
        Target(
            "SepViT-T achieved FLOP rate / fp32 dense matmul rate",
            result(inference, SEPVIT).matmul_fraction, FP32_MATMUL_SHARE,
        ),
    ]  # fmt: skip


def family_targets(run: BenchRun, pairs: list[tuple[str, str]]) -> list[Target]:
    batch = run.settings.batch_size
    targets = []
    for ours, theirs in pairs:
        for suffix, variant in (("", "as created"), (FUSED, "fused")):
            for metric, what in (("throughput", f"throughput batch {batch}"), ("latency", "batch-1 latency")):
                ratio = speedup(run, ours + suffix, theirs + suffix, metric)
                targets.append(Target(f"{ours} / {theirs} {what}, {variant}", ratio, FAMILY_SPEEDUP))
    return targets


def bf16_targets(run: BenchRun) -> list[Target]:
    batch = run.settings.batch_size
    targets = []
    for mode in BF16_MODES:
        ours, theirs = f"{SEPVIT} ({mode})", f"{SWIN} ({mode})"
        targets += [
            Target(
                f"SepViT-T / Swin-T throughput, bf16 {mode}, batch {batch}",
                speedup(run, ours, theirs, "throughput"), BF16_SPEEDUP,
            ),
            Target(
                f"SepViT-T achieved FLOP rate / bf16 dense matmul rate, bf16 {mode}",
                result(run, ours).matmul_fraction, BF16_MATMUL_SHARE,
            ),
        ]  # fmt: skip
    return targets


def bf16_accuracy_targets(top1: dict[str, float]) -> list[Target]:
    """``top1``: fp32, bf16 autocast and bf16 cast top-1 (%) of the trained checkpoint."""
    return [
        Target(
            f"top-1 points between {mode} and fp32 (absolute), trained checkpoint",
            abs(top1[mode] - top1["fp32"]),
            BF16_TOP1_POINTS,
            "≤",
        )
        for mode in ("bf16 autocast", "bf16 cast")
    ]


def int8_targets(run: BenchRun) -> list[Target]:
    batch = run.settings.batch_size
    targets = []
    for name in INT8_MODELS:
        for metric, what in (("throughput", f"throughput batch {batch}"), ("latency", "batch-1 latency")):
            ratio = speedup(run, name, name, metric, ("onnxruntime-int8", "onnxruntime"))
            targets.append(Target(f"{name} int8 / fp32 in ONNX Runtime, {what}", ratio, INT8_SPEEDUP))
    return targets


def compile_targets(run: BenchRun) -> list[Target]:
    batch = run.settings.batch_size
    return [
        Target(
            f"compiled SepViT-T / compiled Swin-T throughput, fp32 batch {batch}",
            speedup(run, SEPVIT, SWIN, "throughput", ("compile", "compile")), COMPILE_SPEEDUP,
        ),
        Target(
            f"compiled SepViT-T / eager SepViT-T throughput, fp32 batch {batch}",
            speedup(run, SEPVIT, SEPVIT, "throughput", ("compile", "eager")), 1.0,
        ),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------- subjects


def fused(subject: Subject, transform: Callable[[nn.Module], nn.Module]) -> Subject:
    return replace(subject, name=subject.name + FUSED, build=lambda: transform(subject.build()))


def family_pairs(names: list[str] | None) -> list[tuple[str, str]]:
    """(ours, timm's) for each of our EfficientViT and MobileViTv2 sizes, or those ``names`` gives
    (with or without the ``sv_`` prefix)."""
    import timm

    ours = timm.list_models(list(FAMILY_PATTERNS))
    chosen = ours if not names else ["sv_" + name.removeprefix("sv_") for name in names]
    unknown = [name for name in chosen if name not in ours]
    if unknown:
        raise ConfigError(f"--families: {', '.join(unknown)} not among ours: {', '.join(ours)}")
    return [(name, name.removeprefix("sv_")) for name in dict.fromkeys(chosen)]


def family_subjects(pairs: list[tuple[str, str]]) -> list[Subject]:
    from timm.utils import reparameterize_model

    from sepvit.export import prepare_deploy

    subjects = []
    for ours, theirs in pairs:
        mine, timms = model_subjects([ours, theirs])
        subjects += [mine, timms, fused(mine, prepare_deploy), fused(timms, reparameterize_model)]
    return subjects


def bf16_subjects() -> list[Subject]:
    base = model_subjects([SEPVIT, SWIN])
    return [
        replace(subject, name=f"{subject.name} ({mode})", autocast=mode == "autocast")
        for mode in BF16_MODES
        for subject in base
    ]


# ---------------------------------------------------------------------------------------- sections


class Bench:
    """Runs of one process: settings from the command line, tables printed and written."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args = args
        self.command = command

    def run(self, section: str, label: str, subjects: list[Subject], **changes) -> BenchRun:
        a = self.args
        settings = BenchSettings(
            batch_size=a.batch_size, warmup=a.warmup, rounds=a.rounds, min_round_seconds=a.min_round_seconds,
            latency_iters=a.latency_iters, form="as_created", **changes,
        )  # fmt: skip
        print(f"\n== {section}: {label}", flush=True)
        run = run_benchmark(subjects, settings)
        print(format_table(run), flush=True)
        write_outputs(run, a.out_dir / section / label, self.command)
        return run


def fp32_section(bench: Bench) -> Section:
    sepvit, swin = model_subjects([SEPVIT, SWIN])
    prepared = replace(sepvit, name=f"{SEPVIT} (cpu_inference)", form="cpu_inference")
    inference = bench.run("fp32", "inference", [sepvit, swin, prepared])
    training = bench.run("fp32", "training", [sepvit, swin], training=True, latency=False)
    gain = speedup(inference, prepared.name, SEPVIT, "throughput")
    note = f"SepViT-T in its cpu_inference form: ×{gain:.3f} the throughput as created (no target)"
    return Section("fp32", fp32_targets(inference, training), [note])


def families_section(bench: Bench) -> Section:
    pairs = family_pairs(bench.args.families)
    run = bench.run("families", "inference", family_subjects(pairs))
    return Section("families", family_targets(run, pairs))


def bf16_section(bench: Bench) -> Section:
    section = Section("bf16", bf16_targets(bench.run("bf16", "inference", bf16_subjects(), dtype="bf16")))
    checkpoint = bench.args.checkpoint
    if checkpoint is None:
        section.notes.append("accuracy skipped: pass --checkpoint (a trained checkpoint) to measure it")
        return section
    from sepvit.bench.accuracy import precision_top1

    accuracy = precision_top1(checkpoint)
    section.targets += bf16_accuracy_targets(accuracy.top1)
    top1 = ", ".join(f"{mode} {value:.2f}%" for mode, value in accuracy.top1.items())
    section.notes.append(f"{checkpoint}: top-1 {top1} on {accuracy.images} held-out {accuracy.data} images")
    return section


def int8_section(bench: Bench) -> Section:
    from sepvit.export.quantize import cpu_has_vnni
    from sepvit.utils.extras import require

    try:
        onnxruntime = require("onnxruntime", "export")
        require("onnx", "export")
    except MissingExtraError as error:
        return Section("int8", notes=[f"skipped: {error}"])
    section = Section("int8", notes=[f"ONNX Runtime {onnxruntime.__version__}; CPU VNNI: {cpu_has_vnni()}"])
    subjects = model_subjects(INT8_MODELS, ("onnxruntime", "onnxruntime-int8"))
    run = bench.run("int8", "onnxruntime", subjects, memory=False)
    section.targets += int8_targets(run)
    for name in INT8_MODELS:
        int8 = result(run, name, "onnxruntime-int8")
        section.notes.append(
            f"{name}: int8 kernels {int8.int8_kernels}, float products {int8.float_products}"
        )
    if bench.args.checkpoint is None:
        section.notes.append("accuracy skipped: pass --checkpoint (a trained checkpoint) to measure it")
    else:
        section.targets.append(int8_accuracy(bench.args.checkpoint, bench.args.calibration_images, section))
    return section


def int8_accuracy(checkpoint: Path, calibration_images: int, section: Section) -> Target:
    from sepvit.bench.accuracy import int8_top1

    description = "int8 top-1 drop (points) behind `sepvit export --int8`'s gate, trained checkpoint"
    try:
        report, calibration, held_out, data = int8_top1(checkpoint, calibration_images)
    except ExportError as error:  # the gate refused: int8 loses more than it allows
        section.notes.append(f"int8 gate refused {checkpoint}: {error}")
        return Target(description, math.nan, INT8_DROP_POINTS, "≤")
    kept = f"; {len(report.kept_in_float)} sensitive nodes kept in float" if report.kept_in_float else ""
    section.notes.append(
        f"{checkpoint}: top-1 fp32 {report.float_top1:.2f}%, int8 {report.int8_top1:.2f}% on {held_out} "
        f"held-out {data} images (calibrated on {calibration}){kept}; int8 kernels {report.int8_kernels}"
    )
    return Target(description, report.drop, INT8_DROP_POINTS, "≤")


def compile_section(bench: Bench) -> Section:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        return Section("compile", notes=["skipped: torch.compile's CPU backend needs a C++ compiler (g++)"])
    subjects = model_subjects([SEPVIT, SWIN], ("compile", "eager"))
    return Section("compile", compile_targets(bench.run("compile", "inference", subjects, latency=False)))


SECTION_RUNNERS: dict[str, Callable[[Bench], Section]] = {
    "fp32": fp32_section,
    "families": families_section,
    "bf16": bf16_section,
    "int8": int8_section,
    "compile": compile_section,
}


# ---------------------------------------------------------------------------------------- output


def target_rows(sections: list[Section]) -> list[dict]:
    return [{"section": s.name, **asdict(t), "met": t.met} for s in sections for t in s.targets]


def command_line(argv: list[str]) -> str:
    """The command as typed, with the environment settings that change what is measured."""
    settings = [
        f"{name}={os.environ[name]}"
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SEPVIT_KEEP_FREED_MEMORY")
        if name in os.environ
    ]
    return shlex.join([*settings, "python", SCRIPT, *argv])


# ---------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compile section")
    parser.add_argument("--families", nargs="+", metavar="MODEL", help="our sizes to compare (default: all)")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint for the accuracy targets")
    parser.add_argument("--calibration-images", type=int, default=256, help="int8 accuracy: images")
    parser.add_argument("--allocator", choices=("both", *ALLOCATORS), default="both")
    parser.add_argument("--batch-size", type=int, default=16, help="throughput and training batch (16)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of every run (5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per subject and batch size (2)")
    parser.add_argument("--min-round-seconds", type=float, default=0.5, help="per subject and round (0.5)")
    parser.add_argument("--latency-iters", type=int, default=10, help="batch-1 calls per subject and round")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/deploy_targets"))
    args = parser.parse_args(argv)
    if args.skip_compile:
        args.sections = [s for s in args.sections if s != "compile"]
    args.sections = [s for s in SECTIONS if s in args.sections]  # the documented order, no repeats
    if min(args.batch_size, args.rounds, args.latency_iters, args.calibration_images) < 1 or args.warmup < 0:
        parser.error(
            "--batch-size, --rounds, --latency-iters and --calibration-images must be ≥ 1, --warmup ≥ 0"
        )
    if not args.min_round_seconds > 0:
        parser.error("--min-round-seconds must be positive")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint} is not a file")
    return args


def run_here(args: argparse.Namespace, command: str) -> int:
    """Every section in this process; 0 when every target is met, else 1."""
    from sepvit.utils import freed_memory_kept, keep_freed_memory

    if args.allocator == "kept" and not keep_freed_memory():
        raise ConfigError("freed memory cannot be kept here (not glibc, or SEPVIT_KEEP_FREED_MEMORY=0)")
    allocator = ALLOCATORS[args.allocator]
    if args.allocator == "glibc" and freed_memory_kept():
        allocator += " requested, but this process already keeps freed memory"
    machine = machine_description()
    print(f"{command}\nallocator: {allocator}\nmachine: {json.dumps(machine)}", flush=True)
    bench = Bench(args, command)
    sections = [SECTION_RUNNERS[name](bench) for name in args.sections]
    summary = []
    for section in sections:
        summary += [f"[{section.name}] {t.line()}" for t in section.targets]
        summary += [f"[{section.name}] {note}" for note in section.notes]
    print("\n" + "\n".join(summary), flush=True)
    rows = target_rows(sections)
    notes = {section.name: section.notes for section in sections}
    payload = {
        "command": command,
        "allocator": allocator,
        "machine": machine,
        "targets": rows,
        "notes": notes,
    }
    write_text(args.out_dir / "targets.json", json.dumps(payload, indent=2) + "\n")
    write_text(args.out_dir / "targets.md", targets_table({allocator: rows}, command, machine))
    return 0 if all(row["met"] for row in rows) else 1


def child_argv(args: argparse.Namespace, allocator: str, sections: list[str]) -> list[str]:
    argv = [
        "--allocator", allocator, "--sections", *sections, "--out-dir", str(args.out_dir / allocator),
        "--batch-size", str(args.batch_size), "--rounds", str(args.rounds), "--warmup", str(args.warmup),
        "--min-round-seconds", str(args.min_round_seconds), "--latency-iters", str(args.latency_iters),
        "--calibration-images", str(args.calibration_images),
    ]  # fmt: skip
    if args.families:
        argv += ["--families", *args.families]
    if args.checkpoint is not None and allocator == "glibc":  # accuracy does not depend on malloc
        argv += ["--checkpoint", str(args.checkpoint)]
    return argv


def run_both(args: argparse.Namespace, command: str) -> int:
    """This script in a fresh process per allocator setting; the glibc run's targets decide."""
    columns: dict[str, list[dict]] = {}
    machine: dict = {}
    status = 0
    for allocator in ALLOCATORS:
        sections = [s for s in args.sections if allocator == "glibc" or s in EAGER_SECTIONS]
        if not sections:
            continue
        argv = child_argv(args, allocator, sections)
        print(f"\n===== {ALLOCATORS[allocator]}", flush=True)
        code = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv]).returncode
        if code not in (0, 1):
            return code  # the child printed its error
        status = status or (code if allocator == "glibc" else 0)
        payload = json.loads((args.out_dir / allocator / "targets.json").read_text())
        columns[ALLOCATORS[allocator]] = payload["targets"]
        machine = machine or payload["machine"]
    table = targets_table(columns, command, machine)
    print(f"\nTargets (judged on {next(iter(columns))}):\n{table}", flush=True)
    write_text(args.out_dir / "targets.md", table)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = command_line(argv)
    try:
        # A wrong name or a broken checkpoint fails now, not after the sections before it.
        family_pairs(args.families)
        if args.checkpoint is not None:
            from sepvit.bench.accuracy import load_checkpoint

            load_checkpoint(args.checkpoint)
        return run_both(args, command) if args.allocator == "both" else run_here(args, command)
    except SepViTError as error:
        print(f"deploy_targets: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
