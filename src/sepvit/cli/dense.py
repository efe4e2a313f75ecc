"""``sepvit detect train|eval|predict`` and ``sepvit segment train|eval|predict`` (wiring only).

Training runs on the shared engine (:mod:`sepvit.engine`): the same run folder, options, resume
and exit codes as ``sepvit train``. Without ``--data`` the commands use the embedded shapes
dataset with the ``synthetic`` preset; with ``--data`` the paper's recipe applies.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sepvit.cli.options import (
    add_command_options,
    add_inference_options,
    add_options,
    config_from_args,
    non_negative,
    output_folder,
    positive,
    positive_float,
    print_json,
)
from sepvit.cli.training import train
from sepvit.dense.config import DETECT_PRESETS, SEGMENT_PRESETS, DetectConfig, SegmentConfig
from sepvit.engine.config import read_config_file
from sepvit.errors import ConfigError


def _train_parser(commands, name: str, help_text: str, config_type, presets: dict) -> None:
    listed = "; ".join(f"{key}: {', '.join(f'{k}={v}' for k, v in values.items()) or 'the defaults'}"
                       for key, values in presets.items())  # fmt: skip
    parser = commands.add_parser(
        "train",
        help=help_text,
        description=f"{help_text}. Without --data the embedded shapes dataset and the 'synthetic' "
        "preset; with --data the paper's recipe. Options resolve as for `sepvit train`.",
        epilog=f"presets: {listed}",
    )
    add_command_options(parser, presets)
    add_options(parser, config_type)
    parser.set_defaults(func=_train, config_type=config_type, presets=presets, task_name=name)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a best/last.safetensors written by train")
    parser.add_argument("--data", type=Path, help="dataset root (default: the embedded shapes dataset)")
    parser.add_argument(
        "--split", default=None, help="split to evaluate (default: the run's validation split)"
    )
    parser.add_argument("--workers", type=non_negative, default=0, help="data-loading processes")
    add_inference_options(parser)


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a best/last.safetensors written by train")
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    parser.add_argument(
        "--output", type=output_folder, required=True, help="folder for the PNGs (one per image)"
    )
    add_inference_options(parser)


def _scale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scales", type=positive_float, nargs="+", default=[1.0], help="test scales (image resize factors)"
    )
    parser.add_argument(
        "--ms", action="store_true", help="multi-scale test: scales 0.5-1.75 in steps of 0.25, with flip"
    )
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")


def register(subparsers) -> None:
    detect = subparsers.add_parser(
        "detect", help="object detection / instance segmentation (RetinaNet, Mask R-CNN)"
    )
    detect_commands = detect.add_subparsers(dest="action", metavar="ACTION", required=True)
    _train_parser(
        detect_commands, "detect", "train a detector on a COCO-format dataset", DetectConfig, DETECT_PRESETS
    )
    evaluate = detect_commands.add_parser("eval", help="COCO box (and mask) AP of a trained detector")
    _eval_arguments(evaluate)
    evaluate.add_argument("--batch-size", type=positive, default=2, help="images per batch")
    evaluate.set_defaults(func=_detect_eval)
    predict = detect_commands.add_parser("predict", help="draw boxes (and masks) over images, as PNG")
    _predict_arguments(predict)
    predict.add_argument("--score-threshold", type=float, default=0.3, help="lowest score drawn")
    predict.set_defaults(func=_detect_predict)

    segment = subparsers.add_parser("segment", help="semantic segmentation (Semantic FPN, UperNet)")
    segment_commands = segment.add_subparsers(dest="action", metavar="ACTION", required=True)
    _train_parser(
        segment_commands,
        "segment",
        "train a segmenter on an ADE20K-format dataset",
        SegmentConfig,
        SEGMENT_PRESETS,
    )
    evaluate = segment_commands.add_parser("eval", help="mIoU of a trained segmenter, single- or multi-scale")
    _eval_arguments(evaluate)
    _scale_arguments(evaluate)
    evaluate.set_defaults(func=_segment_eval)
    predict = segment_commands.add_parser(
        "predict", help="draw the colour-coded class map over images, as PNG"
    )
    _predict_arguments(predict)
    _scale_arguments(predict)
    predict.set_defaults(func=_segment_predict)


def _default_preset(args: argparse.Namespace) -> str:
    """``synthetic`` without data, else the paper's recipe (for segmentation, of the chosen head)."""
    values = read_config_file(args.config, args.config_type) if args.config else {}
    values.update({key: value for key, value in vars(args).items() if key in ("data", "head")})
    if values.get("data") is None:
        return "synthetic"
    return "paper" if args.task_name == "detect" else f"paper-{values.get('head', 'fpn')}"


def _train(args: argparse.Namespace) -> int:
    from sepvit.dense.tasks import DetectionTask, SegmentationTask

    task_type = DetectionTask if args.task_name == "detect" else SegmentationTask
    backbone = getattr(args, "pretrained_backbone", None)
    if backbone and not hasattr(args, "model"):  # the backbone the classification run trained
        from sepvit.engine.checkpoint import read_weights

        description = read_weights(backbone)[1]
        if description is not None:
            args.model = description.model
    config, resume_dir = config_from_args(
        args.config_type,
        args,
        args.presets,
        task_type.kind.run_defining,
        default_preset=_default_preset(args),
    )
    code, result = train(task_type(config), resume_dir, args.json)
    if result is not None and result.history and not result.interrupted_by and not args.json:
        last = result.history[-1]
        shown = ", ".join(
            f"{k[4:]} {v:.4f}" for k, v in last.items() if k.startswith("val_") and v is not None
        )
        print(f"final: {shown}", flush=True)
    return code


