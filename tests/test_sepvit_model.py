"""SepViT models: the paper's parameter and MAC counts, timm conventions, any input size."""

from __future__ import annotations

import re

import pytest
import timm
import timm.optim
import torch

import sepvit
from sepvit.models.sepvit import SeparableWindowAttention, checkpoint_filter_fn, parse_block_plan
from sepvit.utils import count_macs, count_params

# Exact counts of the architecture in targets.md; GMACs at 224 as the issue states them.
PAPER_COUNTS = {
    "sepvit_lite": (3_661_128, 0.568),
    "sepvit_tiny": (31_182_856, 4.52),
    "sepvit_small": (46_570_504, 7.46),
    "sepvit_base": (82_377_064, 13.06),
}


def on_meta(name: str, **kwargs) -> torch.nn.Module:
    """A model without storage: counting needs shapes only."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_params_and_macs_match_the_paper(name):
    params, gmacs = PAPER_COUNTS[name]
    model = on_meta(name)
    assert count_params(model) == pytest.approx(params, rel=1e-3)
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.03)


def test_dssa_only_ablation_counts():
    model = on_meta("sepvit_tiny", block_plan="D,D,D,D")
    assert count_params(model) == pytest.approx(32.08e6, rel=1e-3)
    assert count_macs(model) / 1e9 == pytest.approx(4.42, rel=0.03)


def test_table6_window_representations_cost_what_the_paper_says():
    # Table 6: window tokens 31.2M, average pooling 31.2M, depthwise conv 31.3M, all 4.5 GFLOPs.
    avgpool = on_meta("sepvit_tiny", window_representation="avgpool")
    dwconv = on_meta("sepvit_tiny", window_representation="dwconv")
    assert round(count_params(avgpool) / 1e6, 1) == 31.2
    assert round(count_params(dwconv) / 1e6, 1) == 31.3
    assert round(count_macs(dwconv) / 1e9, 1) == 4.5


def test_registered_in_timm_and_listed():
    assert sepvit.list_models("sepvit_*") == ["sepvit_base", "sepvit_lite", "sepvit_small", "sepvit_tiny"]
    assert set(sepvit.list_models()) <= set(timm.list_models())
    model = sepvit.create_model("sepvit_lite", num_classes=10, in_chans=1, drop_path_rate=0.2, drop_rate=0.1)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.stages[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.stages[2].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2 * 8 / 10)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_block_plan_places_dssa_gsa_and_global_blocks():
    model = timm.create_model("sepvit_tiny")
    kinds = [
        [
            (block.attn.window_size, tuple(block.attn.window_tokens.shape[1:3]))
            if isinstance(block.attn, SeparableWindowAttention)
            else "global"
            for block in stage.blocks
        ]
        for stage in model.stages
    ]
    assert kinds == [
        [(7, (8, 8))],
        [(7, (4, 4)), (14, (2, 2))],
        [(7, (2, 2)), "global"] * 3,
        ["global", "global"],
    ]
    assert parse_block_plan("D,G&D,G&D,D", (1, 2, 6, 2), 7)[2] == [14, 7, 14, 7, 14, 7]
    with pytest.raises(ValueError, match="stages"):
        timm.create_model("sepvit_lite", block_plan="D,D")
    with pytest.raises(ValueError, match="D, G"):
        timm.create_model("sepvit_lite", block_plan="D,X,D,D")


@pytest.mark.parametrize("size", [(224, 224), (97, 131), (256, 320), (32, 32)])
def test_any_input_size(size):
    model = timm.create_model("sepvit_lite", num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_every_parameter_gets_a_gradient():
    model = timm.create_model("sepvit_lite", num_classes=5)
    model(torch.randn(2, 3, 224, 224)).logsumexp(dim=1).sum().backward()
    missing = [name for name, param in model.named_parameters() if param.grad is None or not param.grad.any()]
    assert missing == []


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model("sepvit_lite", num_classes=5)
    x = torch.randn(2, 3, 64, 96)
    plain = model(x)
    plain.sum().backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, plain)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_features_only_and_intermediates():
    torch.manual_seed(0)
    features = timm.create_model("sepvit_lite", features_only=True).eval()
    assert features.feature_info.channels() == [32, 64, 128, 256]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        maps = features(x)
    assert [tuple(m.shape) for m in maps] == [
        (1, 32, 32, 48),
        (1, 64, 16, 24),
        (1, 128, 8, 12),
        (1, 256, 4, 6),
    ]
    subset = timm.create_model("sepvit_lite", features_only=True, out_indices=(1, 3))
    assert subset.feature_info.reduction() == [8, 32]

    torch.manual_seed(0)
    model = timm.create_model("sepvit_lite").eval()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, norm=True)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(intermediates[-1], final.permute(0, 3, 1, 2))
        torch.testing.assert_close(maps[0], intermediates[0])


def test_head_api():
    model = timm.create_model("sepvit_lite").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 2, 2, 256)
        assert model.forward_head(features, pre_logits=True).shape == (2, 256)
        torch.testing.assert_close(model.forward_head(features), model(x))
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, 256)
    unpooled = timm.create_model("sepvit_lite", num_classes=0, global_pool="")
    assert unpooled(x).shape == (2, 2, 2, 256)


def test_no_weight_decay_and_group_matcher():
    model = timm.create_model("sepvit_tiny")
    no_decay = model.no_weight_decay()
    tokens = {name for name, _ in model.named_parameters() if name.endswith("window_tokens")}
    assert len(tokens) == 6 and tokens <= no_decay
    assert "norm.weight" in no_decay and "stages.0.blocks.0.attn.qkv.bias" in no_decay
    assert "stages.0.blocks.0.attn.qkv.weight" not in no_decay
    groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not any(id(param) in decayed for name, param in model.named_parameters() if name in tokens)
    matcher = model.group_matcher()
    assert re.match(matcher["stem"], "stages.0.downsample.proj.weight")


def test_checkpoint_filter_resizes_window_tokens():
    source = timm.create_model("sepvit_lite")
    target = timm.create_model("sepvit_lite", img_size=448)
    state = checkpoint_filter_fn({"model": source.state_dict()}, target)
    key = "stages.0.blocks.0.attn.window_tokens"
    assert state[key].shape == (1, 16, 16, 32)
    missing, unexpected = target.load_state_dict(state, strict=False)
    # At 448 the stage-3 GSA and stage-4 blocks hold several windows: their PSA layers are new.
    assert unexpected == []
    assert missing and all(".attn.psa." in name or name.endswith("window_tokens") for name in missing)


def test_zero_window_tokens_option_has_no_token_parameters():
    model = on_meta("sepvit_tiny", window_token="zero")
    assert not [name for name, _ in model.named_parameters() if "window_tokens" in name]
    assert count_params(model) == PAPER_COUNTS["sepvit_tiny"][0] - (64 * 96 + 20 * 192 + 3 * 4 * 384)


def test_jit_trace_matches_eager():
    model = timm.create_model("sepvit_lite").eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model("sepvit_lite", num_classes=10).eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


def test_timm_contract_output_format_meta_device_and_pruning():
    model = timm.create_model("sepvit_tiny", device="meta", dtype=torch.bfloat16)
    assert model.output_fmt == "NHWC" and model.in_chans == 3
    assert {param.device.type for param in model.parameters()} == {"meta"}
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    model.reset_classifier(5)
    assert model.head.fc.weight.device.type == "meta" and model.head.fc.weight.dtype == torch.bfloat16

    model = timm.create_model("sepvit_lite").eval()
    x = torch.randn(1, 3, 64, 96)
    assert model.prune_intermediate_layers([1]) == [1]
    assert model.num_features == model.head_hidden_size == 64
    with torch.no_grad():
        assert model(x).shape == (1, 8, 12, 64)  # the features of stage 2, no pooling or head left
        model.reset_classifier(3, "avg")
        assert model(x).shape == (1, 3)


@pytest.mark.slow
def test_torchscript_and_fx_features_match_eager():
    def build(**kwargs) -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model("sepvit_lite", **kwargs).eval()

    x = torch.randn(1, 3, 97, 131)  # windows overhang the maps: padding, masks, resized tokens
    model = build()
    with timm.layers.set_layer_config(scriptable=True):
        scripted = torch.jit.script(build())
    getter, fx = build(features_only=True), build(features_only=True, feature_cls="fx")
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        fx_maps, getter_maps = fx(x), getter(x)
        assert [m.shape[1] for m in fx_maps] == [32, 64, 128, 256]
        for fx_map, getter_map in zip(fx_maps, getter_maps, strict=True):
            torch.testing.assert_close(fx_map, getter_map)


def test_local_only_stage_one_sees_nothing_beyond_neighbouring_windows():
    """Changing the pixels of the far corner window changes the stage-1 output of the first window of
    SepViT (PSA mixes all windows) and leaves it alone in the local-only model (the patch convolution
    and the position encoding reach one window further at most)."""

    def first_window_change(**kwargs) -> float:
        torch.manual_seed(0)
        model = timm.create_model("sepvit_lite", img_size=128, window_size=4, **kwargs).eval()
        for parameter in model.parameters():  # zero-initialised window tokens would hide nothing
            torch.nn.init.normal_(parameter, std=0.1)
        x = torch.randn(1, 3, 128, 128)
        changed = x.clone()
        changed[..., 112:, 112:] = torch.randn(1, 3, 16, 16)  # the window at grid (7, 7)
        with torch.no_grad():
            (before,), (after,) = (
                model.forward_intermediates(image, indices=[0], intermediates_only=True)
                for image in (x, changed)
            )
        assert before.shape[-2:] == (32, 32)  # an 8×8 grid of 4×4 windows, as at 224 with 7×7 ones
        return (after[..., :4, :4] - before[..., :4, :4]).abs().max().item()

    assert first_window_change(window_attention="local", block_plan="D,D,D,D") == 0.0
    assert first_window_change() > 1e-3
    local = timm.create_model("sepvit_lite", window_attention="local", block_plan="D,D,D,D")
    assert not [name for name, _ in local.named_parameters() if "window_tokens" in name or ".psa." in name]
    with torch.no_grad():  # TorchScript and torch.fx take the local-only model as they take SepViT
        x = torch.randn(1, 3, 97, 131)
        with timm.layers.set_layer_config(scriptable=True):
            scripted = torch.jit.script(
                timm.create_model("sepvit_lite", window_attention="local", block_plan="D,D,D,D").eval()
            )
        scripted.load_state_dict(local.state_dict())
        torch.testing.assert_close(scripted(x), local.eval()(x))


def test_swin_baseline_shifts_every_second_block_of_a_stage():
    """``window_attention="shifted"``: blocks 0, 2, ... attend inside windows, blocks 1, 3, ... inside
    windows shifted by half a window (which changes the outputs from the local-only model's with the
    same weights), the far corner stays out of reach in stage 1; TorchScript gives the eager outputs."""
    torch.manual_seed(0)
    kwargs = dict(img_size=128, window_size=4, block_plan="D,D,D,D", depths=(2, 2, 2, 2))
    model = timm.create_model("sepvit_lite", window_attention="shifted", **kwargs).eval()
    shifts = [[block.attn.shift_size for block in stage.blocks] for stage in model.stages[:3]]
    assert shifts == [[0, 2], [0, 2], [0, 2]]
    x = torch.randn(1, 3, 128, 128)

    def first_window_change(top: int, left: int) -> float:
        changed = x.clone()
        changed[..., top : top + 16, left : left + 16] = torch.randn(1, 3, 16, 16)
        with torch.no_grad():
            (before,), (after,) = (
                model.forward_intermediates(image, indices=[0], intermediates_only=True)
                for image in (x, changed)
            )
        return (after[..., :4, :4] - before[..., :4, :4]).abs().max().item()

    assert first_window_change(112, 112) == 0.0
    local = timm.create_model("sepvit_lite", window_attention="local", **kwargs).eval()
    local.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(local(x), model(x), atol=1e-4)
    with torch.no_grad(), timm.layers.set_layer_config(scriptable=True):
        scripted = torch.jit.script(
            timm.create_model("sepvit_lite", window_attention="shifted", **kwargs).eval()
        )
    scripted.load_state_dict(model.state_dict())
    image = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), model(image))
