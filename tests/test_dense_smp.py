"""Our models as encoders of segmentation_models_pytorch, through timm ("tu-" encoders)."""

import pytest
import torch

import sepvit  # noqa: F401  (registers our models with timm)

smp = pytest.importorskip("segmentation_models_pytorch")


@pytest.mark.parametrize("architecture", ["Unet"])
def test_sepvit_encoder_trains_in_smp_models(architecture):
    torch.manual_seed(0)
    model = getattr(smp, architecture)(encoder_name="tu-sepvit_lite", encoder_weights=None, classes=3)
    images = torch.rand(2, 3, 64, 96)
    logits = model(images)
    assert logits.shape == (2, 3, 64, 96)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, 64, 96))).backward()
    encoder_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in encoder_grads) and sum(g.abs().sum() for g in encoder_grads) > 0
    # The encoder's pyramid is SepViT's: strides 4 to 32 with the stage widths.
    assert model.encoder.out_channels[-4:] == [32, 64, 128, 256]
