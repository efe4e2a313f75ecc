"""sepvit.models.create_model: timm's, with the hints and the optional arguments every caller needs."""

from __future__ import annotations

import pytest
import timm

import sepvit
from sepvit.errors import ConfigError, UnknownModelError
from sepvit.models import create_model, default_input_size


def test_an_unknown_name_is_refused_with_close_matches():
    with pytest.raises(UnknownModelError, match="close matches: sepvit_tiny") as refused:
        create_model("sepvit_tiyn")
    assert isinstance(refused.value, ConfigError)  # the command line's exit code 2


def test_a_model_without_a_window_grid_is_built_without_img_size():
    assert isinstance(create_model("resnet18", img_size=(64, 96), drop_path_rate=0.1), timm.models.ResNet)


def test_tagged_names_and_features_only_go_through():
    assert type(create_model("sv_efficientvit_m0.r224_in1k")).__name__ == "EfficientViT"
    backbone = create_model("sepvit_lite", features_only=True, img_size=(64, 96))
    assert len(backbone.feature_info.channels()) == 4
    assert default_input_size("sv_mobilevitv2_050.cvnets_in1k") == (3, 256, 256)
    assert sepvit.create_model is create_model
