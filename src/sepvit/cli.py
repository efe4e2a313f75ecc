"""The ``sepvit`` command: one entry point, one sub-command module per capability."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes ``register(subparsers)``, adding its sub-commands with ``set_defaults(func=...)``;
# ``func(args)`` returns the process exit code.
COMMAND_MODULES = (
    "sepvit.models.table",
    "sepvit.train.cli",
    "sepvit.bench.cli",
    "sepvit.export.cli",
    "sepvit.dense.cli",
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sepvit",
        description="Efficient vision transformers: train, evaluate, predict, benchmark and export.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sepvit.utils.memory import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # every command runs large tensors; see sepvit.utils.memory
    try:
        return int(args.func(args) or 0)
    except CliError as error:
        print(f"sepvit {args.command}: error: {error}", file=sys.stderr)
        return 2
