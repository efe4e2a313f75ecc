"""benchmarks/deploy_targets.py: its targets computed from runs, its options, one quick run of the
script on timm's test models, and the top-1 per precision it reads from a checkpoint.

No timing is asserted: the targets are checked by running the script on an idle machine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from sepvit.bench.accuracy import CastInputs, int8_top1, precision_top1
from sepvit.bench.measure import BenchResult, BenchRun, BenchSettings, Spread
from sepvit.classify.inference import run_eval
from sepvit.classify.models import build_classifier, data_config_for, describe_classifier
from sepvit.engine.checkpoint import weights_writer
from sepvit.errors import ConfigError
from sepvit.utils import freed_memory_kept

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "deploy_targets.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("deploy_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def fake(name: str, throughput: float, latency_ms: float | None = None, backend: str = "eager", share=0.5):
    return BenchResult(
        name, backend, (3, 8, 8), 10, 100, Spread(throughput, throughput, throughput), latency_ms, latency_ms,
        None, 1.0, share,
    )  # fmt: skip


def fake_run(*results: BenchResult, batch_size: int = 16) -> BenchRun:
    return BenchRun(BenchSettings(batch_size=batch_size), list(results), Spread(1e11, 1e11, 1e11))


def measured(targets) -> list[tuple[float, bool]]:
    return [(pytest.approx(t.measured), t.met) for t in targets]


def test_fp32_targets(script):
    inference = fake_run(fake(script.SEPVIT, 11.0, 80.0, share=0.96), fake(script.SWIN, 10.0, 88.0))
    training = fake_run(fake(script.SEPVIT, 3.0), fake(script.SWIN, 3.3))
    targets = script.fp32_targets(inference, training)
    assert measured(targets) == [(1.1, True), (1.1, True), (3.0 / 3.3, False), (0.96, True)]
    assert "batch 16" in targets[0].description and "training" in targets[2].description


def test_family_targets_compare_as_created_and_fused_pairs(script):
    run = fake_run(
        fake("sv_a", 12.0, 10.0),
        fake("a", 10.0, 10.0),
        fake("sv_a (fused)", 15.0, 8.0),
        fake("a (fused)", 10.0, 10.0),
    )
    targets = script.family_targets(run, [("sv_a", "a")])
    assert measured(targets) == [(1.2, True), (1.0, False), (1.5, True), (1.25, True)]
    assert [t.description.split(", ")[-1] for t in targets] == ["as created"] * 2 + ["fused"] * 2


def test_bf16_int8_and_compile_targets(script):
    sepvit, swin = script.SEPVIT, script.SWIN
    bf16 = fake_run(
        fake(f"{sepvit} (autocast)", 26.0, share=0.82), fake(f"{swin} (autocast)", 20.0),
        fake(f"{sepvit} (cast)", 27.0, share=0.62), fake(f"{swin} (cast)", 18.0),
    )  # fmt: skip
    assert measured(script.bf16_targets(bf16)) == [(1.3, True), (0.82, True), (1.5, True), (0.62, False)]
    top1 = {"fp32": 99.0, "bf16 autocast": 98.8, "bf16 cast": 98.6}
    assert measured(script.bf16_accuracy_targets(top1)) == [(0.2, True), (0.4, False)]

    int8 = fake_run(*(
        fake(name, throughput, latency, backend)
        for name in script.INT8_MODELS
        for backend, throughput, latency in (("onnxruntime", 10.0, 30.0), ("onnxruntime-int8", 16.0, 21.0))
    ))  # fmt: skip
    assert measured(script.int8_targets(int8)) == [(1.6, True), (30 / 21, False)] * len(script.INT8_MODELS)

    compiled = fake_run(
        fake(sepvit, 22.0, backend="compile"),
        fake(sepvit, 20.0),
        fake(swin, 19.0, backend="compile"),
        fake(swin, 15.0),
    )
    assert measured(script.compile_targets(compiled)) == [(22 / 19, True), (1.1, True)]


def test_family_names_and_options(script, tmp_path):
    import timm

    pairs = script.family_pairs(None)
    assert [ours for ours, _ in pairs] == timm.list_models(["sv_efficientvit_*", "sv_mobilevitv2_*"])
    assert len(pairs) == 13 and all(
        timm.is_model(theirs) and ours == "sv_" + theirs for ours, theirs in pairs
    )
    assert script.family_pairs(["efficientvit_m5", "sv_mobilevitv2_050"]) == [
        ("sv_efficientvit_m5", "efficientvit_m5"),
        ("sv_mobilevitv2_050", "mobilevitv2_050"),
    ]
    with pytest.raises(ConfigError, match="efficientvit_m9 not among ours"):
        script.family_pairs(["efficientvit_m9"])
    assert script.parse_args(["--skip-compile", "--sections", "compile", "fp32", "int8"]).sections == [
        "fp32",
        "int8",
    ]
    for argv in (["--checkpoint", str(tmp_path / "missing.safetensors")], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            script.parse_args(argv)
        assert exit_info.value.code == 2
    child = script.child_argv(script.parse_args(["--families", "efficientvit_m0"]), "kept", ["families"])
    assert child[:6] == [
        "--allocator",
        "kept",
        "--sections",
        "families",
        "--out-dir",
        "runs/deploy_targets/kept",
    ]
    assert child[-2:] == ["--families", "efficientvit_m0"]


def test_bad_input_is_a_one_line_error_before_anything_runs(script, tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not safetensors")
    for argv, message in (
        (["--families", "efficientvit_m9"], "error: --families: sv_efficientvit_m9 not among ours"),
        (["--checkpoint", str(foreign)], "foreign.safetensors is not a readable safetensors file"),
    ):
        assert script.main([*argv, "--out-dir", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert error.startswith("deploy_targets: error:") and message in error and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == [foreign]


@pytest.mark.slow
def test_script_runs_fp32_and_bf16_sections_on_test_models(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(script, "SEPVIT", "test_vit")
    monkeypatch.setattr(script, "SWIN", "test_convnext")
    status = script.main([
        "--allocator", "glibc", "--sections", "fp32", "bf16", "--batch-size", "2", "--rounds", "1",
        "--warmup", "1", "--min-round-seconds", "0.02", "--latency-iters", "1", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    assert status in (0, 1)
    screen = capsys.readouterr().out
    payload = json.loads((tmp_path / "targets.json").read_text())
    # A `sepvit` command run earlier in this process keeps freed memory; the run then says so.
    kept = " requested, but this process already keeps freed memory" if freed_memory_kept() else ""
    assert payload["allocator"] == "glibc defaults" + kept and "--sections fp32 bf16" in payload["command"]
    assert [row["section"] for row in payload["targets"]] == ["fp32"] * 4 + ["bf16"] * 4
    assert status == (0 if all(row["met"] for row in payload["targets"]) else 1)
    assert "accuracy skipped: pass --checkpoint" in payload["notes"]["bf16"][0]
    for row in payload["targets"]:
        assert f"{'PASS' if row['met'] else 'MISS'}  {row['description']}" in screen
    for section, run in (("fp32", "inference"), ("fp32", "training"), ("bf16", "inference")):
        results = json.loads((tmp_path / section / run / "results.json").read_text())
        assert results["settings"]["form"] == "as_created"
        assert results["settings"]["training"] == (run == "training")
    training = json.loads((tmp_path / "fp32" / "training" / "results.json").read_text())["results"]
    inference = json.loads((tmp_path / "fp32" / "inference" / "results.json").read_text())["results"]
    assert [r["form"] for r in inference] == ["as_created", "as_created", "cpu_inference"]
    assert training[0]["macs"] > 2 * inference[0]["macs"]  # forward and backward
    assert (
        "| fp32 | SepViT-T / Swin-T throughput, fp32 batch 2 | > 1 |" in (tmp_path / "targets.md").read_text()
    )


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> str:
    """An untrained tiny SepViT-Lite checkpoint for the digits data at 32 px."""
    torch.manual_seed(0)
    architecture = dict(
        window_size=4, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)
    )
    model, kwargs = build_classifier("sepvit_lite", 10, 32, architecture=architecture)
    info = describe_classifier(
        "sepvit_lite", kwargs, list("0123456789"), data_config_for(model, 32, 1.0), "digits"
    )
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    weights_writer(model.state_dict(), info)(str(path))
    return str(path)


def test_precision_top1_is_what_sepvit_eval_measures(digits_checkpoint):
    accuracy = precision_top1(digits_checkpoint)
    assert accuracy.data == "digits" and accuracy.images == 360
    for precision, amp in (("fp32", "none"), ("bf16 autocast", "bf16")):
        expected = run_eval(digits_checkpoint, None, 64, 0, "cpu", amp, None, True)["top1"]
        assert accuracy.top1[precision] == expected
    assert 0 <= accuracy.top1["bf16 cast"] <= 100


def test_cast_inputs_runs_a_bf16_copy():
    model = torch.nn.Linear(4, 2)
    cast = CastInputs(model, torch.bfloat16)
    assert cast(torch.ones(3, 4)).dtype == torch.bfloat16 and model.weight.dtype == torch.float32


@pytest.mark.slow
def test_int8_top1_runs_the_export_gate_and_leaves_nothing(digits_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    report, calibration, held_out, data = int8_top1(digits_checkpoint, 32)
    assert (calibration, held_out, data) == (32, 360, "digits")
    fp32 = run_eval(digits_checkpoint, None, 64, 0, "cpu", "none", None, True)["top1"]
    assert report.float_top1 == pytest.approx(fp32, abs=0.3)  # ONNX Runtime vs PyTorch: one image at most
    assert report.drop <= 1.0 and report.int8_kernels.get("QGemm", 0) > 0
    assert list(tmp_path.iterdir()) == []
