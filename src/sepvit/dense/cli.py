"""``sepvit detect train|eval|predict`` and ``sepvit segment train|eval|predict``.

Without ``--data`` the commands use the embedded shapes dataset (generated once into
``$SEPVIT_DATA`` or ``~/.cache/sepvit``) with a small recipe that trains in minutes on a CPU;
with ``--data`` the defaults are the paper's recipes (mmdetection 1× schedule, mmsegmentation
Semantic FPN 80k / UperNet 160k iterations expressed in ADE20K epochs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sepvit.cli import CliError

# Recipes: the paper's (used with --data) and the embedded dataset's. None means "not set".
DETECT_RECIPES = {
    "paper": dict(
        model="sepvit_tiny",
        epochs=12,
        batch_size=2,
        lr=1e-4,
        weight_decay=1e-3,
        warmup_iters=500,
        milestones=[8, 11],
        min_size=800,
        max_size=1333,
        fpn_channels=256,
        rois_per_image=512,
        drop_path=0.2,
    ),
    "synthetic": dict(
        model="sepvit_lite",
        epochs=10,
        batch_size=8,
        lr=5e-4,
        weight_decay=1e-4,
        warmup_iters=50,
        milestones=[8, 9],
        min_size=128,
        max_size=128,
        fpn_channels=64,
        rois_per_image=128,
        drop_path=0.0,
    ),
}
SEGMENT_RECIPES = {
    "paper-fpn": dict(
        model="sepvit_tiny",
        epochs=64,
        batch_size=4,
        lr=1e-4,
        weight_decay=1e-4,
        warmup_iters=0,
        power=0.9,
        crop_size=512,
        head_channels=None,
        drop_path=0.2,
    ),
    "paper-upernet": dict(
        model="sepvit_tiny",
        epochs=127,
        batch_size=2,
        lr=6e-5,
        weight_decay=1e-2,
        warmup_iters=1500,
        power=1.0,
        crop_size=512,
        head_channels=None,
        drop_path=0.3,
    ),
    "synthetic": dict(
        model="sepvit_lite",
        epochs=10,
        batch_size=8,
        lr=1e-3,
        weight_decay=1e-4,
        warmup_iters=30,
        power=1.0,
        crop_size=128,
        head_channels=64,
        drop_path=0.0,
    ),
}
SYNTHETIC_SIZE = {"images": 160, "train": 300, "val": 60}


def _common_train_arguments(parser: argparse.ArgumentParser, recipes: dict) -> None:
    listed = "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in r.items()) for name, r in recipes.items()
    )
    parser.epilog = f"Defaults by recipe ({listed})."
    parser.add_argument("--data", type=Path, help="dataset root (default: the embedded shapes dataset)")
    parser.add_argument(
        "--model",
        help="backbone: any timm model with features_only (default: the checkpoint's, else recipe)",
    )
    parser.add_argument(
        "--pretrained-backbone", type=Path, metavar="CKPT", help="classification checkpoint of the backbone"
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="images per process")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--warmup-iters", type=int)
    parser.add_argument("--drop-path", type=float, help="stochastic depth rate of the backbone")
    parser.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    parser.add_argument(
        "--output", type=Path, required=True, help="run folder: checkpoints, metrics.csv, metrics.png"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--log-every", type=int, default=20, help="steps between progress lines (no terminal)"
    )


def _eval_arguments(parser: argparse.ArgumentParser, default_split: str) -> None:
    parser.add_argument("checkpoint", type=Path, help="a best/last.safetensors written by train")
    parser.add_argument("--data", type=Path, help="dataset root (default: the embedded shapes dataset)")
    parser.add_argument("--split", default=default_split)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a best/last.safetensors written by train")
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    parser.add_argument("--output-dir", type=Path, required=True, help="where the PNGs go (one per image)")
    parser.add_argument("--device", default="auto")


def register(subparsers) -> None:
    detect = subparsers.add_parser(
        "detect", help="object detection / instance segmentation (RetinaNet, Mask R-CNN)"
    )
    detect_commands = detect.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = detect_commands.add_parser("train", help="train a detector on a COCO-format dataset")
    _common_train_arguments(train, DETECT_RECIPES)
    train.add_argument("--arch", choices=("retinanet", "maskrcnn"), default="retinanet")
    train.add_argument("--train-split", default="train2017", help="COCO split (embedded data: train)")
    train.add_argument("--val-split", default="val2017", help="COCO split (embedded data: val)")
    train.add_argument("--min-size", type=int, help="shorter side of resized images")
    train.add_argument("--max-size", type=int, help="longest allowed longer side")
    train.add_argument(
        "--multi-scale", action="store_true", help="train with shorter sides 0.6-1.0 × --min-size"
    )
    train.add_argument("--milestones", type=int, nargs="+", help="epochs at which the lr drops ×0.1")
    train.add_argument("--fpn-channels", type=int)
    train.add_argument("--rois-per-image", type=int, help="Mask R-CNN: proposals sampled per training image")
    train.set_defaults(func=_detect_train)
    evaluate = detect_commands.add_parser("eval", help="COCO box (and mask) AP of a trained detector")
    _eval_arguments(evaluate, "val2017")
    evaluate.add_argument("--batch-size", type=int, default=2)
    evaluate.set_defaults(func=_detect_eval)
    predict = detect_commands.add_parser("predict", help="draw boxes (and masks) over images, as PNG")
    _predict_arguments(predict)
    predict.add_argument("--score-threshold", type=float, default=0.3)
    predict.set_defaults(func=_detect_predict)

    segment = subparsers.add_parser("segment", help="semantic segmentation (Semantic FPN, UperNet)")
    segment_commands = segment.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = segment_commands.add_parser("train", help="train a segmenter on an ADE20K-format dataset")
    _common_train_arguments(train, SEGMENT_RECIPES)
    train.add_argument("--head", choices=("fpn", "upernet"), default="fpn")
    train.add_argument("--train-split", default="training")
    train.add_argument("--val-split", default="validation")
    train.add_argument("--num-classes", type=int, help="number of classes (default: classes.txt, else 150)")
    train.add_argument(
        "--crop-size", type=int, help="training crop; evaluation resizes the shorter side to it"
    )
    train.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        default=(0.5, 2.0),
        metavar=("LOW", "HIGH"),
        help="multi-scale training: random rescale range (1 1 turns it off)",
    )
    train.add_argument("--power", type=float, help="poly schedule power")
    train.add_argument("--head-channels", type=int, help="decode head width (default 128 FPN, 512 UperNet)")
    train.set_defaults(func=_segment_train)
    evaluate = segment_commands.add_parser("eval", help="mIoU of a trained segmenter, single- or multi-scale")
    _eval_arguments(evaluate, "validation")
    _scale_arguments(evaluate)
    evaluate.set_defaults(func=_segment_eval)
    predict = segment_commands.add_parser(
        "predict", help="draw the colour-coded class map over images, as PNG"
    )
    _predict_arguments(predict)
    _scale_arguments(predict)
    predict.set_defaults(func=_segment_predict)


def _scale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[1.0], help="test scales (image resize factors)"
    )
    parser.add_argument(
        "--ms", action="store_true", help="multi-scale test: scales 0.5-1.75 in steps of 0.25, with flip"
    )
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")


# --- shared helpers ---------------------------------------------------------------------------


def _resolve(args: argparse.Namespace, recipe: dict) -> None:
    if args.model is None and args.pretrained_backbone is not None:
        args.model = _checkpoint_model(args.pretrained_backbone)
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _checkpoint_model(path: Path) -> str | None:
    """The model a ``sepvit train`` checkpoint was trained as (None for a plain state dict)."""
    from sepvit.dense.backbone import CheckpointMismatchError, read_state_dict

    try:
        _, info = read_state_dict(path)
    except CheckpointMismatchError as error:
        raise CliError(str(error)) from error
    return (info or {}).get("model")


def _dataset_root(args: argparse.Namespace, kind: str) -> Path:
    if args.data is not None:
        return args.data
    from sepvit.dense import synthetic

    writer = synthetic.write_coco if kind == "coco" else synthetic.write_ade20k
    root = synthetic.default_root(kind)
    if not root.exists():
        print(f"writing the embedded shapes dataset to {root}", flush=True)
    return writer(
        root, num_train=SYNTHETIC_SIZE["train"], num_val=SYNTHETIC_SIZE["val"], size=SYNTHETIC_SIZE["images"]
    )


def _context(device: str):
    from sepvit.train.distributed import init_distributed

    return init_distributed(device)


def _load_backbone(body, args: argparse.Namespace, img_size, context) -> None:
    if args.pretrained_backbone is None:
        return
    from sepvit.dense.backbone import CheckpointMismatchError, load_classification_checkpoint

    try:
        report = load_classification_checkpoint(body, args.model, args.pretrained_backbone, img_size=img_size)
    except CheckpointMismatchError as error:
        raise CliError(str(error)) from error
    if context.is_main:
        print(f"backbone from {args.pretrained_backbone}: {report.summary()}", flush=True)


def _seed_process(args: argparse.Namespace, context) -> None:
    """Called once the model is built: DDP copies rank 0's weights to every process, and from here
    on each process draws its own augmentation and drop-path noise (rank 0 keeps the single-process
    stream)."""
    if context.rank > 0:
        import torch

        torch.manual_seed(args.seed + context.rank)


def _train_loader(dataset, args: argparse.Namespace, context, collate):
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, seed=args.seed) if context.distributed else None
    # Seeds the shuffling of one process and the loader workers' augmentation (own noise per process).
    generator = torch.Generator().manual_seed(args.seed + context.rank)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=collate,
        drop_last=True,
        generator=generator,
        persistent_workers=args.workers > 0,
    )


def _run(trainer, args: argparse.Namespace) -> int:
    from sepvit.dense.data import DatasetError
    from sepvit.dense.engine import TrainingError
    from sepvit.train.distributed import shutdown

    try:
        if args.resume:
            trainer.resume()
        metrics = trainer.fit()
    except (TrainingError, DatasetError) as error:
        raise CliError(str(error)) from error
    finally:
        shutdown(trainer.context)
    if trainer.context.is_main and metrics:
        print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        print(f"checkpoints, metrics.csv and metrics.png in {trainer.output_dir}", flush=True)
    return 0


def _read_checkpoint(path: Path, task: str):
    from sepvit.dense.engine import TrainingError, read_weights

    try:
        state, config, _ = read_weights(path)
    except TrainingError as error:
        raise CliError(str(error)) from error
    if config.get("task") != task:
        raise CliError(f"{path} is a {config.get('task')} checkpoint, not a {task} one")
    return state, config


def _image_paths(inputs: list[Path]) -> list[Path]:
    from sepvit.dense.data import IMAGE_SUFFIXES

    paths = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise CliError(f"{item} is neither an image file nor a folder")
    if not paths:
        raise CliError("no images to predict on")
    return paths


def _save_png(canvas, path: Path) -> None:
    from PIL import Image

    from sepvit.train.checkpoint import write_atomically

    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    write_atomically({path: lambda name: picture.save(name, format="PNG")})


def _dataset_or_error(build):
    from sepvit.dense.data import DatasetError

    try:
        return build()
    except DatasetError as error:
        raise CliError(str(error)) from error


# --- detection --------------------------------------------------------------------------------


def build_detection_model(config: dict, drop_path_rate: float = 0.0):
    """A detector from a checkpoint's config (see ``_detect_train`` for its keys)."""
    from sepvit.dense.backbone import create_features
    from sepvit.dense.detection import build_detector

    body = create_features(config["model"], img_size=config["img_size"], drop_path_rate=drop_path_rate)
    return build_detector(
        config["arch"],
        body,
        config["num_classes"],
        min_size=tuple(config["train_min_sizes"]),
        max_size=config["max_size"],
        fpn_channels=config["fpn_channels"],
        rois_per_image=config["rois_per_image"],
    )


