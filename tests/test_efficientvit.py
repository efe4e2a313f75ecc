"""EfficientViT (MSRA): sizes, MACs, equality with timm's port, deploy mode, features, gradients."""

from __future__ import annotations

import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.efficientvit_msra import LocalWindowAttention

import sepvit
from sepvit.errors import ConfigError
from sepvit.layers import CascadedGroupAttention
from sepvit.models.efficientvit import checkpoint_filter_fn
from sepvit.utils import count_macs, count_params, reparameterize

VARIANTS = ("m0", "m1", "m2", "m3", "m4", "m5")
# Exact parameter counts; targets.md gives them rounded (M): 2.35 2.98 4.19 6.90 8.80 12.47.
PARAMS = dict(m0=2_349_436, m1=2_980_560, m2=4_187_554, m3=6_900_722, m4=8_804_228, m5=12_473_772)
PAPER_PARAMS_M = dict(m0=2.35, m1=2.98, m2=4.19, m3=6.90, m4=8.80, m5=12.47)
PAPER_MMACS = dict(m0=79, m1=167, m2=201, m3=263, m4=299, m5=522)
TOL = 1e-5


@pytest.fixture(scope="module")
def astronaut_224() -> torch.Tensor:
    """scikit-image's astronaut photo, 224x224, normalised as the model expects."""
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Give norms and attention biases non-trivial values (init leaves many at 0 / 1)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.uniform_(-0.2, 0.2, generator=gen)
                module.running_mean.uniform_(-0.2, 0.2, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
            if hasattr(module, "attention_biases"):
                module.attention_biases.normal_(generator=gen)
    return model


def ported_pair(variant: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's model with random weights, and ours loaded from its state dict."""
    torch.manual_seed(0)
    reference = randomize_(timm.create_model(f"efficientvit_{variant}", **kwargs))
    ours = timm.create_model(f"sv_efficientvit_{variant}", **kwargs)
    ours.load_state_dict(checkpoint_filter_fn(reference.state_dict(), ours))
    return reference, ours


def test_registered_beside_timm():
    names = sepvit.list_models("sv_efficientvit_*")
    assert names == [f"sv_efficientvit_{v}" for v in VARIANTS]
    assert "efficientvit_m0" in timm.list_models("efficientvit_m*")  # timm's own stay available


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_count(variant):
    with torch.device("meta"):
        model = timm.create_model(f"sv_efficientvit_{variant}")
    assert count_params(model) == PARAMS[variant]
    assert round(PARAMS[variant] / 1e6, 2) == PAPER_PARAMS_M[variant]


@pytest.mark.parametrize("variant", ["m0"])
def test_macs_match_paper_table(variant):
    model = timm.create_model(f"sv_efficientvit_{variant}")
    assert round(count_macs(model, (3, 224, 224)) / 1e6) == PAPER_MMACS[variant]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["m1", "m2", "m3", "m4", "m5"])
def test_macs_match_paper_table_other_variants(variant):
    test_macs_match_paper_table(variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_equal_to_timm_eval(variant):
    reference, ours = ported_pair(variant)
    reference.eval(), ours.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (reference(x) - ours(x)).abs().max() <= TOL


@pytest.mark.parametrize("variant", ["m0", pytest.param("m5", marks=pytest.mark.slow)])
def test_equal_to_timm_train_mode(variant):
    """Train mode (batch statistics), in float64: the chain of ~50 BatchNorms over a small batch
    magnifies fp32 rounding of differently ordered sums to ~1e-4; float64 shows the maths is equal."""
    reference, ours = ported_pair(variant)
    reference.train().double(), ours.train().double()
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        assert (reference(x) - ours(x)).abs().max() <= 1e-9


def test_equal_to_timm_on_real_image(astronaut_224):
    reference, ours = ported_pair("m0")
    reference.eval(), ours.eval()
    with torch.no_grad():
        expected, got = reference(astronaut_224), ours(astronaut_224)
    assert (expected - got).abs().max() <= TOL
    assert expected.argmax() == got.argmax()


def test_odd_input_size_equal_to_timm():
    reference, ours = ported_pair("m0")
    reference.eval(), ours.eval()
    x = torch.randn(1, 3, 200, 300)
    with torch.no_grad():
        assert (reference(x) - ours(x)).abs().max() <= TOL
        assert ours.forward_features(x).shape == (1, 192, 4, 5)


@pytest.mark.slow
def test_bias_resampling_for_another_input_size():
    """Weights for 224 loaded into a model built for 320 (the last stage's window grows 4 -> 5)."""
    reference224, _ = ported_pair("m0")
    reference = timm.create_model("efficientvit_m0", img_size=320)
    reference.load_state_dict(
        timm.models.efficientvit_msra.checkpoint_filter_fn(reference224.state_dict(), reference)
    )
    ours = timm.create_model("sv_efficientvit_m0", img_size=320)
    ours.load_state_dict(checkpoint_filter_fn(reference224.state_dict(), ours))
    assert ours.stages[2].blocks[0].mixer.attention_biases.shape == (4, 25)
    reference.eval(), ours.eval()
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        assert (reference(x) - ours(x)).abs().max() <= TOL

    _, resized = ported_pair("m0")
    resized.set_input_size(320)
    resized.eval()
    with torch.no_grad():
        assert (resized(x) - ours(x)).abs().max() <= TOL


def test_own_state_dict_passes_unchanged():
    _, ours = ported_pair("m0")
    state = ours.state_dict()
    filtered = checkpoint_filter_fn(state, ours)
    assert filtered.keys() == state.keys()
    assert all(filtered[k] is state[k] for k in state)


@pytest.mark.parametrize("variant", ["m0", pytest.param("m5", marks=pytest.mark.slow)])
def test_fused_equals_unfused(variant):
    _, ours = ported_pair(variant)
    ours.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ours(x)
        fused = reparameterize(ours)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        assert count_params(fused) < count_params(ours)
        assert (fused(x) - expected).abs().max() <= TOL
        assert ours.fuse() is ours
        assert (ours(x) - expected).abs().max() <= TOL
        assert (ours.fuse()(x) - expected).abs().max() <= TOL  # fusing twice changes nothing


def test_reparameterize_also_folds_timm_model():
    reference, _ = ported_pair("m0")
    reference.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (reparameterize(reference)(x) - reference(x)).abs().max() <= TOL


def test_features_only_shapes_and_strides():
    model = timm.create_model("sv_efficientvit_m1", features_only=True)
    assert model.feature_info.reduction() == [16, 32, 64]
    assert model.feature_info.channels() == [128, 144, 192]
    features = model(torch.randn(1, 3, 224, 320))
    assert [tuple(f.shape) for f in features] == [(1, 128, 14, 20), (1, 144, 7, 10), (1, 192, 4, 5)]
    last = timm.create_model("sv_efficientvit_m1", features_only=True, out_indices=(1,))
    assert [f.shape[1] for f in last(torch.randn(1, 3, 128, 128))] == [144]


def test_forward_api():
    model = timm.create_model("sv_efficientvit_m0", num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 192, 4, 4)
        assert model.forward_head(features, pre_logits=True).shape == (2, 192)
        logits = model(x)
        final, intermediates = model.forward_intermediates(x)
        assert [t.shape[1] for t in intermediates] == [64, 128, 192]
        assert torch.equal(final, features)
        model.set_grad_checkpointing(True)
        assert torch.allclose(model(x), logits, atol=TOL)
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)
    assert model.get_classifier() is model.head
    assert all("attention_biases" in k for k in model.no_weight_decay())
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_backward_reaches_every_parameter():
    # Residual branches start at zero (their last BN weight is 0), which would hide their gradients.
    model = randomize_(timm.create_model("sv_efficientvit_m0", num_classes=5)).train()
    model.set_grad_checkpointing(True)
    F.cross_entropy(model(torch.randn(2, 3, 112, 112)), torch.tensor([1, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_cascaded_group_attention_matches_timm_window_attention():
    torch.manual_seed(0)
    reference = randomize_(LocalWindowAttention(64, 16, 4, 1.0, resolution=14, window_resolution=7)).eval()
    layer = CascadedGroupAttention(64, 16, 4, 1.0, resolution=7).eval()
    state = {k.removeprefix("attn."): v for k, v in reference.state_dict().items()}
    layer.load_state_dict(state)
    with torch.no_grad():
        for x in (torch.randn(2, 64, 13, 17), torch.randn(2, 64, 14, 21)):  # six windows, padded or not
            assert (reference(x) - layer(x)).abs().max() <= TOL
            channels_last = x.contiguous(memory_format=torch.channels_last)
            assert (reference(x) - layer(channels_last)).abs().max() <= TOL


def test_attention_biases_learn_in_eval_mode_and_are_cached_for_inference():
    """Fine-tuning with frozen norms (eval mode) trains the biases; inference reuses one gather."""
    layer = randomize_(CascadedGroupAttention(64, 16, 4, 1.0, resolution=7)).eval()
    x = torch.randn(2, 64, 14, 14)
    layer(x).sum().backward()
    assert layer.attention_biases.grad is not None and layer.attention_biases.grad.abs().sum() > 0
    with torch.no_grad():
        expected = layer(x)
        cached = layer.attention_bias()
        assert layer.attention_bias() is cached
        layer.attention_biases.add_(1.0)
        assert torch.equal(layer(x), expected)  # constant in inference: the cache stands
    layer.train().eval()  # a mode change drops the cache
    with torch.no_grad():
        assert not torch.equal(layer(x), expected)


def test_loading_weights_in_eval_mode_drops_the_bias_cache():
    """A model that ran inference and then loads other weights computes with the new biases."""
    model = randomize_(timm.create_model("sv_efficientvit_m0")).eval()
    state = model.state_dict()
    for key in [k for k in state if "attention_biases" in k]:
        state[key] = state[key] + torch.linspace(0, 1, state[key].numel()).reshape(state[key].shape)
    reference = timm.create_model("sv_efficientvit_m0").eval()
    reference.load_state_dict(state)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = model(x)  # fills the caches with the first biases
        model.load_state_dict(state)
        after = model(x)
        assert not torch.allclose(after, before, atol=1e-4)
        torch.testing.assert_close(after, reference(x))


def test_classifier_needs_pooling():
    with pytest.raises(ConfigError, match="global_pool"):
        timm.create_model("sv_efficientvit_m0", global_pool="")
    model = timm.create_model("sv_efficientvit_m0", num_classes=0, global_pool="")
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 192, 4, 4)
    with pytest.raises(ConfigError, match="global_pool"):
        model.reset_classifier(10)
    model.reset_classifier(10, "avg")
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 10)
