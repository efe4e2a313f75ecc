"""timm's model contract (its tests/test_models.py), for every model this package registers.

The checks mirror timm's: forward, backward, default-cfg consistency, classifier and pooling
removal, pruning, forward_intermediates, features_only (getter and fx), TorchScript, torch.fx (also
scripted after tracing),
the meta device and gradient checkpointing. Inputs are small so that the file stays fast on two
CPU cores; where timm checks at the default input size (pool size of the cfg) so do we.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import sepvit

MODELS = sepvit.list_models()
# Checks that compile, trace or repeat a whole training step (TorchScript, torch.fx, gradient
# checkpointing, dtypes) run on the smallest model of each family: a family's sizes are built from
# the same module types with other widths and depths, so the smallest covers the same code, at a
# fraction of the time (SepViT-B alone would take longer than the rest of the file).
ONE_PER_FAMILY = ["sepvit_lite", "sv_efficientvit_m0", "sv_mobilevitv2_050"]
SMALL = 64  # input side for forward/backward checks that do not depend on the cfg's input size
FEATURES = 96  # timm's TARGET_FFEAT_SIZE
JIT = 128  # timm's TARGET_JIT_SIZE


@pytest.fixture(scope="module", params=MODELS)
def name(request) -> str:
    """Every model; module-scoped so that pytest runs a model's checks one after the other."""
    return request.param


