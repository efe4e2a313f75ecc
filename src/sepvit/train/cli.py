"""Sub-commands ``train``, ``demo``, ``eval`` and ``predict`` of the ``sepvit`` command.

Exit codes: 0 success; 1 the run could not go on (loss became NaN, a checkpoint could not be
written); 2 bad input (missing path, unreadable data, a checkpoint that does not fit, bad option);
130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (128 + the signal number).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from sepvit.train.config import PRESETS, TRAIN_OPTION_GROUPS, add_options, resolve_train_config

DEMO_PRESET = "digits-demo"

TRAIN_EPILOG = """\
options are resolved in layers: defaults < --preset < the resumed run's config.yaml < --config < flags.
Many processes: torchrun --nproc_per_node=N -m sepvit train ... (gloo on CPU, NCCL on GPU).
exit codes: 0 done, 1 NaN loss or checkpoint not written, 2 bad input, 130/143 stopped by SIGINT/SIGTERM
(a checkpoint was saved; continue with --resume RUN)."""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train or fine-tune a model on digits or an image folder",
        formatter_class=_formatter,
        description="Train any of our models (or any timm model) with the papers' recipe built from timm "
        "parts; writes checkpoints, metrics (CSV, TensorBoard) and plots to a run folder.",
        epilog=TRAIN_EPILOG,
    )
    add_options(train, TRAIN_OPTION_GROUPS)
    train.set_defaults(func=train_command)

    demo = subparsers.add_parser(
        "demo",
        help="train SepViT-Lite on the bundled digits, evaluate it, show where results are",
        formatter_class=_formatter,
        description=f"`sepvit train --preset {DEMO_PRESET}` followed by `sepvit eval` of the final "
        f"weights (EMA's when EMA is on) on the digits test split. Preset: {PRESETS[DEMO_PRESET]}. "
        "Every train option can override it.",
        epilog=TRAIN_EPILOG,
    )
    add_options(demo, TRAIN_OPTION_GROUPS)
    demo.set_defaults(func=demo_command, preset=DEMO_PRESET)

    evaluate = subparsers.add_parser(
        "eval",
        help="top-1/top-5 and loss of a checkpoint on digits or a folder's val/ images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate a checkpoint written by `sepvit train` (or a plain state dict with --model).",
    )
    evaluate.add_argument("checkpoint", help="best.safetensors or last.safetensors of a run")
    evaluate.add_argument(
        "--data",
        default=None,
        help="'digits' or a folder with val/<class>/*; default: the data the checkpoint was trained on",
    )
    evaluate.add_argument("--batch-size", type=int, default=256, help="images per batch")
    evaluate.add_argument("--workers", type=int, default=0, help="data-loading processes")
    evaluate.add_argument(
        "--confusion-matrix",
        metavar="PNG",
        default=None,
        help="also write the confusion matrix to this PNG file",
    )
    _add_inference_options(evaluate)
    evaluate.add_argument(
        "--amp",
        choices=("auto", "none", "bf16", "fp16"),
        default="none",
        help="mixed precision for evaluation",
    )
    evaluate.set_defaults(func=eval_command)

    predict = subparsers.add_parser(
        "predict",
        help="top-k classes with probabilities for image files",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Classify image files with a checkpoint; prints one line per image (or JSON).",
    )
    predict.add_argument("checkpoint", help="best.safetensors or last.safetensors of a run")
    predict.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    predict.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    _add_inference_options(predict)
    predict.set_defaults(func=predict_command)


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    parser.add_argument(
        "--model",
        default=None,
        help="model name, to load a checkpoint that has no sepvit metadata (a plain state dict)",
    )
    parser.add_argument("--num-classes", type=int, default=None, help="classes of such a plain state dict")
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input size for such a plain state dict (default: the model's)",
    )


def _run_training(config: dict[str, Any]) -> tuple[int, Any]:
    from sepvit.train.distributed import init_distributed, shutdown
    from sepvit.train.runner import Trainer, TrainingError

    context = init_distributed(config["device"])
    try:
        result = Trainer(config, context).run()
    except TrainingError as error:
        print(f"sepvit train: error: {error}", file=sys.stderr, flush=True)
        return 1, None
    finally:
        shutdown(context)
    if result.interrupted_by:
        signum = getattr(signal, result.interrupted_by, None)
        return (128 + int(signum) if signum is not None else 1), result
    if context.is_main and result.best:
        from sepvit.train.checkpoint import BEST, LAST, LAST_EMA, weights_path

        last = result.history[-1]
        print(
            f"best checkpoint: {weights_path(result.run_dir, BEST)} (top-1 {result.best['top1']:.2f}%, "
            f"epoch {result.best['epoch']}, {result.best['weights']} weights)"
        )
        print(
            f"last checkpoint: {weights_path(result.run_dir, LAST)} (top-1 {last['val_top1']:.2f}%, "
            f"epoch {last['epoch']})"
        )
        if last["ema_val_top1"] is not None:
            print(
                f"last EMA checkpoint: {weights_path(result.run_dir, LAST_EMA)} "
                f"(top-1 {last['ema_val_top1']:.2f}%, epoch {last['epoch']})"
            )
        print(
            f"metrics: {result.run_dir / 'metrics.csv'}; plots: {', '.join(str(p) for p in result.plots)}",
            flush=True,
        )
    return 0, result


def train_command(args: argparse.Namespace) -> int:
    return _run_training(resolve_train_config(args))[0]


def demo_command(args: argparse.Namespace) -> int:
    from sepvit.train.checkpoint import LAST, LAST_EMA, weights_path
    from sepvit.train.data import DIGITS_VAL
    from sepvit.train.inference import run_eval

    start = time.perf_counter()
    config = resolve_train_config(args)
    code, result = _run_training(config)
    if code != 0 or result is None or int(os.environ.get("RANK", "0")) != 0:
        return code
    # The final weights (EMA's when EMA is on), not the best epoch: digits has no validation split
    # apart from the test split, so picking the best epoch would select on the test images.
    final = weights_path(result.run_dir, LAST_EMA if config["model_ema"] else LAST)
    metrics = run_eval(
        str(final),
        config["data"],
        256,
        0,
        config["device"],
        "none",
        str(result.run_dir / "confusion_matrix.png"),
        as_json=True,
    )
    minutes, seconds = divmod(time.perf_counter() - start, 60)
    split = "validation" if config["data"] == DIGITS_VAL else "test"
    print(
        f"\n{split} top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% on {metrics['images']} "
        f"{config['data']} {split} images, {int(minutes)} min {seconds:.0f} s in all"
    )
    print(f"checkpoint: {final}")
    print(f"plots: {', '.join(str(p) for p in result.plots)}, {metrics['confusion_matrix']}")
    print(f"try: sepvit predict {final} IMAGE.png   |   sepvit eval {final}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from sepvit.train.inference import run_eval

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
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['checkpoint']} on {result['data']}: top-1 {result['top1']:.2f}% "
            f"top-5 {result['top5']:.2f}% loss {result['loss']:.4f} ({result['images']} images)"
        )
        if "confusion_matrix" in result:
            print(f"confusion matrix: {result['confusion_matrix']}")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from sepvit.cli import CliError
    from sepvit.train.inference import format_predictions, run_predict

    if args.top_k < 1:
        raise CliError("--top-k must be at least 1")
    results = run_predict(
        args.checkpoint, args.images, args.top_k, args.device, args.model, args.num_classes, args.img_size
    )
    print(format_predictions(results, args.json))
    return 0