def _detect_train(args: argparse.Namespace) -> int:
    import torch

    from sepvit.dense.data import CocoDetection, collate_detection, detection_transforms
    from sepvit.dense.detection import evaluate_detection
    from sepvit.dense.engine import Recipe, Trainer

    _resolve(args, DETECT_RECIPES["synthetic" if args.data is None else "paper"])
    if args.data is None:
        args.train_split, args.val_split = "train", "val"
    torch.manual_seed(args.seed)
    context = _context(args.device)
    root = _dataset_root(args, "coco") if context.is_main else None
    if context.distributed:
        torch.distributed.barrier()
        root = _dataset_root(args, "coco")
    with_masks = args.arch == "maskrcnn"
    train_set = _dataset_or_error(
        lambda: CocoDetection(root, args.train_split, detection_transforms(True), with_masks)
    )
    val_set = _dataset_or_error(lambda: CocoDetection(root, args.val_split))
    min_sizes = [args.min_size]
    if args.multi_scale:
        min_sizes = list(range(args.min_size, round(0.6 * args.min_size) - 1, -32))[::-1]
    config = {
        "task": "detect",
        "arch": args.arch,
        "model": args.model,
        "num_classes": train_set.num_classes,
        "class_names": train_set.class_names,
        "category_ids": train_set.category_ids,
        "img_size": [args.min_size, args.max_size],
        "train_min_sizes": min_sizes,
        "max_size": args.max_size,
        "fpn_channels": args.fpn_channels,
        "rois_per_image": args.rois_per_image,
    }
    model = build_detection_model(config, args.drop_path)
    _load_backbone(model.backbone.body, args, config["img_size"], context)
    _seed_process(args, context)
    recipe = Recipe(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule="step",
        milestones=tuple(args.milestones),
        warmup_iters=args.warmup_iters,
        clip_grad=args.clip_grad,
    )

    def compute_losses(network, batch, device):
        images, targets = batch
        targets = [
            {k: v.as_subclass(torch.Tensor).to(device) for k, v in t.items() if k != "image_id"}
            for t in targets
        ]
        return network([image.to(device) for image in images], targets)

    trainer = Trainer(
        model=model,
        train_loader=_train_loader(train_set, args, context, collate_detection),
        compute_losses=compute_losses,
        evaluate=lambda m: evaluate_detection(m, val_set, context.device, args.batch_size, args.workers),
        recipe=recipe,
        output_dir=args.output,
        config=config,
        primary_metric="bbox_AP",
        context=context,
        log_every=args.log_every,
    )
    return _run(trainer, args)