@functools.lru_cache(maxsize=4)
def _pristine(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def create(name: str, **kwargs) -> torch.nn.Module:
    """A fresh copy of the model (building is the slow part: a model's checks share one build)."""
    return copy.deepcopy(_pristine(name, **kwargs))


def images(size: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def fx_model(model: torch.nn.Module, **tracer_options) -> torch.fx.GraphModule:
    """timm's _create_fx_model: the model as a torch.fx graph that returns its last node."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), **tracer_options
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


def output_axes(model: torch.nn.Module) -> tuple[int, tuple[int, int]]:
    """Channel and spatial axes of the model's unpooled features; every model states its format
    (timm assumes NCHW where a model does not)."""
    assert model.output_fmt in ("NCHW", "NHWC")
    return get_channel_dim(model.output_fmt), tuple(get_spatial_dim(model.output_fmt))


def test_every_family_is_listed():
    assert len(MODELS) == 17
    assert set(ONE_PER_FAMILY) <= set(MODELS)


def test_forward(name):
    model = create(name).eval()
    with torch.no_grad():
        out = model(images(SMALL))
    assert out.shape == (1, 1000)
    assert not out.isnan().any()


def test_backward_reaches_every_parameter(name):
    model = create(name, num_classes=42).train()
    out = model(images(SMALL, batch=2))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert out.shape == (2, 42)
    assert not out.isnan().any()


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(name):
    model = create(name, num_classes=7).train()
    x = images(SMALL, batch=2)
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    out = model(x)
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    checkpointed.square().mean().backward()
    assert torch.allclose(checkpointed, out, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], rtol=1e-3, atol=1e-5), n


def test_default_cfg(name):
    """timm's test_model_default_cfgs: at the cfg's input size, unpooled maps have the cfg's pool
    size in the model's output format; heads removed by reset_classifier or at build give the
    pooled (B, num_features) or the unpooled map; the cfg's layer names resolve."""
    model = create(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    assert model.num_classes == cfg["num_classes"] == 1000
    assert model.num_features > 0 and model.head_hidden_size > 0
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0] == 3
    assert cfg["interpolation"] in ("bilinear", "bicubic") and 0 < cfg["crop_pct"] <= 1
    state_dict = model.state_dict()
    assert cfg["classifier"] + ".weight" in state_dict
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    assert cfg["first_conv"] + ".weight" in state_dict
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3

    feat_axis, spatial_axes = output_axes(model)
    x, small = torch.randn(1, *cfg["input_size"]), images(SMALL)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert tuple(features.shape[a] for a in spatial_axes) == cfg["pool_size"]
        assert features.shape[feat_axis] == model.num_features
        assert pre_logits.shape == (1, model.head_hidden_size)

        # forward() is forward_head(forward_features()) (test_forward runs it whole): the heads are
        # checked on the features at the cfg's size, the models built headless on small inputs.
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert torch.equal(model.forward_head(features), pre_logits)
        model.reset_classifier(0, "")
        assert torch.equal(model.forward_head(features), features)

        small_features = model.forward_features(small)
        unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert unpooled(small).shape == small_features.shape
        headless = timm.create_model(name, num_classes=0).eval()
        assert headless(small).shape == (1, headless.num_features)


def test_forward_intermediates(name):
    model = create(name).eval()
    info = FeatureInfo(model.feature_info, range(len(model.feature_info)))
    assert len(info.channels()) >= 3
    x = images(FEATURES)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        features = model.forward_features(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(intermediates) == len(info.channels())
    for channels, reduction, out in zip(info.channels(), info.reduction(), intermediates):
        assert out.shape[1] == channels  # intermediates are NCHW whatever the model's output_fmt
        assert out.shape[2] <= math.ceil(FEATURES / reduction) + 1
        assert out.shape[3] <= math.ceil(FEATURES / reduction) + 1
    assert torch.allclose(final, features)
    assert len(last_two) == 2
    assert all(torch.equal(a, b) for a, b in zip(last_two, intermediates[-2:]))


def test_prune_intermediate_layers(name):
    """After pruning to the second stage, the model ends there: features, num_features and the
    (removed) head fit that stage."""
    reference = create(name).eval()
    model = create(name).eval()
    kept = model.prune_intermediate_layers(indices=[1], prune_head=False)
    assert kept == [1]
    channels = model.feature_info[1]["num_chs"]
    assert model.num_features == channels
    feat_axis, _ = output_axes(model)
    x = images(FEATURES)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        features = model.forward_features(x)
        assert features.shape[feat_axis] == channels
        assert model.forward_intermediates(x, indices=[1], intermediates_only=True)[0].shape == expected.shape
        out = model(x)
    assert out.shape[0] == 1 and not out.isnan().any()
    model.reset_classifier(5, "avg")
    with torch.no_grad():
        assert model(x).shape == (1, 5)


def test_features_only(name):
    model = create(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    with torch.no_grad():
        outputs = model(images(FEATURES))
    assert [o.shape[1] for o in outputs] == channels
    for reduction, out in zip(reductions, outputs):
        assert out.shape[2] <= math.ceil(FEATURES / reduction) + 1


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_features_only_fx(name):
    """feature_cls="fx": the feature maps are taken from a torch.fx graph of the model."""
    getter = create(name, features_only=True).eval()
    torch.manual_seed(0)  # the same weights as the getter's (see _pristine)
    model = timm.create_model(name, features_only=True, feature_cls="fx").eval()
    x = images(FEATURES)
    with torch.no_grad():
        for expected, got in zip(getter(x), model(x), strict=True):
            assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_fx_trace_forward_and_backward(name):
    """timm's test_model_forward_fx / backward_fx: the traced graph computes what the model does."""
    model = create(name, num_classes=42).eval()
    traced = fx_model(model)
    x = images(SMALL, batch=2)
    with torch.no_grad():
        assert torch.equal(next(iter(traced(x).values())), model(x))
    traced.train()
    out = next(iter(traced(x).values()))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert all(p.grad is not None for p in traced.parameters())


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_torchscript(name):
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    scripted = torch.jit.script(model)
    x = images(SMALL)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


def test_fx_trace_then_torchscript(name):
    """timm's test_model_forward_fx_torchscript: the torch.fx graph of the model, scripted, runs."""
    with timm.set_scriptable(True):
        model = create(name).eval()
    scripted = torch.jit.script(fx_model(model, param_shapes_constant=True))
    with torch.no_grad():
        out = next(iter(scripted(images(JIT)).values()))
    assert out.shape == (1, model.num_classes)
    assert not out.isnan().any()


def test_builds_on_the_meta_device(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert all(p.is_meta for p in model.parameters())
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert shapes == {n: p.shape for n, p in _pristine(name).named_parameters()}


# Relative error (norm of the difference over the norm of the fp32 result) allowed per dtype, for
# outputs and for gradients; measured: bf16 <= 0.04 (outputs) and 0.09 (gradients), fp16 5x less.
PRECISIONS = {
    "bf16 autocast": (torch.bfloat16, True, 0.08, 0.2),
    "bf16": (torch.bfloat16, False, 0.08, 0.2),
    "fp16": (torch.float16, False, 0.015, 0.05),
}


def _nontrivial_norms_(model: torch.nn.Module) -> torch.nn.Module:
    """Norm affines off their init (EfficientViT's residual branches start at zero otherwise)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(
                module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
            ):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.uniform_(-0.2, 0.2, generator=gen)
    return model


def _run(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, autocast: bool) -> torch.Tensor:
    if dtype is None:
        return model(x)
    if autocast:
        with torch.autocast("cpu", dtype=dtype):
            return model(x)
    return model.to(dtype)(x.to(dtype))


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).norm() / expected.norm())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_low_precision_inference_and_training(name, precision):
    """CPU inference and training in bf16 (autocast and cast) and fp16 match fp32 within the dtype's
    tolerance. Gradients are compared with frozen norm statistics (eval mode): with batch
    statistics, a small batch magnifies rounding through the chain of norms, for timm's own models
    too, so that step is checked to run and give finite gradients for every parameter."""
    dtype, autocast, output_tol, grad_tol = PRECISIONS[precision]
    base = _nontrivial_norms_(create(name, num_classes=10))
    x, target = images(SMALL, batch=2), torch.tensor([3, 7])

    expected = {}
    for dt in (None, dtype):
        model = copy.deepcopy(base).eval()
        with torch.no_grad():
            inference = _run(model, x, dt, autocast)
        loss = torch.nn.functional.cross_entropy(_run(model, x, dt, autocast).float(), target)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        if dt is None:
            expected = dict(inference=inference, loss=loss, grads=grads)
    assert inference.dtype == dtype
    assert _relative_error(inference, expected["inference"]) <= output_tol
    assert abs(loss.item() - expected["loss"].item()) <= output_tol * expected["loss"].item()
    assert _relative_error(grads, expected["grads"]) <= grad_tol

    # Batch statistics over a 64x64 batch of two would be of 1x1 final maps (2 values a channel),
    # whose fp16 backward overflows in timm's EfficientViT as well: the training step takes 96x96.
    model = copy.deepcopy(base).train()
    x = images(FEATURES, batch=2)
    loss = torch.nn.functional.cross_entropy(_run(model, x, dtype, autocast).float(), target)
    loss.backward()
    assert loss.isfinite()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.isfinite().all(), n
