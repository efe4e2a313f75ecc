"""Sub-command ``ablate`` of the ``sepvit`` command (wiring only; see :mod:`sepvit.ablation.runner`).

Exit codes: 0 done; 1 a run could not go on; 2 bad input; 130 / 143 stopped by SIGINT / SIGTERM
(the interrupted run saved a checkpoint; the same command continues the study).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from sepvit.ablation.study import PROTOCOLS, VARIANTS
from sepvit.ablation.tasks import TASKS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="rerun the paper's ablations (Tables 5-7, Figure 4) on generated local-global tasks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train every variant of the study with every seed on the pair-sum task and the "
        "single-digit control, record each run in the results file, then write the claims page and "
        "plots. Rerunning the command skips recorded runs and resumes an interrupted one.",
    )
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default="reduced",
        help="smoke: seconds, for tests; reduced: about 1.5 hours on 2 CPU cores with --jobs 2; "
        "full: for a GPU",
    )
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (none: torch's choice)"
    )
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=None, help="only these tasks (none: both)"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=tuple(VARIANTS), default=None, help="only these variants (none: all)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (none: the protocol's)")
    parser.add_argument("--runs", type=Path, default=Path("runs/ablations"), help="run folders and task data")
    parser.add_argument(
        "--results", type=Path, default=Path("docs/ablations/results.json"), help="the results file"
    )
    parser.add_argument(
        "--claims", type=Path, default=Path("docs/paper_claims.md"), help="the claims page written at the end"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the claims page and plots from the results file"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained side by side, each in its own process (with --threads threads, default 1)",
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


def worker_command(args: argparse.Namespace, shard: int) -> list[str]:
    """The command line of one of ``args.jobs`` worker processes: the same study, every N-th run."""
    command = [sys.executable, "-m", "sepvit", "ablate", "--protocol", args.protocol, "--device", args.device]
    command += ["--threads", str(args.threads or 1), "--runs", str(args.runs), "--results", str(args.results)]
    command += ["--claims", str(args.claims), "--shard", f"{shard}/{args.jobs}"]
    for option, values in (("--tasks", args.tasks), ("--variants", args.variants), ("--seeds", args.seeds)):
        if values:
            command += [option, *map(str, values)]
    return command


def run_workers(args: argparse.Namespace) -> int:
    """Run the study in ``args.jobs`` processes; a signal to this one is passed on to each of them."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)}
    # Own sessions: a Ctrl-C reaches only this process, which passes it on once.
    workers = [
        subprocess.Popen(worker_command(args, k), env=environment, start_new_session=True)
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


def ablate_command(args: argparse.Namespace) -> int:
    import torch

    from sepvit.ablation.report import write_report
    from sepvit.ablation.runner import read_results, run_study
    from sepvit.errors import ConfigError

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    protocol = PROTOCOLS[args.protocol]
    code = 0
    if args.jobs > 1 and not args.report_only:
        code = run_workers(args)
    elif not args.report_only:
        try:
            outcome = run_study(
                protocol,
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
        code = outcome.exit_code
        print(f"{outcome.ran} run(s) trained, {outcome.skipped} already recorded: {outcome.results}")
        if args.shard[1] > 1:
            return code  # the process that started the workers writes the report
    written = write_report(
        read_results(args.results), protocol.name, args.claims, args.results.parent, args.results
    )
    print(f"report: {', '.join(str(path) for path in written)}")
    return code
