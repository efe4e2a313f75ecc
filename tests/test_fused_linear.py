"""Fused oneDNN linears: the same outputs, parameters and MAC counts as the plain layers."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from sepvit.layers import FusedLinear, FusedMlp
from sepvit.layers.fused_linear import use_fused_linear
from sepvit.utils import count_macs

TOL = dict(atol=1e-5, rtol=1e-5)


def twins() -> tuple[FusedMlp, Mlp]:
    torch.manual_seed(0)
    fused = FusedMlp(24, 96).eval()
    plain = Mlp(24, 96).eval()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_mlp_has_timm_parameter_names_and_equal_outputs():
    fused, plain = twins()
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 5, 7, 24)  # channels-last maps, as in the blocks
    with torch.inference_mode():
        assert use_fused_linear(x)
        torch.testing.assert_close(fused(x), plain(x), **TOL)
        torch.testing.assert_close(fused(x.transpose(1, 2)), plain(x.transpose(1, 2)), **TOL)


def test_linear_matches_with_and_without_bias():
    torch.manual_seed(0)
    for bias in (True, False):
        fused = FusedLinear(16, 48, bias=bias)
        plain = nn.Linear(16, 48, bias=bias)
        plain.load_state_dict(fused.state_dict())
        x = torch.randn(3, 10, 16)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), plain(x), **TOL)


def test_training_takes_the_autograd_path():
    fused, plain = twins()
    x = torch.randn(4, 24, requires_grad=True)
    assert not use_fused_linear(x)  # grad mode is on
    fused(x).square().sum().backward()
    expected = torch.autograd.grad(plain(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, **TOL)
    assert fused.fc1.weight.grad is not None


def test_mac_counts_and_exports_see_plain_layers():
    fused, plain = twins()
    assert count_macs(fused, (10, 24)) == count_macs(plain, (10, 24)) == 10 * (24 * 96 * 2)
    program = torch.export.export(fused, (torch.randn(2, 24),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in target for target in targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_in_inference_matches_autograd_path(dtype):
    import timm

    import sepvit  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("sepvit_lite", num_classes=10).eval().to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.inference_mode():
        fast = model(x)
    slow = model(x)  # grad mode: plain layers
    tolerance = TOL if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(fast, slow.detach(), **tolerance)
