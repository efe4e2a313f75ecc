"""Checkpoint unwrapping and key renaming shared by the three families' filter functions."""

from __future__ import annotations

import timm
import torch

import sepvit  # noqa: F401
from sepvit.models import efficientvit, mobilevitv2
from sepvit.models import sepvit as sepvit_models
from sepvit.models.state_dicts import rename_key, unwrap_state_dict


def test_unwrap_prefers_ema_and_drops_ddp_prefix():
    live, ema = torch.zeros(2), torch.ones(2)
    checkpoint = {"state_dict": {"module.w": live}, "state_dict_ema": {"module.w": ema}, "epoch": 3}
    assert unwrap_state_dict(checkpoint) == {"w": ema}
    assert unwrap_state_dict({"model": {"w": live}}) == {"w": live}
    assert unwrap_state_dict({"w": live}) == {"w": live}


def test_rename_key_applies_every_rule_in_order():
    renames = ((r"^a\.(\d)\.", lambda m: f"b.{int(m.group(1)) + 1}."), (r"\.b\.", ".c."), (r"^b\.", "d."))
    assert rename_key("a.0.b.weight", renames) == "d.1.c.weight"


def test_every_family_loads_a_ddp_ema_checkpoint_of_itself():
    for name, module in (
        ("sepvit_lite", sepvit_models),
        ("sv_mobilevitv2_050", mobilevitv2),
        ("sv_efficientvit_m0", efficientvit),
    ):
        source, target = timm.create_model(name), timm.create_model(name)
        wrapped = {f"module.{key}": value for key, value in source.state_dict().items()}
        checkpoint = {"state_dict_ema": wrapped, "state_dict": {}, "epoch": 1}
        target.load_state_dict(module.checkpoint_filter_fn(checkpoint, target), strict=True)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (name, key)
