"""Named model sets from the papers, and the ImageNet-1K top-1 (%) they report for each model."""

from __future__ import annotations

import timm

from sepvit.models import published_top1

PRESETS: dict[str, tuple[str, ...]] = {
    # SepViT paper, Table 2: the peers of SepViT-T at about 4.5 GMACs.
    "table2": (
        "sepvit_tiny",
        "swin_tiny_patch4_window7_224",
        "twins_svt_small",
        "twins_pcpvt_small",
        "pvt_v2_b2",
        "deit_small_patch16_224",
        "convnext_tiny",
        "poolformer_s24",
    ),
    # SepViT paper, Table 9, plus the project's other lite families.
    "table9": (
        "sepvit_lite",
        "mobilenetv2_100",
        "resnet18",
        "sv_efficientvit_m0",
        "sv_efficientvit_m1",
        "sv_efficientvit_m2",
        "sv_efficientvit_m3",
        "sv_efficientvit_m4",
        "sv_efficientvit_m5",
        "sv_mobilevitv2_050",
        "sv_mobilevitv2_075",
        "sv_mobilevitv2_100",
    ),
    "sepvit": ("sepvit_lite", "sepvit_tiny", "sepvit_small", "sepvit_base"),
}

# Top-1 as the papers report it (SepViT Tables 2 and 9, Twins, Swin, PVTv2, DeiT, ConvNeXt,
# PoolFormer, MobileNetV2, ResNet) for models whose weights this package does not describe; our
# MobileViTv2 and EfficientViT (and timm's originals of them) take the figure of their published
# weights, recorded once in their model files. A model without a figure is plotted against GMACs only.
PAPER_TOP1: dict[str, float] = {
    "sepvit_lite": 72.3,
    "sepvit_tiny": 82.7,
    "sepvit_small": 83.6,
    "sepvit_base": 84.2,
    "swin_tiny_patch4_window7_224": 81.3,
    "twins_svt_small": 81.7,
    "twins_pcpvt_small": 81.2,
    "pvt_v2_b2": 82.0,
    "deit_small_patch16_224": 79.9,
    "convnext_tiny": 82.1,
    "poolformer_s24": 80.3,
    "mobilenetv2_100": 71.8,
    "resnet18": 69.8,
}


def paper_top1(name: str) -> float | None:
    """The ImageNet-1k top-1 (%) reported for model ``name``, None where none is recorded."""
    if name in PAPER_TOP1:
        return PAPER_TOP1[name]
    ours = name if name.startswith("sv_") else f"sv_{name}"
    return published_top1(ours) if timm.is_model(ours) else None
