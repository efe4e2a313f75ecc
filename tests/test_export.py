"""ONNX export: ONNX Runtime agrees with PyTorch, the graph uses universal operators, errors are clear."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from sepvit.cli.export import register
from sepvit.errors import ConfigError
from sepvit.export import (
    ExportError,
    ExportMismatchError,
    compare_outputs,
    export_onnx,
    operator_census,
    prepare_deploy,
)
from sepvit.layers import Linear


@torch.library.custom_op("sepvit_test::twist", mutates_args=())
def twist(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).clone()


@twist.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Twist(nn.Module):
    """An operator no ONNX translation exists for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twist(x)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sepvit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def sepvit_lite_onnx(tmp_path_factory):
    import timm

    import sepvit  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("sepvit_lite").eval()
    # Random weights leave the window tokens at zero: give them values so PSA is exercised.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "window_tokens" in name:
                parameter.normal_(std=0.5)
    path = tmp_path_factory.mktemp("onnx") / "sepvit_lite.onnx"
    # check_shapes=(): the tests below compare it themselves
    return model, export_onnx(
        model, path, (3, 224, 224), dynamic_size=True, name="sepvit_lite", check_shapes=()
    )


@pytest.mark.slow
def test_sepvit_lite_matches_pytorch_at_any_batch_and_size(sepvit_lite_onnx):
    model, exported = sepvit_lite_onnx
    assert all(isinstance(axis, str) for axis in (exported.input_shape[0], *exported.input_shape[2:]))
    # 97×131 and 160×160 make the 7×7 windows overhang the maps: padding, masks and resized tokens.
    shapes = [(1, 3, 224, 224), (3, 3, 224, 224), (2, 3, 97, 131), (1, 3, 160, 160)]
    results = compare_outputs(model, exported, shapes)
    assert [r.input_shape for r in results] == shapes
    assert all(r.passed and r.max_abs_diff < 1e-4 for r in results)


@pytest.mark.slow
def test_sepvit_lite_operator_census_is_universal(sepvit_lite_onnx):
    census = operator_census(sepvit_lite_onnx[1].path)
    assert census.unexpected == {}
    for op in ("MatMul", "Softmax", "Conv", "Transpose", "Reshape"):
        assert census.counts[op] > 0
    for trick in ("GatherND", "ScatterND", "ScatterElements", "GatherElements", "Gather", "NonZero", "Loop"):
        assert census.counts[trick] == 0


@pytest.fixture(scope="module")
def sepvit_lite_fixed_onnx(sepvit_lite_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "sepvit_lite_fixed.onnx"
    return export_onnx(sepvit_lite_onnx[0], path, (3, 224, 224), name="sepvit_lite", check_shapes=())


@pytest.mark.slow
def test_fixed_size_export_drops_padding_and_masks(sepvit_lite_onnx, sepvit_lite_fixed_onnx):
    """At one size whose maps fit the windows, the graph has no padding, masking or token resizing."""
    model, dynamic = sepvit_lite_onnx
    fixed = sepvit_lite_fixed_onnx
    assert fixed.input_shape[1:] == (3, 224, 224) and isinstance(fixed.input_shape[0], str)
    results = compare_outputs(model, fixed, [(1, 3, 224, 224), (2, 3, 224, 224)])
    assert all(r.max_abs_diff < 1e-4 for r in results)
    lean, general = operator_census(fixed.path).counts, operator_census(dynamic.path).counts
    assert general["Where"] > 0 and general["Pad"] > 0
    assert lean["Where"] == 0 and lean["Pad"] == 0
    assert sum(lean.values()) < sum(general.values())


@pytest.mark.slow
def test_onnxruntime_fuses_every_bias_and_gelu(sepvit_lite_onnx, sepvit_lite_fixed_onnx, tmp_path):
    """ONNX Runtime's optimised graph: each weight product a Gemm (bias inside), each GELU one node."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(sepvit_lite_fixed_onnx.path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    weights = {initializer.name for initializer in graph.initializer}
    ops = [node.op_type for node in graph.node]
    gelus = sum(isinstance(module, nn.GELU) for module in sepvit_lite_onnx[0].modules())
    assert ops.count("Gelu") == gelus and "Erf" not in ops
    assert not [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    assert ops.count("Gemm") > 0


@pytest.mark.slow
def test_export_through_cli_writes_a_report(tmp_path, capsys):
    status = run_cli(
        "export", "test_byobnet", "--img-size", "64", "-o", str(tmp_path / "byob.onnx"),
        "--check-batch-sizes", "1", "2", "--json",
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["input_shape"][1:] == [3, 64, 64]
    assert [c["input_shape"] for c in report["comparisons"]] == [[1, 3, 64, 64], [2, 3, 64, 64]]
    assert all(c["max_abs_diff"] <= c["tolerance"] for c in report["comparisons"])
    assert report["non_universal_operators"] == {}
    assert "onnx.checker passed" in printed.err  # the progress, off the JSON


@pytest.mark.slow
def test_timm_model_dynamic_size_and_deploy(tmp_path):
    import timm

    model = timm.create_model("test_byobnet").eval()
    fused = prepare_deploy(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    exported = export_onnx(fused, tmp_path / "m.onnx", (3, 96, 96), dynamic_size=True)
    assert exported.dynamic_size
    shapes = [(1, 3, 96, 96), (3, 3, 96, 96), (2, 3, 128, 160)]
    results = compare_outputs(model, exported, shapes)  # the fused graph against the unfused model
    assert [r.input_shape for r in results] == shapes
    assert operator_census(exported.path).counts["BatchNormalization"] == 0


def test_mismatch_above_tolerance_fails(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval()
    exported = export_onnx(model, tmp_path / "conv.onnx", (3, 8, 8))
    assert compare_outputs(model, exported, [(2, 3, 8, 8)])[0].passed
    with torch.no_grad():
        model[0].bias += 0.5
    with pytest.raises(ExportMismatchError, match=r"max abs difference 0\.5 > tolerance"):
        compare_outputs(model, exported, [(2, 3, 8, 8)])


def test_failing_export_names_operator_and_module(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), Twist())).eval()
    with pytest.raises(ExportError, match=r"operator sepvit_test\.twist.* in module 1\.1 \(Twist\)"):
        export_onnx(model, tmp_path / "twist.onnx", (3, 8, 8), name="twisted")
    assert not (tmp_path / "twist.onnx").exists()


def test_unknown_model_lists_close_matches(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'sepvit_litee'; close matches: sepvit_lite"):
        run_cli("export", "sepvit_litee", "-o", str(tmp_path / "x.onnx"))


@pytest.mark.slow
def test_export_forms_go_to_a_copy_only(sepvit_lite_onnx):
    """export_onnx prepares a copy in the export forms; the model itself keeps its plain layers."""
    model = sepvit_lite_onnx[0]
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert linears and all(type(module) in (Linear, nn.Linear) for module in linears)
    assert not [module for module in model.modules() if type(module).__name__.startswith("Export")]
    assert not [module for module in model.modules() if getattr(module, "size_independent", False)]
