"""The package's import structure: every module imports on its own, the model library knows nothing of
the applications, only ``python -m sepvit`` knows the command line, and subpackages form no cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from sepvit.cli import COMMAND_MODULES

SRC = Path(__file__).resolve().parents[1] / "src"
# The model library: what `pip install sepvit` users get; it imports none of the applications.
LIBRARY = {"sepvit", "errors", "models", "layers", "utils", "data_io"}
# Imports that issue 13's engine removes (library exceptions instead of the CLI's CliError, export
# no longer needing bench). These lists only shrink: a fixed entry must be deleted here.
KNOWN_CLI_IMPORTERS: set[str] = set()
KNOWN_CYCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((SRC / "sepvit").rglob("*.py"))}


def imported_names(name: str) -> set[str]:
    """Every module a module imports, at any depth of its code (function-level imports too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def subpackage(module: str) -> str:
    """``sepvit.train.data`` -> ``train``; ``sepvit.cli`` -> ``cli``; ``sepvit`` -> ``sepvit``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def subpackage_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        for target in imported_names(name):
            if target in MODULES and subpackage(name) != subpackage(target):
                graph.setdefault(subpackage(name), set()).add(subpackage(target))
    # The command line imports its sub-command modules by name.
    graph.setdefault("cli", set()).update(subpackage(module) for module in COMMAND_MODULES)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_scan_sees_imports():
    # The scan itself: a function-level, a relative and a from-import are all found.
    assert "sepvit.errors.DataError" in imported_names("sepvit.data_io.images")
    assert "sepvit.models.sepvit" in imported_names("sepvit.models")
    assert "sepvit.export.export_onnx" in imported_names("sepvit.bench.measure")  # inside a method
    assert cycles({"a": {"b"}, "b": {"c", "a"}, "c": set(), "d": {"d"}}) == [{"a", "b"}]


def test_only_the_entry_point_imports_the_command_line():
    importers = {
        name for name in MODULES if any(subpackage(target) == "cli" for target in imported_names(name))
    } - {"sepvit.__main__"}
    assert not importers - KNOWN_CLI_IMPORTERS, "raise sepvit.errors exceptions instead of the CLI's"
    assert not KNOWN_CLI_IMPORTERS - importers, "fixed: delete these from KNOWN_CLI_IMPORTERS"


def test_the_model_library_imports_no_application():
    graph = subpackage_graph()
    for name in LIBRARY:
        # models/table.py's CLI import is counted by the test above
        assert graph.get(name, set()) - {"cli"} <= LIBRARY, f"{name} imports {graph[name] - LIBRARY}"


def test_subpackages_form_no_cycle():
    graph = subpackage_graph()
    # Every importer of sepvit.cli closes a cycle through it; those are counted above.
    without_cli = {node: targets - {"cli"} for node, targets in graph.items() if node != "cli"}
    found = cycles(without_cli)
    assert [cycle for cycle in found if cycle not in KNOWN_CYCLES] == []
    assert [cycle for cycle in KNOWN_CYCLES if cycle not in found] == [], "fixed: delete from KNOWN_CYCLES"


IMPORT_EACH_ALONE = """
import importlib, json, os, sys
import sepvit  # loaded once: importing any submodule runs the package's __init__ first anyway

failures = {}
for name in sys.argv[1:]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            importlib.import_module(name)
            message = ""
        except BaseException as error:
            message = f"{type(error).__name__}: {error}"
        os.write(write_end, message.encode()[:4000])
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    if message:
        failures[name] = message
print(json.dumps(failures))
"""


def test_every_module_imports_on_its_own():
    """Each module first in a fresh interpreter (a fork of one that imported only the package): an
    import cycle that only some import orders survive fails here."""
    assert len(MODULES) > 40
    completed = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_ALONE, *sorted(MODULES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {}
