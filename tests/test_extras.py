"""Optional dependencies: the models work without any extra; a missing extra is named in one line."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sepvit.errors import MissingExtraError
from sepvit.utils.extras import EXTRAS, require

SRC = Path(__file__).resolve().parents[1] / "src"
PYPROJECT = SRC.parent / "pyproject.toml"
# What `pip install sepvit` does not install; the model library must not need any of it.
OPTIONAL_MODULES = (
    "onnx", "onnxruntime", "onnxscript", "matplotlib", "sklearn", "yaml", "tensorboard", "pycocotools",
    "tqdm", "webdataset", "datasets",
)  # fmt: skip

# Direct imports of optional modules that issue 13's engine routes through ``require``; this list
# only shrinks (a routed entry must be deleted here), and no new direct import may appear.
KNOWN_DIRECT_IMPORTS: set[tuple[str, str]] = set()

WITHOUT_EXTRAS = f"""
import json, sys
for name in {OPTIONAL_MODULES!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import timm, torch
import sepvit, sepvit.bench, sepvit.data_io, sepvit.export, sepvit.utils
from sepvit.errors import MissingExtraError
from sepvit.utils.extras import require

report = {{"outputs": {{}}, "errors": {{}}}}
torch.manual_seed(0)
for name in ("sepvit_lite", "sv_efficientvit_m0", "sv_mobilevitv2_050"):
    model = timm.create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    report["outputs"][name] = [list(out.shape), bool(torch.isfinite(out).all())]

def error_of(call):
    try:
        call()
    except MissingExtraError as error:
        return str(error)
    return None

report["errors"]["require"] = error_of(lambda: require("onnx", "export"))
report["errors"]["export_onnx"] = error_of(
    lambda: sepvit.export.export_onnx(model, sys.argv[1] + "/m.onnx", (3, 64, 64))
)
report["errors"]["onnxruntime_session"] = error_of(lambda: sepvit.export.onnxruntime_session("m.onnx"))
print(json.dumps(report))
"""


def test_models_work_without_any_extra_and_extras_are_named(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["outputs"] == {
        name: [[1, 7], True] for name in ("sepvit_lite", "sv_efficientvit_m0", "sv_mobilevitv2_050")
    }
    for where, message in report["errors"].items():
        assert message is not None, f"{where} raised no MissingExtraError"
        assert "pip install 'sepvit[export]'" in message and "\n" not in message, message
    assert report["errors"]["require"] == "onnx is not installed: pip install 'sepvit[export]'"
    assert "onnxruntime is not installed" in report["errors"]["onnxruntime_session"]
    assert not list(tmp_path.iterdir())  # nothing written before the missing extra was noticed


def test_require_returns_the_module():
    import json as json_module
    import os.path

    assert require("json", "train") is json_module
    assert require("os.path", "train") is os.path


def test_require_names_the_missing_module_and_extra():
    with pytest.raises(
        MissingExtraError, match=r"^no_such_module_x is not installed: pip install 'sepvit\[dense\]'$"
    ):
        require("no_such_module_x", "dense")
    with pytest.raises(ImportError):  # MissingExtraError is an ImportError too
        require("no_such_module_x.sub", "bench")


def test_require_tells_a_broken_install_from_a_missing_one(tmp_path, monkeypatch):
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import its_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as caught:
        require("half_installed", "export")
    assert str(caught.value) == (
        "half_installed cannot be imported (No module named 'its_missing_dependency'): "
        "pip install 'sepvit[export]'"
    )


def test_require_rejects_an_unknown_extra():
    with pytest.raises(ValueError, match="unknown extra 'trian'"):
        require("json", "trian")


def distribution_name(requirement: str) -> str:
    """The normalised project name a requirement string starts with (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


@pytest.fixture(scope="module")
def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads(PYPROJECT.read_text())["project"]


def extra_closure(project: dict, extra: str) -> set[str]:
    """The distributions ``sepvit[extra]`` installs beyond the base, following ``sepvit[...]`` entries."""
    names = set()
    for requirement in project["optional-dependencies"][extra]:
        inner = re.fullmatch(r"sepvit\[([a-z,]+)\]", requirement)
        if inner:
            for other in inner.group(1).split(","):
                names |= extra_closure(project, other)
        else:
            names.add(distribution_name(requirement))
    return names


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    top = module.split(".")[0]
    found = installed_distributions().get(top)
    assert found, f"{top} is not installed here: cannot tell which distribution provides it"
    return {distribution_name(name) for name in found}


def required_modules() -> list[tuple[str, str, str]]:
    """Every ``require("module", "extra")`` call in the package, with its file."""
    calls = []
    for path in sorted((SRC / "sepvit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "require"
                and len(node.args) == 2
            ):
                module, extra = (arg.value for arg in node.args)
                calls.append((str(path.relative_to(SRC)), module, extra))
    return calls


def test_base_install_is_the_models_only(project):
    base = {distribution_name(requirement) for requirement in project["dependencies"]}
    assert base == {"torch", "timm", "safetensors", "numpy", "pillow", "huggingface-hub"}
    for module in OPTIONAL_MODULES:
        assert not distributions_of(module) & base, module


def test_extras_are_declared_and_dev_installs_everything(project):
    extras = project["optional-dependencies"]
    assert set(extras) == set(EXTRAS)
    everything = set().union(*(extra_closure(project, extra) for extra in extras if extra != "dev"))
    assert extra_closure(project, "dev") >= everything
    assert extra_closure(project, "all") >= set().union(
        *(extra_closure(project, extra) for extra in ("train", "export", "dense", "bench", "cluster"))
    )
    assert ".[dev]" in (SRC.parent / "Makefile").read_text()


def direct_optional_imports() -> set[tuple[str, str]]:
    """(file, optional module) for every ``import``/``from ... import`` of one, at any depth."""
    found = set()
    for path in sorted((SRC / "sepvit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                if name == "torch.utils.tensorboard":
                    name = "tensorboard"
                if name.split(".")[0] in (*OPTIONAL_MODULES, "vit_pytorch"):
                    found.add((str(path.relative_to(SRC)), name.split(".")[0]))
    return found


def test_optional_modules_are_imported_through_require():
    found = direct_optional_imports()
    assert not found - KNOWN_DIRECT_IMPORTS, "import these with sepvit.utils.extras.require"
    assert not KNOWN_DIRECT_IMPORTS - found, "routed: delete these from KNOWN_DIRECT_IMPORTS"


def test_every_required_module_is_in_the_extra_it_names(project):
    calls = required_modules()
    assert {module for _, module, _ in calls} >= {"onnx", "onnxruntime", "onnxscript", "matplotlib"}
    for path, module, extra in calls:
        provider = "tensorboard" if module == "torch.utils.tensorboard" else module  # torch's module needs it
        installed_by_extra = distributions_of(provider) & extra_closure(project, extra)
        assert installed_by_extra, f"{path}: {module} not in [{extra}]"


EXPORT_WITHOUT_ONNX = """
import sys
for name in ("onnx", "onnxruntime", "onnxscript"):
    sys.modules[name] = None
from sepvit.cli import main
sys.exit(main(["export", "sv_efficientvit_m0", "--img-size", "64", "--output", sys.argv[1]]))
"""


def test_export_command_without_the_export_extra_says_so_in_one_line(tmp_path):
    output = tmp_path / "m.onnx"
    completed = subprocess.run(
        [sys.executable, "-c", EXPORT_WITHOUT_ONNX, str(output)], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert completed.stderr == "sepvit export: error: onnx is not installed: pip install 'sepvit[export]'\n"
    assert not output.exists()
