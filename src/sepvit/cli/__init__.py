"""The ``sepvit`` command: one entry point, one module per command group.

Only here do the library's exceptions become messages and exit codes: a
:class:`~sepvit.errors.SepViTError` is printed as one line ``sepvit COMMAND: error: ...`` with exit
code 1 when a run could not go on (:class:`~sepvit.errors.TrainingError`) and 2 for bad input,
options or files; a training command stopped by signal N (after saving) exits with 128 + N, the
status :func:`sepvit.runs.run_training` gives.
"""

from __future__ import annotations

import argparse
import sys
import typing

from sepvit.cli import ablate, bench, classify, dense, explain, export, models
from sepvit.errors import SepViTError, TrainingError

# Each module's ``register(subparsers)`` adds its commands with ``set_defaults(func=...)``;
# ``func(args)`` returns the process exit code.
COMMAND_GROUPS = (models, classify, bench, export, dense, ablate, explain)


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad command line as one line ``sepvit COMMAND: error: ...`` with exit code 2, like
    every other bad input (``--help`` still prints the usage); its subcommands' parsers are of this
    class too."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sepvit",
        description="Efficient vision transformers: train, evaluate, predict, benchmark and export.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    from sepvit.utils.memory import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # every command runs large tensors; see sepvit.utils.memory
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    try:
        return int(args.func(args) or 0)
    except SepViTError as error:
        print(f"sepvit {command}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 1 if isinstance(error, TrainingError) else 2
