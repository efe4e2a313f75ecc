"""Timing core: warm-ups, round-robin timed rounds, medians with spread, memory, matmul reference.

Every subject (a model or a block, on one backend) is built, warmed up, then timed in rounds; each
round visits every subject once, in an order rotated from round to round, together with a dense
matmul probe, so that load from other processes hits all of them alike. Reported figures are medians
over rounds with the min–max range; a spread wider than ``SPREAD_WARNING`` of the median is flagged.

Batch-1 latency is sampled call by call across the subjects (A, B, A, B, ...), so that the slow
spells of a shared machine, which last seconds, fall on every subject alike. Each timed call follows
an untimed call of the same subject: the previous subject's worker threads spin on for a moment
after it returns, and on a small machine they would otherwise slow the next call down (ONNX Runtime
sessions each own a thread pool, and two of them called in turn slow each other down).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sepvit.layers import prepare_for

BACKENDS = ("eager", "compile", "onnxruntime", "onnxruntime-int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# How eager CPU subjects run: as ``timm.create_model`` returns them, or with SepViT's layers in their
# oneDNN form (sepvit.layers.prepare_for), as ``sepvit bench`` runs them by default.
FORMS = ("as_created", "cpu_inference")
INT8_CALIBRATION_BATCHES = 4  # random batches of 8: the speed of a quantised graph ignores its ranges
SPREAD_WARNING = 0.15  # (max − min) / median of the rounds


@dataclass
class BenchSettings:
    """How to measure; the same for every subject of a run."""

    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    deploy: bool = False
    warmup: int = 2
    rounds: int = 5
    min_round_seconds: float = 0.5  # each subject runs whole batches for at least this long per round
    latency_iters: int = 5  # timed batch-1 calls per subject and round
    latency: bool = True
    memory: bool = True
    threads: int | None = None
    opset: int = 18  # of the onnxruntime backends' export
    form: str = "cpu_inference"  # one of FORMS, for eager CPU subjects that do not set their own
    training: bool = False  # time a training step (train mode, forward and backward, no optimiser)


@dataclass
class Subject:
    """One thing to time: a name, a factory for the module, its per-sample input shape and backend.

    ``form`` (one of FORMS) overrides the settings' form; with ``autocast`` the module keeps fp32
    weights and inputs and runs under ``torch.autocast`` to the settings' dtype instead of being cast.
    """

    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    backend: str = "eager"
    top1: float | None = None
    form: str | None = None
    autocast: bool = False


@dataclass
class Spread:
    """Median of the rounds with their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    @property
    def relative(self) -> float:
        return (self.high - self.low) / self.median if self.median else 0.0


@dataclass
class BenchResult:
    """One subject's measurements."""

    name: str
    backend: str
    input_shape: tuple[int, ...]
    params: int
    macs: int
    throughput: Spread  # images (samples) per second at the settings' batch size
    latency_ms: float | None  # batch 1, median over all calls
    latency_p90_ms: float | None
    peak_memory_mb: float | None  # at the settings' batch size; see measure_peak_memory
    achieved_gflops: float  # 2 × MACs × throughput
    matmul_fraction: float  # of the machine's dense matmul rate
    top1: float | None = None
    form: str = "as_created"  # of an eager CPU subject's layers; the other backends take models as created
    autocast: bool = False
    int8_kernels: dict[str, int] | None = None  # onnxruntime-int8: ONNX Runtime's int8 kernels
    float_products: dict[str, int] | None = None  # onnxruntime-int8: matrix products left in float


@dataclass
class BenchRun:
    """All subjects of one interleaved run, the machine's matmul rate (FLOP/s) and any warnings."""

    settings: BenchSettings
    results: list[BenchResult]
    matmul_flops: Spread
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- runners


