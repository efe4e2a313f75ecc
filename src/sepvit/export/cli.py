"""``sepvit export``: ONNX export, ``onnx.checker``, ONNX Runtime comparison and operator census."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX and verify it against PyTorch in ONNX Runtime",
        description="Export to ONNX (dynamic batch; dynamic height/width with --dynamic-size), check the "
        "graph with onnx.checker, compare ONNX Runtime with PyTorch (exit code 1 above the tolerance) "
        "and list the operators the graph uses.",
    )
    parser.add_argument("model", help="model name (ours or timm's)")
    parser.add_argument("-o", "--output", type=Path, help="ONNX file (default: MODEL.onnx)")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="N", help="H [W] (default: the model's)")
    parser.add_argument("--dynamic-size", action="store_true", help="dynamic height and width as well")
    parser.add_argument("--fp16", action="store_true", help="export in half precision")
    parser.add_argument("--deploy", action="store_true", help="fuse conv-BN and re-parameterised branches")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument(
        "--tolerance", type=float, help="max abs difference allowed, × max(1, max |output|) "
        "(default 1e-4, fp16 2e-2)"
    )  # fmt: skip
    parser.add_argument(
        "--check-batch-sizes", type=int, nargs="+", default=[1, 3], metavar="B",
        help="batch sizes compared in ONNX Runtime (default: 1 3)",
    )  # fmt: skip
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from sepvit.errors import ConfigError
    from sepvit.export import ExportMismatchError, compare_outputs, export_onnx, operator_census
    from sepvit.export.onnx_export import prepare_deploy
    from sepvit.models.names import create_model_at_size, default_input_size
    from sepvit.utils import count_params

    if args.img_size is not None and len(args.img_size) not in (1, 2):
        raise ConfigError("--img-size takes H or H W")
    img_size = None if args.img_size is None else (args.img_size[0], args.img_size[-1])
    model = create_model_at_size(args.model, img_size)
    channels, height, width = default_input_size(args.model)
    if img_size:
        height, width = img_size
    if args.deploy:
        model = prepare_deploy(model)
    output = args.output or Path(f"{args.model}.onnx")
    exported = export_onnx(
        model, output, (channels, height, width), dynamic_size=args.dynamic_size, fp16=args.fp16,
        opset=args.opset, name=args.model,
    )  # fmt: skip
    size_mb = exported.path.stat().st_size / 2**20
    print(f"{args.model}: {count_params(model) / 1e6:.2f} M params -> {exported.path} ({size_mb:.1f} MiB)")
    print(f"  graph input {exported.input_name} {list(exported.input_shape)}, opset {exported.opset}, "
          f"{'fp16' if exported.fp16 else 'fp32'}, onnx.checker passed")  # fmt: skip
    report = {
        "model": args.model,
        "path": str(exported.path),
        "input_shape": list(exported.input_shape),
        "fp16": exported.fp16,
        "deploy": args.deploy,
        "opset": exported.opset,
    }
    status = 0
    if not args.no_check:
        shapes = [(batch, channels, height, width) for batch in args.check_batch_sizes]
        if args.dynamic_size:
            shapes.append((args.check_batch_sizes[0], channels, height + 32, width + 32))
        try:
            comparisons = compare_outputs(model, exported, shapes, args.tolerance)
        except ExportMismatchError as error:
            print(f"  FAILED: {error}")
            comparisons, status = [], 1
            report["failure"] = str(error)
        for result in comparisons:
            print(f"  ONNX Runtime vs PyTorch {list(result.input_shape)}: max abs diff "
                  f"{result.max_abs_diff:.2e} (tolerance {result.tolerance:.1e}) ok")  # fmt: skip
        report["comparisons"] = [
            {"input_shape": list(r.input_shape), "max_abs_diff": r.max_abs_diff, "tolerance": r.tolerance}
            for r in comparisons
        ]
    census = operator_census(exported.path)
    print("  operators: " + ", ".join(f"{op} {n}" for op, n in census.counts.most_common()))
    unexpected = census.unexpected
    print("  non-universal operators: " + (", ".join(f"{op} {n}" for op, n in unexpected.items()) or "none"))
    report["operators"] = dict(census.counts.most_common())
    report["non_universal_operators"] = unexpected
    if args.json:
        from sepvit.engine.files import write_text

        write_text(args.json, json.dumps(report, indent=2) + "\n")
    return status
