"""``sepvit classify train|eval|predict`` (also as ``sepvit train|eval|predict``), ``sepvit demo`` and
``sepvit data pack``: classification commands (wiring only).

Exit codes: 0 success; 1 the run could not go on (loss or weights became NaN, a checkpoint could not
be written); 2 bad input (missing path, unreadable data, a checkpoint that does not fit, bad option);
130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (128 + the signal number).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from sepvit.classify.config import PRESETS, RUN_DEFINING, ClassifyConfig
from sepvit.cli.options import (
    add_command_options,
    add_inference_options,
    add_options,
    config_from_args,
    formatter,
    non_negative,
    output_file,
    positive,
    print_json,
)
from sepvit.cli.training import run_summary, train

DEMO_PRESET = "digits-demo"

TRAIN_EPILOG = """\
options are resolved in layers: defaults < --preset < the resumed run's config.yaml < --config < flags.
Many processes: torchrun --nproc_per_node=N -m sepvit train ... (gloo on CPU, NCCL on GPU); many nodes:
torchrun --nnodes=N --nproc_per_node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m sepvit train ...
exit codes: 0 done, 1 NaN loss or checkpoint not written, 2 bad input, 130/143 stopped by SIGINT/SIGTERM
(a checkpoint was saved; continue with --resume RUN)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    classify = subparsers.add_parser(
        "classify", help="image classification: train, evaluate, predict (also as sepvit train|eval|predict)"
    )
    _add_task_commands(classify.add_subparsers(dest="action", metavar="ACTION", required=True))
    _add_task_commands(subparsers)  # the short forms the README and the demo use
    _add_demo(subparsers)
    _add_data(subparsers)


def _add_task_commands(commands: argparse._SubParsersAction) -> None:
    _add_train(commands)
    _add_eval(commands)
    _add_predict(commands)


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train or fine-tune a model on digits or an image folder",
        formatter_class=formatter,
        description="Train any of our models (or any timm model) with the papers' recipe built from timm "
        "parts; writes checkpoints, metrics (CSV, TensorBoard) and plots to a run folder.",
        epilog=TRAIN_EPILOG,
    )
    add_command_options(parser, PRESETS)
    add_options(parser, ClassifyConfig)
    parser.set_defaults(func=train_command)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="train SepViT-Lite on the bundled digits, evaluate it, show where results are",
        formatter_class=formatter,
        description=f"`sepvit train --preset {DEMO_PRESET}` followed by `sepvit eval` of the final "
        f"weights (EMA's when EMA is on) on the digits test split. Preset: {PRESETS[DEMO_PRESET]}. "
        "Every train option can override it.",
        epilog=TRAIN_EPILOG,
    )
    add_command_options(demo, PRESETS)
    add_options(demo, ClassifyConfig)
    demo.set_defaults(func=demo_command, preset=DEMO_PRESET)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="top-1/top-5 and loss of a checkpoint (or its ONNX export) on digits or a folder's val/ images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate a checkpoint written by `sepvit train` (or a plain state dict with --model), "
        "or an ONNX file `sepvit export` wrote from one (fp32, fp16 or int8; ONNX Runtime on the CPU).",
    )
    evaluate.add_argument(
        "checkpoint", help="best.safetensors or last.safetensors of a run, or an .onnx file exported from one"
    )
    evaluate.add_argument(
        "--data",
        default=None,
        help="'digits' or a folder with val/<class>/*; default: the data the checkpoint was trained on",
    )
    evaluate.add_argument("--batch-size", type=positive, default=256, help="images per batch")
    evaluate.add_argument("--workers", type=non_negative, default=0, help="data-loading processes")
    evaluate.add_argument(
        "--confusion-matrix",
        metavar="PNG",
        type=output_file,
        default=None,
        help="also write the confusion matrix to this PNG file",
    )
    _add_plain_state_dict_options(evaluate)
    evaluate.add_argument(
        "--amp",
        choices=("auto", "none", "bf16", "fp16"),
        default="none",
        help="mixed precision for evaluation",
    )
    evaluate.set_defaults(func=eval_command)


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict",
        help="top-k classes with probabilities for image files",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Classify image files with a checkpoint; prints one line per image (or JSON).",
    )
    predict.add_argument(
        "checkpoint", help="best.safetensors or last.safetensors of a run, or an .onnx file exported from one"
    )
    predict.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    predict.add_argument("--top-k", type=positive, default=5, help="classes to show per image")
    _add_plain_state_dict_options(predict)
    predict.set_defaults(func=predict_command)