class Runner:
    """Calls a prepared model on prepared inputs; ``__call__`` returns when the work is done.

    Inference runs under ``torch.inference_mode()``; with ``settings.training`` a call is one
    training step without the optimiser: gradients reset (to ``None``, as optimisers do), forward
    in train mode, backward of the mean output.
    """

    def __init__(self, subject: Subject, settings: BenchSettings, model: nn.Module) -> None:
        self.subject = subject
        self.settings = settings
        self.device = torch.device(settings.device)
        form = subject.form or settings.form
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, not {form!r}")
        # Forms are for eager CPU inference; compile and the exports take the model as created.
        self.form = form if subject.backend == "eager" and self.device.type == "cpu" else "as_created"
        self.int8_kernels: dict[str, int] | None = None
        self.float_products: dict[str, int] | None = None
        self._inputs: dict[int, Any] = {}
        self._keepalive: Any = None
        self.channels_last = settings.channels_last and len(subject.sample_shape) == 3
        if subject.backend.startswith("onnxruntime"):
            if settings.training or subject.autocast:
                raise ValueError("the onnxruntime backends run inference in the graph's own precision")
            self._call = self._onnxruntime(model)
        else:
            self._call = self._torch(model)

    def _torch(self, model: nn.Module) -> Callable[[Any], Any]:
        autocast_dtype = DTYPES[self.settings.dtype] if self.subject.autocast else None
        if autocast_dtype == torch.float32:
            raise ValueError("autocast needs a lower precision: dtype bf16 or fp16")
        dtype = torch.float32 if autocast_dtype else DTYPES[self.settings.dtype]
        model = model.to(self.device, dtype).train(self.settings.training)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.subject.backend == "compile":
            model = torch.compile(model)
        elif self.form == "cpu_inference":
            prepare_for(model, "cpu_inference")
        self._dtype = dtype
        device_type = self.device.type

        def precision() -> contextlib.AbstractContextManager:
            if autocast_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type, dtype=autocast_dtype)

        def infer(inputs):
            with torch.inference_mode(), precision():
                model(inputs)

        def train_step(inputs):
            model.zero_grad(set_to_none=True)
            with precision():
                output = model(inputs)
            output.float().mean().backward()

        step = train_step if self.settings.training else infer

        def call(inputs):
            step(inputs)
            if device_type == "cuda":
                torch.cuda.synchronize()

        return call

    def _onnxruntime(self, model: nn.Module) -> Callable[[Any], Any]:
        from sepvit.export import export_onnx, kernel_census, onnxruntime_session, quantize_qdq

        int8 = self.subject.backend == "onnxruntime-int8"
        if self.settings.dtype == "bf16" or (int8 and self.settings.dtype != "fp32"):
            raise ValueError("the onnxruntime backend runs fp32 or fp16, the onnxruntime-int8 backend fp32")
        fp16 = self.settings.dtype == "fp16"
        directory = tempfile.TemporaryDirectory(prefix="sepvit-bench-")
        path = Path(directory.name) / "model.onnx"
        exported = export_onnx(
            model,
            path,
            self.subject.sample_shape,
            fp16=fp16,
            opset=self.settings.opset,
            name=self.subject.name,
            check_shapes=(),  # timed, not verified: tests and `sepvit export` verify exports
        )
        if int8:
            generator = np.random.default_rng(0)
            calibration = [
                generator.standard_normal((8, *self.subject.sample_shape), dtype=np.float32)
                for _ in range(INT8_CALIBRATION_BATCHES)
            ]
            quantized = path.with_name("model-int8.onnx")
            quantize_qdq(path, quantized, calibration)
            self.int8_kernels, self.float_products = kernel_census(quantized)
            path = quantized
        session = onnxruntime_session(path, self.settings.device, torch.get_num_threads())
        self._keepalive = directory
        self._dtype = np.float16 if fp16 else np.float32
        input_name = exported.input_name
        return lambda inputs: session.run(None, {input_name: inputs})

    def inputs(self, batch: int) -> Any:
        if batch not in self._inputs:
            x = torch.randn(batch, *self.subject.sample_shape, generator=torch.Generator().manual_seed(0))
            if self.subject.backend.startswith("onnxruntime"):
                self._inputs[batch] = x.numpy().astype(self._dtype)
            else:
                x = x.to(self.device, self._dtype)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                self._inputs[batch] = x
        return self._inputs[batch]

    def __call__(self, batch: int) -> None:
        self._call(self.inputs(batch))

    def timed(self, batch: int, iters: int) -> float:
        """Seconds for ``iters`` calls at ``batch``."""
        inputs = self.inputs(batch)
        start = time.perf_counter()
        for _ in range(iters):
            self._call(inputs)
        return time.perf_counter() - start


# ------------------------------------------------------------------------------------- machine reference


