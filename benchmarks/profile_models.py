"""Where the time goes: torch.profiler over a few forward passes, by operator and by kind of work.

    .venv/bin/python benchmarks/profile_models.py sepvit_tiny swin_tiny_patch4_window7_224 [--batch-size 16]

For each model prints the top operators by self CPU time and a breakdown into kinds of work
(dense matmul, attention kernels, normalisation, activations, data movement, convolutions, ...),
the share of the forward time each takes, and the achieved GFLOP/s of the matmul-type operators.
The models are profiled alternately, ``--rounds`` times each, so machine load hits them alike.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sepvit.bench.models import bench_model
from sepvit.models import default_input_size
from sepvit.utils import keep_freed_memory

PROFILE_ITERS = 2  # forwards per profiling session

# Operator name fragments -> kind of work (first match wins).
KINDS = (
    ("attention kernel", ("scaled_dot_product", "flash_attention", "_softmax", "softmax")),
    ("dense matmul", ("addmm", "aten::mm", "bmm", "matmul", "linear", "baddbmm")),
    ("convolution", ("conv", "mkldnn_convolution")),
    ("normalisation", ("layer_norm", "batch_norm", "group_norm")),
    ("activation", ("gelu", "relu", "silu", "sigmoid", "tanh", "hardswish")),
    ("data movement", ("copy_", "clone", "contiguous", "cat", "pad", "roll", "index", "gather", "unfold",
                       "constant_pad", "expand", "repeat", "empty", "zeros", "fill_", "where", "masked")),
    ("elementwise", ("add", "mul", "div", "sub", "mean", "sum", "rsqrt", "pow")),
)  # fmt: skip


def kind_of(name: str) -> str:
    for kind, fragments in KINDS:
        if any(fragment in name for fragment in fragments):
            return kind
    return "other"


def label_modules(model: torch.nn.Module) -> None:
    """Wrap every sub-module's forward in a profiler range named after its class, so that each
    operator can be charged to the innermost module that ran it."""

    def enter(module, _inputs):
        module._profile_range = torch.profiler.record_function(f"module::{type(module).__name__}")
        module._profile_range.__enter__()

    def leave(module, _inputs, _output):
        module._profile_range.__exit__(None, None, None)

    for module in model.modules():
        if module is not model:
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)


def owner(event) -> str:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("module::"):
        parent = parent.cpu_parent
    return parent.name.removeprefix("module::") if parent is not None else type(None).__name__


@torch.inference_mode()
def profile_model(model: torch.nn.Module, inputs: torch.Tensor) -> torch.profiler.profile:
    model(inputs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILE_ITERS):
            model(inputs)
    return prof


def report(name: str, profiles: list, batch_size: int, top: int) -> None:
    self_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for prof in profiles:
        for event in prof.key_averages():
            if event.key.startswith("module::"):  # the ranges' own time is Python between operators
                continue
            self_us[event.key] += event.self_cpu_time_total
            calls[event.key] += event.count
    total = sum(self_us.values())
    forwards = len(profiles) * PROFILE_ITERS
    print(f"\n== {name}: batch {batch_size}, {total / forwards / 1e3:.0f} ms self CPU time per forward "
          f"(sum over threads' ops; profiled {forwards} forwards)")  # fmt: skip
    print(f"{'operator':48s} {'share':>6s} {'ms/forward':>11s} {'calls/forward':>14s}")
    for key, value in sorted(self_us.items(), key=lambda item: -item[1])[:top]:
        per_forward_ms, per_forward_calls = value / forwards / 1e3, calls[key] / forwards
        print(f"{key[:48]:48s} {value / total:6.1%} {per_forward_ms:11.1f} {per_forward_calls:14.0f}")
    by_kind: dict[str, float] = defaultdict(float)
    for key, value in self_us.items():
        by_kind[kind_of(key)] += value
    print("by kind: " + ", ".join(f"{kind} {value / total:.0%}" for kind, value in
                                  sorted(by_kind.items(), key=lambda item: -item[1])))  # fmt: skip
    by_owner: dict[tuple[str, str], float] = defaultdict(float)
    for prof in profiles:
        for event in prof.events():
            if not event.name.startswith("module::"):
                by_owner[(owner(event), kind_of(event.name))] += event.self_cpu_time_total
    print("by module and kind (top): " + ", ".join(
        f"{module}/{kind} {value / total:.1%}"
        for (module, kind), value in sorted(by_owner.items(), key=lambda item: -item[1])[:top]
    ))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the sepvit command does (SEPVIT_KEEP_FREED_MEMORY=0 turns it off)
    models = {name: bench_model(name) for name in args.models}
    for model in models.values():
        label_modules(model)
    inputs = {name: torch.randn(args.batch_size, *default_input_size(name)) for name in args.models}
    profiles: dict[str, list] = {name: [] for name in args.models}
    for _ in range(args.rounds):
        for name in args.models:
            profiles[name].append(profile_model(models[name], inputs[name]))
    for name in args.models:
        report(name, profiles[name], args.batch_size, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