def _add_data(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare datasets: pack an image folder into tar shards")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    pack = actions.add_parser(
        "pack",
        help="write an image folder's train/ and val/ images as WebDataset tar shards",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Pack FOLDER/train/<class>/* and FOLDER/val/<class>/* into OUT/train-NNNNNN.tar and "
        "OUT/val-NNNNNN.tar (each image's bytes unchanged, its label as .cls) with an _info.json of "
        "classes and sample counts; train with --data OUT. Unreadable images are skipped and listed.",
    )
    pack.add_argument("folder", help="image folder with train/ and val/")
    pack.add_argument("out", help="new folder for the shards")
    pack.add_argument("--shard-size", type=positive, default=1000, help="images per shard")
    pack.set_defaults(func=pack_command)


def _add_plain_state_dict_options(parser: argparse.ArgumentParser) -> None:
    add_inference_options(parser)
    parser.add_argument(
        "--model",
        default=None,
        help="model name, to load a checkpoint that has no sepvit metadata (a plain state dict)",
    )
    parser.add_argument(
        "--num-classes", type=positive, default=None, help="classes of such a plain state dict"
    )
    parser.add_argument(
        "--img-size",
        type=positive,
        default=None,
        help="input size for such a plain state dict (default: the model's)",
    )


def train_command(args: argparse.Namespace) -> int:
    from sepvit.classify.task import ClassificationTask

    config, resume_dir = config_from_args(ClassifyConfig, args, PRESETS, RUN_DEFINING)
    return train(ClassificationTask(config), resume_dir, args.json)[0]


def demo_command(args: argparse.Namespace) -> int:
    from sepvit.classify.data import DIGITS_VAL
    from sepvit.classify.inference import run_eval
    from sepvit.classify.task import ClassificationTask
    from sepvit.engine.checkpoint import LAST, LAST_EMA, weights_path

    start = time.perf_counter()
    config, resume_dir = config_from_args(ClassifyConfig, args, PRESETS, RUN_DEFINING)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        code, result = train(ClassificationTask(config), resume_dir, as_json=False)
        if code != 0 or result is None:
            return code
        # The final weights (EMA's when EMA is on), not the best epoch: digits has no validation split
        # apart from the test split, so picking the best epoch would select on the test images.
        final = weights_path(result.run_dir, LAST_EMA if config.model_ema else LAST)
        metrics = run_eval(
            str(final),
            config.data,
            256,
            0,
            config.device,
            "none",
            str(result.run_dir / "confusion_matrix.png"),
            True,
        )
    elapsed = time.perf_counter() - start
    split = "validation" if config.data == DIGITS_VAL else "test"
    if args.json:
        print_json({**run_summary(result), "evaluated": str(final), split: metrics, "seconds": elapsed})
        return 0
    minutes, seconds = divmod(elapsed, 60)
    print(
        f"\n{split} top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% on {metrics['images']} "
        f"{config.data} {split} images, {int(minutes)} min {seconds:.0f} s in all"
    )
    print(f"checkpoint: {final}")
    print(f"plots: {', '.join(str(p) for p in result.plots)}, {metrics['confusion_matrix']}")
    print(f"try: sepvit predict {final} IMAGE.png   |   sepvit eval {final}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from sepvit.classify.inference import run_eval

    result = run_eval(
        args.checkpoint,
        args.data,
        args.batch_size,
        args.workers,
        args.device,
        args.amp,
        args.confusion_matrix,
        args.json,
        args.model,
        args.num_classes,
        args.img_size,
    )
    if args.json:
        print_json(result)
    else:
        print(
            f"{result['checkpoint']} on {result['data']}: top-1 {result['top1']:.2f}% "
            f"top-5 {result['top5']:.2f}% loss {result['loss']:.4f} ({result['images']} images)"
        )
        if "confusion_matrix" in result:
            print(f"confusion matrix: {result['confusion_matrix']}")
    return 0


def pack_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sepvit.classify.data import describe, pack_image_folder

    info, image_sets = pack_image_folder(Path(args.folder), Path(args.out), args.shard_size)
    for (split, entry), image_set in zip(info["splits"].items(), image_sets):
        print(describe(image_set, split) + f" -> {len(entry['filenames'])} shard(s)")
    print(f"shards: {args.out} (train with --data {args.out})")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from sepvit.classify.inference import format_predictions, run_predict

    results = run_predict(
        args.checkpoint, args.images, args.top_k, args.device, args.model, args.num_classes, args.img_size
    )
    print(format_predictions(results, args.json))
    return 0