class MatmulProbe:
    """The machine's dense matmul rate (FLOP/s) in the run's dtype, timed in the same rounds."""

    def __init__(self, settings: BenchSettings) -> None:
        self.device = torch.device(settings.device)
        self.size = 4096 if self.device.type == "cuda" else 2048
        dtype = DTYPES[settings.dtype]
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(self.size, self.size, generator=generator).to(self.device, dtype)
        self.b = torch.randn(self.size, self.size, generator=generator).to(self.device, dtype)
        self.calls = 1

    def rate(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(self.calls):
            torch.mm(self.a, self.b)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return 2 * self.size**3 * self.calls / (time.perf_counter() - start)

    def calibrate(self, seconds: float) -> None:
        self.rate()
        start = time.perf_counter()
        self.rate()
        self.calls = max(1, math.ceil(seconds / max(time.perf_counter() - start, 1e-6)))


# ------------------------------------------------------------------------------------------------ memory


def _release_free_heap() -> None:
    """Give glibc's cached free memory back to the system so the RSS baseline is honest."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak_memory(runner: Runner, batch: int) -> float | None:
    """MiB of memory one call at ``batch`` needs on top of what is held before it.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call. CPU: peak
    resident set size sampled every millisecond during the call, above the resident size before it
    (after returning glibc's free heap to the system); includes allocator and runtime workspace,
    excludes the weights, which are already resident. ``None`` where it cannot be measured this way:
    without /proc, and for ONNX Runtime, whose memory arena keeps what the warm-up allocated.
    """
    if runner.subject.backend.startswith("onnxruntime"):
        return None
    runner.inputs(batch)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner(batch)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return None
    _release_free_heap()
    baseline = _rss_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        runner(batch)
    finally:
        done.set()
        sampler.join()
    return (max(peak, _rss_bytes()) - baseline) / 2**20


# ------------------------------------------------------------------------------------------------ driver


def _log(message: str) -> None:
    print(message, flush=True)


def run_benchmark(
    subjects: list[Subject], settings: BenchSettings, log: Callable[[str], None] = _log
) -> BenchRun:
    """Measure every subject, interleaved with each other and with the matmul probe."""
    from sepvit.utils import count_macs, count_params, count_training_macs

    count = count_training_macs if settings.training else count_macs
    if settings.threads:
        torch.set_num_threads(settings.threads)
    runners: list[Runner] = []
    counts: list[tuple[int, int]] = []
    for subject in subjects:
        log(f"preparing {subject.name} [{subject.backend}]")
        module = subject.build().eval()
        if settings.deploy:
            from sepvit.export import prepare_deploy

            module = prepare_deploy(module)
        counts.append((count_params(module), count(module, input_size=subject.sample_shape)))
        runners.append(Runner(subject, settings, module))

    iters: list[int] = []
    memory: list[float | None] = []
    for runner in runners:
        for _ in range(settings.warmup):
            runner(settings.batch_size)
            if settings.latency:
                runner(1)
        seconds = runner.timed(settings.batch_size, 1)
        iters.append(max(1, math.ceil(settings.min_round_seconds / max(seconds, 1e-6))))
        memory.append(measure_peak_memory(runner, settings.batch_size) if settings.memory else None)

    probe = MatmulProbe(settings)
    probe.calibrate(settings.min_round_seconds / 2)
    throughputs: list[list[float]] = [[] for _ in runners]
    latencies: list[list[float]] = [[] for _ in runners]
    matmul_rates: list[float] = []
    for round_index in range(settings.rounds):
        log(f"round {round_index + 1}/{settings.rounds}")
        order = list(range(len(runners)))
        shift = round_index % max(len(order), 1)
        order = order[shift:] + order[:shift]
        for index in order:
            matmul_rates.append(probe.rate())  # next to every subject, to see the same load
            runner = runners[index]
            seconds = runner.timed(settings.batch_size, iters[index])
            throughputs[index].append(settings.batch_size * iters[index] / seconds)
        for _ in range(settings.latency_iters if settings.latency else 0):
            for index in order:
                runners[index](1)  # untimed: lets the previous subject's threads wind down
                latencies[index].append(runners[index].timed(1, 1) * 1e3)
    matmul = Spread.of(matmul_rates)

    run = BenchRun(settings, [], matmul)
    for subject, runner, (params, macs), runner_throughput, runner_latency, peak in zip(
        subjects, runners, counts, throughputs, latencies, memory
    ):
        throughput = Spread.of(runner_throughput)
        achieved = 2 * macs * throughput.median
        result = BenchResult(
            name=subject.name,
            backend=subject.backend,
            input_shape=subject.sample_shape,
            params=params,
            macs=macs,
            throughput=throughput,
            latency_ms=statistics.median(runner_latency) if runner_latency else None,
            latency_p90_ms=float(np.percentile(runner_latency, 90)) if runner_latency else None,
            peak_memory_mb=peak,
            achieved_gflops=achieved / 1e9,
            matmul_fraction=achieved / matmul.median,
            top1=subject.top1,
            form=runner.form,
            autocast=subject.autocast,
            int8_kernels=runner.int8_kernels,
            float_products=runner.float_products,
        )
        if throughput.relative > SPREAD_WARNING:
            run.warnings.append(
                f"{subject.name} [{subject.backend}]: throughput spread {throughput.relative:.0%} of the "
                "median across rounds (machine busy?); prefer ratios from this interleaved run"
            )
        run.results.append(result)
    if matmul.relative > SPREAD_WARNING:
        run.warnings.append(f"matmul rate spread {matmul.relative:.0%} of the median across rounds")
    return run
