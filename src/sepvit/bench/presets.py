"""Named model sets from the papers, and the ImageNet-1K top-1 (%) they report for each model."""

from __future__ import annotations

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

# Top-1 as published (SepViT Tables 2 and 9, Twins, MobileViTv2 at 256, EfficientViT); a model
# missing here is plotted against GMACs only.
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
    "sv_efficientvit_m0": 63.2,
    "sv_efficientvit_m1": 68.4,
    "sv_efficientvit_m2": 70.8,
    "sv_efficientvit_m3": 73.4,
    "sv_efficientvit_m4": 74.3,
    "sv_efficientvit_m5": 77.1,
    "efficientvit_m0": 63.2,
    "efficientvit_m5": 77.1,
    "sv_mobilevitv2_050": 70.18,
    "sv_mobilevitv2_075": 75.56,
    "sv_mobilevitv2_100": 78.09,
    "sv_mobilevitv2_125": 79.65,
    "sv_mobilevitv2_150": 80.38,
    "sv_mobilevitv2_175": 80.84,
    "sv_mobilevitv2_200": 81.17,
}
