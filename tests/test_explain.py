"""Grad-CAM maps and the effective receptive field measure."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import sepvit  # noqa: F401  (registers the models)
from sepvit.explain import effective_receptive_field, grad_cam, outside_share, overlay


def test_outside_share_of_known_gradients() -> None:
    centred = torch.zeros(1, 32, 32)
    centred[0, 14:18, 14:18] = 1.0
    uniform = torch.ones(1, 32, 32)
    assert outside_share(centred, 8).item() == 0.0
    assert outside_share(uniform, 8).item() == pytest.approx(1 - 64 / 1024)


def test_receptive_field_grows_with_depth_and_stays_local_in_a_convnet() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    images = torch.randn(2, 3, 128, 128)
    early = effective_receptive_field(model, images, window=48, stage=1)
    late = effective_receptive_field(model, images, window=48, stage=-1)
    assert early < 0.05  # a few 3×3 convolutions never reach 24 px from the centre
    assert late > early


def test_global_attention_reaches_the_whole_image() -> None:
    torch.manual_seed(0)
    model = timm.create_model("sepvit_lite", img_size=64, num_classes=10)
    for parameter in model.parameters():  # random, non-trivial weights everywhere
        torch.nn.init.normal_(parameter, std=0.05)
    share = effective_receptive_field(model, torch.randn(2, 3, 64, 64), window=16, stage=-1)
    assert 0.3 < share < 1


def test_grad_cam_map_and_overlay() -> None:
    torch.manual_seed(0)
    model = timm.create_model("sepvit_lite", img_size=64, num_classes=10)
    image = torch.rand(1, 3, 64, 64)
    heat = grad_cam(model, image, target=3)
    assert heat.shape == (64, 64)
    assert heat.min() >= 0 and heat.max() <= 1 + 1e-6
    picture = overlay(image[0].permute(1, 2, 0).numpy(), heat)
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8


def reference_cam(model: torch.nn.Module, image: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM by its definition: ReLU of a stage's channels weighted by their mean gradient,
    bilinearly resized to the image, scaled to [0, 1]; the stage is the deepest whose map is 4 × 4 or
    more (at 64 px: the third, 4 × 4)."""
    stages = model.stages if hasattr(model, "stages") else model.layers
    outputs = []
    handle = stages[2].register_forward_hook(lambda module, args, output: outputs.append(output))
    score = model.eval()(image)[0, target]
    handle.remove()
    (stage,) = outputs
    (gradient,) = torch.autograd.grad(score, stage)
    assert stage.shape[-1] == 4 or stage.shape[-2:-1] == (4,)
    if stage.shape[-1] == model.feature_info[2]["num_chs"]:  # NHWC stages (Swin)
        stage, gradient = stage.permute(0, 3, 1, 2), gradient.permute(0, 3, 1, 2)
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * stage).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[0, 0].detach().numpy()
    return (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)


@pytest.mark.parametrize("name", ["sepvit_lite", "swin_tiny_patch4_window7_224"])
def test_grad_cam_follows_its_definition_whatever_the_stage_layout(name) -> None:
    """SepViT's stages give NCHW, Swin's NHWC; a map read in the wrong layout comes out striped."""
    torch.manual_seed(0)
    options = {"window_size": 2, "depths": (1, 1, 2, 1)} if name.startswith("sepvit") else {"window_size": 2}
    model = timm.create_model(name, img_size=64, num_classes=10, **options)
    image = torch.rand(1, 3, 64, 64)
    heat = grad_cam(model, image, target=3)
    np.testing.assert_allclose(heat, reference_cam(model, image, 3), atol=0.02)


def test_grad_cam_takes_the_deepest_stage_of_at_least_four_by_four() -> None:
    from sepvit.explain.gradcam import cam_stage

    model = timm.create_model("sepvit_lite", img_size=(32, 192))
    for size, stage in (((224, 224), 3), ((28, 28), 1), ((32, 192), 1), ((64, 64), 2), ((8, 8), 0)):
        chosen, channels = cam_stage(model, *size)
        assert chosen is model.stages[stage] and channels == model.feature_info[stage]["num_chs"], size


def test_square_centred_on_the_centre_pixels_cell():
    gradient = torch.zeros(1, 32, 32)
    gradient[0, 16:24, 16:24] = 1.0  # the cell of an 8-px grid that holds pixel (16, 16)
    assert outside_share(gradient, 8, cell=8).item() == 0.0
    assert outside_share(gradient, 8).item() == pytest.approx(0.75)  # the centred square is [12, 20)
    assert outside_share(gradient, 16, cell=8).item() == 0.0  # [12, 28): the cell and a margin
    assert outside_share(gradient, 4, cell=8).item() == pytest.approx(0.75)  # [18, 22)