def _detect_model_from(path: Path, device):
    state, config = _read_checkpoint(path, "detect")
    model = build_detection_model(config)
    model.load_state_dict(state)
    return model.to(device).eval(), config


def _detect_eval(args: argparse.Namespace) -> int:
    from sepvit.dense.data import CocoDetection
    from sepvit.dense.detection import evaluate_detection

    device = _context(args.device).device
    model, config = _detect_model_from(args.checkpoint, device)
    if args.data is None:
        args.split = "val" if args.split == "val2017" else args.split
    dataset = _dataset_or_error(lambda: CocoDetection(_dataset_root(args, "coco"), args.split))
    if dataset.class_names != config["class_names"]:
        raise CliError(
            f"the dataset's categories {dataset.class_names} differ from the model's {config['class_names']}"
        )
    metrics = evaluate_detection(model, dataset, device, args.batch_size, args.workers)
    print(", ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items()))
    return 0


def _detect_predict(args: argparse.Namespace) -> int:
    import torch

    from sepvit.dense.data import read_rgb
    from sepvit.dense.visualize import draw_detections

    device = _context(args.device).device
    model, config = _detect_model_from(args.checkpoint, device)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    from torchvision.transforms.v2.functional import pil_to_tensor

    for path in _image_paths(args.images):
        image = pil_to_tensor(_dataset_or_error(lambda p=path: read_rgb(p))).float() / 255
        with torch.no_grad():
            prediction = model([image.to(device)])[0]
        canvas = draw_detections(image, prediction, config["class_names"], args.score_threshold)
        _save_png(canvas, args.output_dir / f"{path.stem}.png")
        found = int((prediction["scores"] >= args.score_threshold).sum())
        print(f"{path} -> {args.output_dir / (path.stem + '.png')}: {found} objects")
    return 0


# --- segmentation -----------------------------------------------------------------------------


def build_segmentation_model(config: dict, drop_path_rate: float = 0.0):
    from sepvit.dense.backbone import create_features
    from sepvit.dense.segmentation import Segmenter

    body = create_features(config["model"], img_size=config["img_size"], drop_path_rate=drop_path_rate)
    return Segmenter(body, config["head"], config["num_classes"], head_channels=config["head_channels"])


def _segment_train(args: argparse.Namespace) -> int:
    import torch

    from sepvit.dense.data import ADE20KSegmentation, SegmentationEvalDataset, collate_segmentation
    from sepvit.dense.data import segmentation_transforms as transforms
    from sepvit.dense.engine import Recipe, Trainer
    from sepvit.dense.segmentation import evaluate_segmentation

    _resolve(args, SEGMENT_RECIPES["synthetic" if args.data is None else f"paper-{args.head}"])
    torch.manual_seed(args.seed)
    context = _context(args.device)
    root = _dataset_root(args, "ade20k") if context.is_main else None
    if context.distributed:
        torch.distributed.barrier()
        root = _dataset_root(args, "ade20k")
    has_names = (root / "classes.txt").is_file()
    num_classes = args.num_classes or (None if has_names else 150)
    train_transforms = transforms(True, args.crop_size, tuple(args.scale_range))
    train_set = _dataset_or_error(
        lambda: ADE20KSegmentation(root, args.train_split, train_transforms, num_classes)
    )
    val_set = _dataset_or_error(lambda: ADE20KSegmentation(root, args.val_split, None, train_set.num_classes))
    config = {
        "task": "segment",
        "head": args.head,
        "model": args.model,
        "num_classes": train_set.num_classes,
        "class_names": train_set.class_names,
        "img_size": [args.crop_size, args.crop_size],
        "crop_size": args.crop_size,
        "head_channels": args.head_channels,
    }
    model = build_segmentation_model(config, args.drop_path)
    _load_backbone(model.body, args, config["img_size"], context)
    _seed_process(args, context)
    recipe = Recipe(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule="poly",
        power=args.power,
        warmup_iters=args.warmup_iters,
        warmup_ratio=1e-6,
        clip_grad=args.clip_grad,
    )

    def compute_losses(network, batch, device):
        images, labels = batch
        return network(images.to(device), labels.to(device))

    eval_set = SegmentationEvalDataset(val_set, args.crop_size)
    trainer = Trainer(
        model=model,
        train_loader=_train_loader(train_set, args, context, collate_segmentation),
        compute_losses=compute_losses,
        evaluate=lambda m: evaluate_segmentation(m, eval_set, context.device, num_workers=args.workers),
        recipe=recipe,
        output_dir=args.output,
        config=config,
        primary_metric="mIoU",
        context=context,
        log_every=args.log_every,
    )
    return _run(trainer, args)


def _segment_model_from(path: Path, device):
    state, config = _read_checkpoint(path, "segment")
    model = build_segmentation_model(config)
    model.load_state_dict(state)
    return model.to(device).eval(), config


def _test_scales(args: argparse.Namespace) -> tuple[tuple[float, ...], bool]:
    if args.ms:
        return (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True
    return tuple(args.scales), args.flip


def _segment_eval(args: argparse.Namespace) -> int:
    from sepvit.dense.data import ADE20KSegmentation, SegmentationEvalDataset
    from sepvit.dense.segmentation import evaluate_segmentation

    device = _context(args.device).device
    model, config = _segment_model_from(args.checkpoint, device)
    root = _dataset_root(args, "ade20k")
    dataset = _dataset_or_error(lambda: ADE20KSegmentation(root, args.split, None, config["num_classes"]))
    scales, flip = _test_scales(args)
    metrics = evaluate_segmentation(
        model, SegmentationEvalDataset(dataset, config["crop_size"]), device, scales, flip, args.workers
    )
    print(
        f"scales {', '.join(map(str, scales))}{' + flip' if flip else ''}: "
        + ", ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items())
    )
    return 0


def _segment_predict(args: argparse.Namespace) -> int:
    from torchvision.transforms import v2

    from sepvit.dense.data import read_rgb
    from sepvit.dense.segmentation import predict_probabilities
    from sepvit.dense.visualize import draw_class_map

    device = _context(args.device).device
    model, config = _segment_model_from(args.checkpoint, device)
    scales, flip = _test_scales(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for path in _image_paths(args.images):
        image = v2.functional.pil_to_tensor(_dataset_or_error(lambda p=path: read_rgb(p))).float() / 255
        resized = v2.functional.resize(image, config["crop_size"], antialias=True)
        probabilities = predict_probabilities(
            model, resized.to(device), tuple(image.shape[-2:]), scales, flip
        )
        class_map = probabilities.argmax(0)
        _save_png(
            draw_class_map(image, class_map, config["num_classes"]), args.output_dir / f"{path.stem}.png"
        )
        present = [config["class_names"][int(c)] for c in class_map.unique()]
        print(f"{path} -> {args.output_dir / (path.stem + '.png')}: {', '.join(present)}")
    return 0
