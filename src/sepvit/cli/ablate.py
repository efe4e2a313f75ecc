"""Sub-command ``ablate`` of the ``sepvit`` command (wiring only; see :mod:`sepvit.ablation.runner`).

Exit codes: 0 done; 1 a run could not go on; 2 bad input; 130 / 143 stopped by SIGINT / SIGTERM
(the interrupted run saved a checkpoint; the same command continues the study).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

from sepvit.ablation.study import PHASES, PROTOCOLS, VARIANTS
from sepvit.ablation.tasks import TASKS
from sepvit.cli.options import add_device, non_negative, positive

STUDY_FOLDER = Path("runs/ablations")
PUBLISHED_RESULTS, PUBLISHED_CLAIMS = Path("docs/ablations/results.json"), Path("docs/paper_claims.md")
STAGES = (*PHASES, "speed", "report")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="rerun the paper's ablations (Tables 5-6, Figure 4) on a task that needs windows to interact",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Choose each family's learning rate on a pilot, train every variant with every seed on "
        "the cued-digit task and the single-digit control, measure throughput, then write the claims page "
        "and plots. Rerunning the command reuses recorded runs and resumes an interrupted one.",
    )
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default="reduced",
        help="smoke: seconds, for tests; reduced: the 2-core CPU study (about 4 hours with "
        "--jobs 2); full: for a GPU",
    )
    parser.add_argument(
        "--phase", choices=STAGES, default=None, help="only this step (none: pilot, main, speed, report)"
    )
    add_device(parser)
    parser.add_argument("--threads", type=positive, default=None, help="torch threads per process")
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=None, help="only these tasks (main runs)"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=tuple(VARIANTS), default=None, help="only these variants (none: all)"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=non_negative,
        default=None,
        help="seeds of the main runs (none: the protocol's)",
    )
    parser.add_argument(
        "--data-seed", type=non_negative, default=0, help="the task draw: which canvases the digits make"
    )
    parser.add_argument("--runs", type=Path, default=STUDY_FOLDER, help="run folders and task data")
    parser.add_argument(
        "--results", type=Path, default=None, help="the results file (default: RUNS/results.json)"
    )
    parser.add_argument(
        "--claims", type=Path, default=None, help="the claims page (default: RUNS/paper_claims.md)"
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"record into the published study: {PUBLISHED_RESULTS} and {PUBLISHED_CLAIMS}",
    )
    parser.add_argument("--report-only", action="store_true", help="the same as --phase report")
    parser.add_argument(
        "--jobs", type=positive, default=1, help="runs trained side by side, each in its own process"
    )
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help=argparse.SUPPRESS)
    parser.set_defaults(func=ablate_command)


def parse_shard(value: str) -> tuple[int, int]:
    index, _, count = value.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, got {value!r}") from None
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {value!r}")
    return shard


def resolve_paths(args: argparse.Namespace) -> None:
    """``--publish`` names the published files; otherwise everything lands under ``--runs``."""
    if args.publish:
        args.results = args.results or PUBLISHED_RESULTS
        args.claims = args.claims or PUBLISHED_CLAIMS
    args.results = args.results or args.runs / "results.json"
    args.claims = args.claims or args.runs / "paper_claims.md"


def worker_command(args: argparse.Namespace, phase: str, shard: int) -> list[str]:
    """The command line of one of ``args.jobs`` worker processes: one phase, every N-th run of it."""
    command = [sys.executable, "-m", "sepvit", "ablate", "--protocol", args.protocol, "--phase", phase]
    command += ["--device", args.device, "--threads", str(args.threads or 1), "--runs", str(args.runs)]
    command += [
        "--results",
        str(args.results),
        "--claims",
        str(args.claims),
        "--shard",
        f"{shard}/{args.jobs}",
    ]
    command += ["--data-seed", str(args.data_seed)]
    for option, values in (("--tasks", args.tasks), ("--variants", args.variants), ("--seeds", args.seeds)):
        if values:
            command += [option, *map(str, values)]
    return command


def run_workers(args: argparse.Namespace, phase: str) -> int:
    """Run one phase in ``args.jobs`` processes; a signal to this one is passed on to each of them."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)}
    # Own sessions: a Ctrl-C reaches only this process, which passes it on once.
    workers = [
        subprocess.Popen(worker_command(args, phase, k), env=environment, start_new_session=True)
        for k in range(args.jobs)
    ]

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [worker.wait() for worker in workers]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return next((code for code in codes if code != 0), 0)


def train_phase(args: argparse.Namespace, protocol, phase: str) -> int:
    from sepvit.ablation.runner import planned_runs, read_results, run_study

    if args.jobs > 1 and args.shard == (0, 1):
        # The plan is checked here once (a missing pilot, say), not by every worker in its own line.
        records = read_results(args.results).records
        planned_runs(protocol, phase, records, args.tasks, args.variants, args.seeds)
        return run_workers(args, phase)
    try:
        outcome = run_study(
            protocol,
            phase,
            args.results,
            args.runs,
            args.device,
            tuple(args.tasks) if args.tasks else None,
            tuple(args.variants) if args.variants else None,
            tuple(args.seeds) if args.seeds else None,
            shard=args.shard,
        )
    except KeyboardInterrupt:  # outside training (which stops cleanly itself): nothing half-written
        print("sepvit ablate: stopped; the same command continues the study", file=sys.stderr)
        return 130
    print(f"{phase}: {outcome.ran} run(s) trained, {outcome.skipped} reused from {outcome.results}")
    return outcome.exit_code


def ablate_command(args: argparse.Namespace) -> int:
    import torch

    from sepvit.ablation.report import write_report
    from sepvit.ablation.runner import measure_speeds, read_results

    resolve_paths(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    protocol = dataclasses.replace(PROTOCOLS[args.protocol], data_seed=args.data_seed)
    stages = ("report",) if args.report_only else ((args.phase,) if args.phase else STAGES)
    for stage in stages:
        if stage in PHASES:
            code = train_phase(args, protocol, stage)
            if code != 0 or args.shard != (0, 1):
                return code
        elif stage == "speed":
            measure_speeds(protocol, args.results, args.threads or 1, args.variants and tuple(args.variants))
    if "report" in stages:
        results = read_results(args.results)
        speeds = results.speeds.get(protocol.name, {})
        folder = args.results.parent
        written = write_report(
            results.records, speeds, protocol, args.claims, folder, args.results, args.runs
        )
        print(f"report: {', '.join(str(path) for path in written)}")
    return 0
