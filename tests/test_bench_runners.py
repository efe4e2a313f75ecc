"""sepvit.bench's ways of running a subject: forms, training steps, autocast, int8 ONNX Runtime; the
training MAC count; targets and speed-ups read from a run; top-1 per precision of a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sepvit.bench.measure import BenchResult, BenchRun, BenchSettings, Runner, Spread, Subject, run_benchmark
from sepvit.bench.targets import Target, result, speedup, targets_table
from sepvit.layers.fused_linear import Linear, OneDnnLinear, onednn_linear_dtypes
from sepvit.utils import count_macs, count_training_macs

TINY_SEPVIT = dict(
    img_size=16,
    window_size=2,
    embed_dims=(16, 32, 48),
    depths=(1, 1, 1),
    num_heads=(1, 2, 2),
    block_plan="D,D,D",
)


def tiny_sepvit() -> nn.Module:
    import timm

    import sepvit  # noqa: F401

    torch.manual_seed(0)
    return timm.create_model("sepvit_lite", num_classes=5, **TINY_SEPVIT).eval()


def linear_classes(model: nn.Module) -> set[type]:
    return {type(module) for module in model.modules() if isinstance(module, Linear)}


def test_as_created_form_leaves_the_layers_plain_and_cpu_inference_swaps_them():
    shape = (3, 16, 16)
    model = tiny_sepvit()
    Runner(Subject("plain", tiny_sepvit, shape), BenchSettings(form="as_created"), model)(2)
    assert linear_classes(model) == {Linear}
    # A subject's own form wins over the run's.
    model = tiny_sepvit()
    Runner(
        Subject("plain", tiny_sepvit, shape, form="as_created"), BenchSettings(form="cpu_inference"), model
    )
    assert linear_classes(model) == {Linear}
    if not onednn_linear_dtypes():
        pytest.skip("this PyTorch build has no working oneDNN linear: cpu_inference keeps the plain layers")
    model = tiny_sepvit()
    runner = Runner(Subject("fused", tiny_sepvit, shape), BenchSettings(form="cpu_inference"), model)
    runner(2)
    assert linear_classes(model) == {OneDnnLinear} and runner.form == "cpu_inference"
    with pytest.raises(ValueError, match="form must be one of"):
        Runner(Subject("x", tiny_sepvit, shape, form="fast"), BenchSettings(), tiny_sepvit())


def test_training_runner_runs_a_backward_step_in_train_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    runner = Runner(Subject("net", lambda: model, (3, 6, 6)), BenchSettings(training=True), model)
    runner(4)
    assert model.training
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model[1].num_batches_tracked.item() == 1  # batch norm in train mode saw the batch
    first = [p.grad.clone() for p in model.parameters()]
    runner(4)  # gradients start from None each step: the same batch gives the same gradients
    assert all(torch.allclose(a, p.grad) for a, p in zip(first, model.parameters()))


def test_training_macs_count_the_backward_products_autograd_computes():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert count_macs(model, (8,)) == 8 * 16 + 16 * 4
    # Forward both; backward: the weight gradient of each, the input gradient of the second only.
    assert count_training_macs(model, (8,)) == 2 * (8 * 16) + 3 * (16 * 4)
    assert all(p.grad is None for p in model.parameters())
    norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    before = {name: buffer.clone() for name, buffer in norm.named_buffers()}
    count_training_macs(norm, (3, 8, 8))
    assert not norm.training
    assert all(torch.equal(before[name], buffer) for name, buffer in norm.named_buffers())


class Recorder(nn.Module):
    """A linear layer that records the dtype of its weight and output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.seen.append((self.linear.weight.dtype, y.dtype))
        return y


@pytest.mark.parametrize("autocast, weight", [(True, torch.float32), (False, torch.bfloat16)])
def test_bf16_by_autocast_keeps_fp32_weights_and_by_cast_casts_them(autocast, weight):
    model = Recorder()
    runner = Runner(Subject("r", lambda: model, (8,), autocast=autocast), BenchSettings(dtype="bf16"), model)
    runner(2)
    assert model.seen == [(weight, torch.bfloat16)]
    with pytest.raises(ValueError, match="autocast needs a lower precision"):
        Runner(Subject("r", Recorder, (8,), autocast=True), BenchSettings(dtype="fp32"), Recorder())


def test_int8_onnxruntime_backend_runs_int8_kernels_interleaved_with_fp32():
    pytest.importorskip("onnxruntime")

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 12 * 12, 4)
        )

    subjects = [
        Subject("net", build, (3, 16, 16), backend) for backend in ("onnxruntime", "onnxruntime-int8")
    ]
    settings = BenchSettings(
        batch_size=2,
        warmup=1,
        rounds=1,
        min_round_seconds=0.01,
        latency_iters=1,
        memory=False,
        form="as_created",
    )
    run = run_benchmark(subjects, settings, log=lambda _: None)
    fp32, int8 = result(run, "net", "onnxruntime"), result(run, "net", "onnxruntime-int8")
    assert fp32.int8_kernels is None and int8.int8_kernels["QLinearConv"] == 2
    assert int8.float_products == {} and fp32.macs == int8.macs > 0
    assert int8.throughput.median > 0 and int8.latency_ms > 0
    with pytest.raises(ValueError, match="inference"):
        Runner(subjects[1], BenchSettings(training=True), build())


def fake_result(
    name: str, throughput: float, latency_ms: float | None, backend: str = "eager"
) -> BenchResult:
    return BenchResult(
        name, backend, (3, 8, 8), 10, 100, Spread(throughput, throughput, throughput), latency_ms, latency_ms,
        None, 2 * 100 * throughput / 1e9, throughput / 1000,
    )  # fmt: skip


def test_speedups_and_targets_read_from_a_run():
    run = BenchRun(
        BenchSettings(),
        [fake_result("a", 30.0, 10.0), fake_result("b", 20.0, 15.0), fake_result("a", 60.0, 4.0, "compile")],
        Spread(1e11, 1e11, 1e11),
    )
    assert speedup(run, "a", "b", "throughput") == pytest.approx(1.5)
    assert speedup(run, "a", "b", "latency") == pytest.approx(1.5)  # b's ms over a's
    assert speedup(run, "a", "a", "latency", ("compile", "eager")) == pytest.approx(2.5)
    with pytest.raises(KeyError, match="0 results for c"):
        result(run, "c")
    with pytest.raises(ValueError, match="metric"):
        speedup(run, "a", "b", "memory")
    assert Target("x", 1.0, 1.0, "≥").met and not Target("x", 1.0, 1.0, ">").met
    assert Target("x", 0.2, 0.3, "≤").met and not Target("x", math.nan, 0.3, "≤").met
    assert Target("y", 0.9, 1.2).line() == "MISS  y: 0.900 (target ≥ 1.2)"
    with pytest.raises(ValueError, match="relation"):
        Target("x", 1.0, 1.0, "=")
    rows = [
        {"section": "s", "description": "d", "measured": 1.25, "relation": "≥", "threshold": 1.2, "met": True}
    ]
    table = targets_table({"A": rows, "B": [{**rows[0], "measured": 1.1, "met": False}]}, "cmd", {"cpu": "X"})
    assert "| s | d | ≥ 1.2 | PASS 1.250 | MISS 1.100 |" in table
    assert table.startswith("Command: `cmd`") and "Machine: cpu X" in table
