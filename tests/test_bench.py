"""sepvit bench: every field measured and sane, outputs written, presets, blocks and bad names."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from sepvit.bench.blocks import table1_subjects
from sepvit.bench.measure import Spread
from sepvit.bench.models import UnknownModelError, resolve_model_names
from sepvit.bench.presets import PRESETS
from sepvit.bench.report import pareto_front
from sepvit.cli.bench import register
from sepvit.errors import ConfigError
from sepvit.utils import count_macs, count_params


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sepvit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.mark.slow
def test_bench_two_tiny_models_writes_every_field(tmp_path, capsys):
    import timm

    import sepvit  # noqa: F401

    status = run_cli(
        "bench", "sepvit_lite", "test_vit", "--img-size", "64", "--batch-size", "2", "--warmup", "1",
        "--rounds", "2", "--min-round-seconds", "0.05", "--latency-iters", "3", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert status == 0
    screen = capsys.readouterr().out
    assert "sepvit_lite" in screen and "test_vit" in screen and "% of matmul" in screen

    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["settings"]["batch_size"] == 2 and payload["machine"]["torch"] == torch.__version__
    matmul = payload["matmul_flops"]["median"]
    assert 1e8 < matmul < 1e15
    assert [r["name"] for r in payload["results"]] == ["sepvit_lite", "test_vit"]
    for result in payload["results"]:
        model = timm.create_model(result["name"], img_size=(64, 64))
        assert result["params"] == count_params(model)
        assert result["macs"] == count_macs(model, (3, 64, 64)) > 0
        assert result["input_shape"] == [3, 64, 64] and result["backend"] == "eager"
        throughput = result["throughput"]
        assert 0 < throughput["low"] <= throughput["median"] <= throughput["high"]
        assert 0 < result["latency_ms"] <= result["latency_p90_ms"]
        assert result["peak_memory_mb"] is not None and result["peak_memory_mb"] >= 0
        assert result["achieved_gflops"] == pytest.approx(2 * result["macs"] * throughput["median"] / 1e9)
        assert result["matmul_fraction"] == pytest.approx(result["achieved_gflops"] * 1e9 / matmul)
    assert payload["results"][0]["top1"] == 72.3  # the paper's, SepViT-Lite

    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("Command: `sepvit ") and "| sepvit_lite | eager |" in markdown
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_onnxruntime_backend_runs_alongside_eager(tmp_path):
    status = run_cli(
        "bench", "test_resnet", "--img-size", "64", "--backend", "eager", "onnxruntime", "--batch-size", "2",
        "--warmup", "1", "--rounds", "2", "--min-round-seconds", "0.05", "--latency-iters", "2",
        "--no-memory", "--opset", "17", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert status == 0
    report = json.loads((tmp_path / "results.json").read_text())
    results = report["results"]
    assert [(r["name"], r["backend"]) for r in results] == [
        ("test_resnet", "eager"),
        ("test_resnet", "onnxruntime"),
    ]
    assert report["settings"]["opset"] == 17 and "ONNX opset 17" in (tmp_path / "results.md").read_text()
    assert results[0]["macs"] == results[1]["macs"]
    assert all(r["throughput"]["median"] > 0 and 0 < r["latency_ms"] <= r["latency_p90_ms"] for r in results)


def test_table1_blocks_match_the_paper_macs():
    subjects = {subject.name.split()[0]: subject for subject in table1_subjects()}
    macs = {}
    for name, subject in subjects.items():
        block = subject.build().eval()
        x = torch.randn(2, *subject.sample_shape)
        with torch.no_grad():
            assert block(x).shape == x.shape
        macs[name] = count_macs(block, subject.sample_shape)
    # Paper, Table 1: 0.40 GMACs for one SepViT block, 0.77 / 0.78 for two Swin / Twins blocks.
    assert macs["sepvit_block"] / 1e9 == pytest.approx(0.40, abs=0.01)
    assert 0.45 < macs["sepvit_block"] / macs["swin_blocks"] < 0.6
    assert 0.45 < macs["sepvit_block"] / macs["twins_blocks"] < 0.6


def test_presets_expand_and_bad_names_list_close_matches():
    assert resolve_model_names(["table2", "sepvit_tiny", "resnet18"])[:2] == [
        "sepvit_tiny",
        PRESETS["table2"][1],
    ]
    assert resolve_model_names(["table2", "sepvit_tiny"]).count("sepvit_tiny") == 1
    with pytest.raises(UnknownModelError, match=r"close matches: .*swin_tiny_patch4_window7_224"):
        resolve_model_names(["swin_tiny_patch4_window7"])
    with pytest.raises(ConfigError, match=r"unknown model 'sepvit_tinny'; close matches: sepvit_tiny"):
        run_cli("bench", "sepvit_tinny")
    with pytest.raises(ConfigError, match="at least one model"):
        run_cli("bench")
    with pytest.raises(ConfigError, match="not bf16"):
        run_cli("bench", "resnet18", "--backend", "onnxruntime", "--dtype", "bf16")
    with pytest.raises(ConfigError, match="onnxruntime-int8 backend quantises an fp32 export"):
        run_cli("bench", "resnet18", "--backend", "onnxruntime-int8", "--dtype", "fp16")
    with pytest.raises(ConfigError, match="--training times PyTorch's backward"):
        run_cli("bench", "resnet18", "--backend", "eager", "onnxruntime", "--training")


def test_spread_and_pareto_front():
    spread = Spread.of([10.0, 12.0, 11.0, 30.0])
    assert (spread.median, spread.low, spread.high) == (11.5, 10.0, 30.0)
    assert spread.relative == pytest.approx(20 / 11.5)
    # (throughput, top-1): the third point is beaten by the first on both.
    points = [(100.0, 80.0), (50.0, 82.0), (90.0, 79.0), (200.0, 70.0)]
    assert pareto_front(points) == [1, 0, 3]
