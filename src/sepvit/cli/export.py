"""``sepvit export``: ONNX export, ``onnx.checker``, ONNX Runtime comparison, operator census, and
int8 quantisation behind an accuracy gate."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from sepvit.cli.options import (
    add_img_size,
    add_json,
    img_size,
    output_file,
    positive,
    positive_float,
    print_json,
)
from sepvit.engine.description import RunDescription

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model or checkpoint to ONNX (fp32, fp16 or int8), verified in ONNX Runtime",
        description="Export to ONNX (dynamic batch; dynamic height/width with --dynamic-size), check the "
        "graph with onnx.checker, compare ONNX Runtime with PyTorch (exit code 1 above the tolerance, "
        "2 when it cannot run an input; nothing is written then) and list the operators the graph uses. "
        "A checkpoint of `sepvit train` exports with its classes and preprocessing, for `sepvit eval` "
        "and `sepvit predict`; --int8 quantises it, refusing when top-1 drops more than --max-drop.",
    )
    parser.add_argument(
        "model", help="model name (ours or timm's), or a checkpoint of a classification, detection or "
        "segmentation run (a RetinaNet exports its per-anchor outputs, a segmenter its logits)",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", type=output_file,
        help="ONNX file (default: MODEL.onnx, or beside the checkpoint: NAME.onnx / NAME-int8.onnx)",
    )  # fmt: skip
    add_img_size(parser, "input size of a model by name (default: the model's)")
    parser.add_argument("--dynamic-size", action="store_true", help="dynamic height and width as well")
    parser.add_argument("--fp16", action="store_true", help="export in half precision")
    parser.add_argument("--deploy", action="store_true", help="fuse conv-BN and re-parameterised branches")
    parser.add_argument("--opset", type=positive, default=18, help="ONNX opset")
    parser.add_argument(
        "--tolerance", type=positive_float, help="max abs difference allowed, × max(1, max |output|) "
        "(default 1e-4, fp16 2e-2)"
    )  # fmt: skip
    parser.add_argument(
        "--check-batch-sizes", type=positive, nargs="+", default=[1, 3], metavar="B",
        help="batch sizes compared in ONNX Runtime (default: 1 3)",
    )  # fmt: skip
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    int8 = parser.add_argument_group("int8 (a checkpoint only)")
    int8.add_argument(
        "--int8", action="store_true",
        help="static int8 quantisation (ONNX Runtime QDQ, per-channel weights) behind an accuracy gate",
    )  # fmt: skip
    int8.add_argument(
        "--calibration", metavar="DATA",
        help="'digits' or a folder with train/ and val/: calibrate on train/ images, measure top-1 on val/ "
        "(default: the data the checkpoint was trained on)",
    )  # fmt: skip
    int8.add_argument(
        "--calibration-images", type=positive, default=256, metavar="N",
        help="training images to calibrate on",
    )  # fmt: skip
    int8.add_argument(
        "--max-drop", type=float, default=1.0, metavar="POINTS",
        help="top-1 points int8 may lose on the held-out images; above it the sensitive nodes stay in "
        "float, and if that still loses more, nothing is written (exit 2)",
    )  # fmt: skip
    add_json(parser, "the report (the progress goes to standard error)")
    parser.set_defaults(func=run_export)


def _is_checkpoint(name: str) -> bool:
    return Path(name).suffix.lower() in CHECKPOINT_SUFFIXES or Path(name).is_file()


def run_export(args: argparse.Namespace) -> int:
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        code, report = _export(args)
    if args.json:
        print_json(report)
    return code


def _export(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """Export as the options say; (exit code, report)."""
    import tempfile

    from sepvit.errors import ConfigError
    from sepvit.export import ExportMismatchError, export_onnx
    from sepvit.export.onnx_export import check_shapes_for, prepare_deploy
    from sepvit.utils import count_params

    if args.int8 and args.fp16:
        raise ConfigError("--int8 and --fp16 exclude each other")
    model, name, (channels, height, width), description = _model_to_export(args)
    if args.deploy:
        model = prepare_deploy(model)
    if args.output is not None:
        output = args.output
    elif description is not None:
        output = Path(args.model).with_name(Path(args.model).stem + ("-int8" if args.int8 else "") + ".onnx")
    else:
        output = Path(f"{name}.onnx")
    shapes = (
        []
        if args.no_check
        else check_shapes_for((channels, height, width), args.dynamic_size, args.check_batch_sizes)
    )
    report: dict[str, Any] = {
        "model": name, "path": str(output), "fp16": args.fp16, "int8": args.int8, "deploy": args.deploy,
        "opset": args.opset,
    }  # fmt: skip
    metadata = None if description is None else description.to_metadata()
    with tempfile.TemporaryDirectory(prefix="sepvit-export-") as folder:
        float_path = Path(folder) / "float.onnx" if args.int8 else output
        try:
            exported = export_onnx(
                model, float_path, (channels, height, width), dynamic_size=args.dynamic_size, fp16=args.fp16,
                opset=args.opset, name=name, check_shapes=shapes, tolerance=args.tolerance, metadata=metadata,
            )  # fmt: skip
        except ExportMismatchError as error:
            print(f"  FAILED: {error}")
            report["failure"] = str(error)
            return 1, report
        print(f"{name}: {count_params(model) / 1e6:.2f} M params, graph input {exported.input_name} "
              f"{list(exported.input_shape)}, opset {exported.opset}, {'fp16' if exported.fp16 else 'fp32'}, "
              f"traced at {list(exported.traced_size)}, onnx.checker passed")  # fmt: skip
        for result in exported.comparisons:
            print(f"  ONNX Runtime vs PyTorch {list(result.input_shape)}: max abs diff "
                  f"{result.max_abs_diff:.2e} (tolerance {result.tolerance:.1e}) ok")  # fmt: skip
        report["input_shape"] = list(exported.input_shape)
        report["comparisons"] = [
            {"input_shape": list(r.input_shape), "max_abs_diff": r.max_abs_diff, "tolerance": r.tolerance}
            for r in exported.comparisons
        ]
        if args.int8:
            report["int8"] = _quantize(args, exported.path, output, description)
    report.update(_report_operators(output))
    return 0, report


def _report_operators(output: Path) -> dict[str, Any]:
    """Print the file's size and the operators its graph uses; return the operators for the report."""
    from sepvit.export import operator_census

    print(f"  -> {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    census = operator_census(output)
    print("  operators: " + ", ".join(f"{op} {n}" for op, n in census.counts.most_common()))
    unexpected = census.unexpected
    print("  non-universal operators: " + (", ".join(f"{op} {n}" for op, n in unexpected.items()) or "none"))
    return {"operators": dict(census.counts.most_common()), "non_universal_operators": unexpected}


def _model_to_export(args: argparse.Namespace):
    """(model, name, (C, H, W), the run's description or None) for the command's model argument."""
    from sepvit.errors import ConfigError
    from sepvit.models import create_model, default_input_size

    if _is_checkpoint(args.model):
        if args.img_size is not None:
            raise ConfigError(
                "a checkpoint exports at the input size it was trained for; --dynamic-size serves others"
            )
        model, description = _run_to_export(args.model)
        if args.int8 and description.task != "classify":
            raise ConfigError("--int8 measures top-1: it quantises classification runs")
        return model, description.model, (3, *description.input_size), description.at()
    if args.int8:
        raise ConfigError("--int8 needs a trained checkpoint (its accuracy is what the gate measures)")
    size = img_size(args, [args.model])
    channels, height, width = default_input_size(args.model)
    if size:
        height, width = size
    model = create_model(args.model, **({"img_size": size} if size else {})).eval()
    return model, args.model, (channels, height, width), None


def _run_to_export(path: str):
    """A run's model in the form that exports, and its description."""
    from sepvit.runs import load_run

    model, description = load_run(path)
    if description.task == "detect":
        from sepvit.dense.detection import exportable

        model = exportable(model)
    return model, description


def _quantize(
    args: argparse.Namespace, float_path: Path, output: Path, description: RunDescription
) -> dict[str, Any]:
    """Quantise ``float_path`` to ``output`` behind the gate; print and return what was measured."""
    from sepvit.errors import ConfigError
    from sepvit.export.calibration import quantize_on_data

    data = args.calibration or description.data
    if not data:
        raise ConfigError("pass --calibration (digits or a folder): the checkpoint does not name its data")
    result, calibration_count, held_out_count = quantize_on_data(
        float_path,
        output,
        data,
        description.data_config,
        description.class_names,
        args.calibration_images,
        args.max_drop,
    )
    kept = f", {len(result.kept_in_float)} sensitive nodes kept in float" if result.kept_in_float else ""
    print(f"  int8: top-1 {result.float_top1:.2f}% fp32 -> {result.int8_top1:.2f}% int8 "
          f"(drop {result.drop:.2f}, max {args.max_drop:g}) on {held_out_count} held-out {data} "
          f"images, calibrated on {calibration_count}{kept}")  # fmt: skip
    int8 = ", ".join(f"{op} {n}" for op, n in result.int8_kernels.items()) or "none"
    products = ", ".join(f"{op} {n}" for op, n in result.float_products.items()) or "none"
    print(f"  int8 kernels (ONNX Runtime's optimised graph): {int8}; float products: {products}; "
          f"CPU VNNI: {'yes' if result.vnni else 'no'}")  # fmt: skip
    return {
        "data": data,
        "calibration_images": calibration_count,
        "held_out_images": held_out_count,
        "float_top1": result.float_top1,
        "int8_top1": result.int8_top1,
        "first_attempt_top1": result.first_attempt_top1,
        "max_drop": args.max_drop,
        "kept_in_float": list(result.kept_in_float),
        "int8_kernels": result.int8_kernels,
        "float_products": result.float_products,
        "vnni": result.vnni,
    }
