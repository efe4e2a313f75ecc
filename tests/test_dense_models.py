"""Detectors and segmenters on a SepViT backbone: shapes, gradients, mixed image sizes, checkpoints."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from sepvit.dense.backbone import (
    BackboneWithFPN,
    create_features,
    load_classification_checkpoint,
)
from sepvit.dense.data import IGNORE_INDEX, pad_to_batch
from sepvit.dense.detection import build_detector
from sepvit.dense.segmentation import Segmenter, predict_probabilities
from sepvit.errors import CheckpointError

BACKBONE = "sepvit_lite"


def _body(img_size=(64, 64)):
    torch.manual_seed(0)
    return create_features(BACKBONE, img_size=img_size)


def _targets(sizes, with_masks):
    targets = []
    for height, width in sizes:
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, width - 2.0, height - 3.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if with_masks:
            masks = torch.zeros(2, height, width, dtype=torch.uint8)
            masks[0, 6:40, 4:30] = 1
            masks[1, 10 : height - 3, 20 : width - 2] = 1
            target["masks"] = masks
        targets.append(target)
    return targets


def test_backbone_with_fpn_gives_strided_maps_of_out_channels():
    backbone = BackboneWithFPN(_body(), out_channels=32)
    features = backbone(torch.rand(1, 3, 64, 96))
    assert backbone.out_channels == 32
    assert [tuple(f.shape) for f in features.values()] == [(1, 32, 64 // s, 96 // s) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize("arch", ["retinanet", "maskrcnn"])
def test_detector_trains_and_predicts_on_mixed_image_sizes(arch):
    sizes = [(64, 80), (48, 96)]
    images = [torch.rand(3, *size) for size in sizes]
    detector = build_detector(arch, _body(), num_classes=3, min_size=64, max_size=96, fpn_channels=32)
    detector.train()
    losses = detector(images, _targets(sizes, with_masks=arch == "maskrcnn"))
    expected = (
        {"classification", "bbox_regression"} if arch == "retinanet" else {"loss_classifier", "loss_mask"}
    )
    assert expected <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    stem_grad = next(detector.backbone.body.parameters()).grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0
    detector.eval()
    with torch.no_grad():
        outputs = detector(images)
    for output, (height, width) in zip(outputs, sizes):
        boxes = output["boxes"]
        # Boxes come back in each input image's own coordinates.
        assert (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
        assert ((output["labels"] >= 1) & (output["labels"] <= 3)).all()
        if arch == "maskrcnn":
            assert output["masks"].shape[1:] == (1, height, width)


@pytest.mark.parametrize("head", ["fpn", "upernet"])
def test_segmenter_trains_and_predicts_on_mixed_image_sizes(head):
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 48)]
    labels = [torch.randint(0, 4, (50, 70)), torch.randint(0, 4, (64, 48))]
    batch, label_batch = pad_to_batch(images, labels)
    assert batch.shape == (2, 3, 64, 96) and (label_batch[0, 50:] == IGNORE_INDEX).all()
    model = Segmenter(_body(), head, num_classes=4, head_channels=32)
    losses = model(batch, label_batch)
    assert set(losses) == ({"loss_seg", "loss_aux"} if head == "upernet" else {"loss_seg"})
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.decode_head.parameters())
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 50, 70)).shape == (1, 4, 50, 70)
        probabilities = predict_probabilities(model, images[0], (100, 140), scales=(0.5, 1.0), flip=True)
    assert probabilities.shape == (4, 100, 140)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(100, 140))


def test_flip_test_averages_with_the_mirrored_prediction_of_the_mirrored_image():
    model = Segmenter(_body(), "fpn", num_classes=3, head_channels=32).eval()
    image = torch.rand(3, 64, 64)
    single = predict_probabilities(model, image, (64, 64))
    mirrored = predict_probabilities(model, image.flip(-1), (64, 64)).flip(-1)
    assert not torch.allclose(single, mirrored)
    torch.testing.assert_close(
        predict_probabilities(model, image, (64, 64), flip=True), (single + mirrored) / 2
    )


def test_classification_checkpoint_loads_into_backbone_with_a_new_window_grid(tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model(BACKBONE, num_classes=10)  # window grid for 224×224
    path = tmp_path / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    body = _body(img_size=(96, 128))
    report = load_classification_checkpoint(body, BACKBONE, path, img_size=(96, 128))
    assert not report.missing and not report.mismatched
    assert report.adapted and all(name.endswith("window_tokens") for name in report.adapted)
    assert {"head.fc.weight", "head.fc.bias"} <= set(report.unexpected)
    source = classifier.state_dict()
    for name, tensor in body.state_dict().items():
        original = source[name.removeprefix("model.")]
        if original.shape == tensor.shape:
            torch.testing.assert_close(tensor, original)
    assert "loaded" in report.summary()


def test_foreign_or_wrong_checkpoints_are_refused(tmp_path):
    body = _body()
    resnet = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), resnet)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_classification_checkpoint(body, BACKBONE, resnet, img_size=(64, 64))
    wider = tmp_path / "wider.safetensors"
    state = timm.create_model(BACKBONE, embed_dims=(48, 96, 192, 384)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(wider))
    with pytest.raises(CheckpointError, match="shapes differ"):
        load_classification_checkpoint(body, BACKBONE, wider, img_size=(64, 64))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_classification_checkpoint(body, BACKBONE, broken, img_size=(64, 64))
