"""The package's import structure, read top to bottom: the command line, the tasks, the training
engine, the models, the layers, with the shared helpers beneath them all; nothing imports upwards,
the tasks form no cycle, the command line reaches its commands through plain imports, and the engine
and the command line keep their functions short."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TASKS = {"classify", "dense", "ablation", "explain", "export", "bench", "runs"}
# Each subpackage's level: a subpackage imports only those of lower levels (tasks also other tasks).
LEVELS = {
    "__main__": 7,  # python -m sepvit
    "cli": 6,
    **dict.fromkeys(TASKS, 5),
    "engine": 4,
    "sepvit": 4,  # the package itself: importing it registers the models
    "models": 3,
    "layers": 2,
    "utils": 1,
    "data_io": 1,
    "errors": 0,
}
MAX_FUNCTION_LINES = 60


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
    """``sepvit.classify.data`` -> ``classify``; ``sepvit.errors`` -> ``errors``; ``sepvit`` -> ``sepvit``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def subpackage_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        for target in imported_names(name):
            if target in MODULES and subpackage(name) != subpackage(target):
                graph.setdefault(subpackage(name), set()).add(subpackage(target))
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


def test_every_subpackage_has_a_level():
    assert {subpackage(name) for name in MODULES} <= set(LEVELS)


def test_nothing_imports_upwards():
    upwards = {
        f"{source} -> {target}"
        for source, targets in subpackage_graph().items()
        for target in targets
        if LEVELS[target] >= LEVELS[source] and not {source, target} <= TASKS
    }
    assert not upwards, "imports of a level not below: " + ", ".join(sorted(upwards))


def test_subpackages_form_no_cycle():
    assert cycles(subpackage_graph()) == []


def test_the_command_line_imports_its_commands_plainly():
    """No module reaches another through a string (``importlib.import_module``): readers and tools
    see every dependency. Only :mod:`sepvit.utils.extras` imports by name, the optional third-party
    packages of the extras."""
    by_name = {name for name in MODULES if "importlib" in imported_names(name)}
    assert by_name <= {"sepvit.utils.extras"}


def test_engine_and_command_line_functions_are_short():
    long = [
        f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, path in MODULES.items()
        if subpackage(name) in ("engine", "cli")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "split these: " + ", ".join(long)


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