def _load(path: Path, task: str, device: str):
    from sepvit.engine.distributed import single_process
    from sepvit.runs import load_run

    model, description = load_run(path, task)
    context = single_process(device)
    return model.to(context.device), description, context.device


def _root(args: argparse.Namespace, kind: str) -> Path:
    from sepvit.dense.tasks import dataset_root

    return dataset_root(None if args.data is None else str(args.data), kind)


def _report(metrics: dict, args: argparse.Namespace, prefix: str = "") -> None:
    if args.json:
        print_json({"checkpoint": str(args.checkpoint), **metrics})
    else:
        print(prefix + ", ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items()))


def _image_paths(inputs: list[Path]) -> list[Path]:
    from sepvit.data_io import is_image_file

    paths = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if is_image_file(p))
        elif item.is_file():
            paths.append(item)
        else:
            raise ConfigError(f"{item} is neither an image file nor a folder")
    if not paths:
        raise ConfigError("no images to predict on")
    return paths


def _predictions(args: argparse.Namespace):
    """(image path, output PNG path, image tensor in [0, 1]) for each input; output names never collide."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    from sepvit.data_io import open_image
    from sepvit.engine.data import output_names
    from sepvit.utils.files import make_folder

    paths = _image_paths(args.images)
    make_folder(args.output)
    for path, name in zip(paths, output_names(paths, ".png")):
        yield path, args.output / name, pil_to_tensor(open_image(path)).float() / 255


def _save_png(canvas, path: Path) -> None:
    from PIL import Image

    from sepvit.utils.files import write_atomically

    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    write_atomically({path: lambda name: picture.save(name, format="PNG")})


def _detect_eval(args: argparse.Namespace) -> int:
    from sepvit.dense.data import CocoDetection
    from sepvit.dense.detection import evaluate_detection

    model, description, device = _load(args.checkpoint, "detect", args.device)
    split = args.split or ("val" if args.data is None else "val2017")
    dataset = CocoDetection(_root(args, "coco"), split)
    if dataset.class_names != description.class_names:
        raise ConfigError(
            f"the dataset's categories {dataset.class_names} differ from the model's "
            f"{description.class_names}"
        )
    _report(evaluate_detection(model, dataset, device, args.batch_size, args.workers), args)
    return 0


def _predict_all(args: argparse.Namespace, task: str, draw) -> int:
    """Run ``draw(model, description, device, image) -> (canvas, found, summary)`` on every input image; write
    the canvases as PNGs and print one line per image (or JSON)."""
    model, description, device = _load(args.checkpoint, task, args.device)
    results = []
    for path, output, image in _predictions(args):
        canvas, found, summary = draw(model, description, device, image)
        _save_png(canvas, output)
        results.append({"image": str(path), "output": str(output), **found})
        if not args.json:
            print(f"{path} -> {output}: {summary}")
    if args.json:
        print_json(results)
    return 0


def _detect_predict(args: argparse.Namespace) -> int:
    import torch

    from sepvit.dense.visualize import draw_detections

    def draw(model, description, device, image):
        with torch.no_grad():
            prediction = model([image.to(device)])[0]
        found = int((prediction["scores"] >= args.score_threshold).sum())
        canvas = draw_detections(image, prediction, description.class_names, args.score_threshold)
        return canvas, {"objects": found}, f"{found} objects"

    return _predict_all(args, "detect", draw)


def _test_scales(args: argparse.Namespace) -> tuple[tuple[float, ...], bool]:
    if args.ms:
        return (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True
    return tuple(args.scales), args.flip


def _segment_eval(args: argparse.Namespace) -> int:
    from sepvit.dense.data import ADE20KSegmentation, SegmentationEvalDataset
    from sepvit.dense.segmentation import evaluate_segmentation

    model, description, device = _load(args.checkpoint, "segment", args.device)
    dataset = ADE20KSegmentation(
        _root(args, "ade20k"), args.split or "validation", None, description.extras["num_classes"]
    )
    scales, flip = _test_scales(args)
    metrics = evaluate_segmentation(
        model,
        SegmentationEvalDataset(dataset, description.extras["crop_size"]),
        device,
        scales,
        flip,
        args.workers,
    )
    _report(metrics, args, f"scales {', '.join(map(str, scales))}{' + flip' if flip else ''}: ")
    return 0


def _segment_predict(args: argparse.Namespace) -> int:
    from torchvision.transforms import v2

    from sepvit.dense.segmentation import predict_probabilities
    from sepvit.dense.visualize import draw_class_map

    scales, flip = _test_scales(args)

    def draw(model, description, device, image):
        resized = v2.functional.resize(image, description.extras["crop_size"], antialias=True)
        probabilities = predict_probabilities(
            model, resized.to(device), tuple(image.shape[-2:]), scales, flip
        )
        class_map = probabilities.argmax(0).cpu()
        present = [description.class_names[int(c)] for c in class_map.unique()]
        canvas = draw_class_map(image, class_map, description.extras["num_classes"])
        return canvas, {"classes": present}, ", ".join(present)

    return _predict_all(args, "segment", draw)
