"""Layer forms: plain as built, oneDNN for CPU inference (guarded), ONNX-friendly for export."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Mlp as TimmMlp
from torch import nn

import sepvit  # noqa: F401
from sepvit.layers import Linear, Mlp, prepare_for
from sepvit.layers import fused_linear as forms
from sepvit.utils import count_macs

TOL = dict(atol=1e-5, rtol=1e-5)


def mlp_and_timm_twin() -> tuple[Mlp, TimmMlp]:
    torch.manual_seed(0)
    ours = Mlp(24, 96).eval()
    theirs = TimmMlp(24, 96).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.fixture
def onednn_calls(monkeypatch) -> list[str]:
    """Records each call of the oneDNN operator (its activation)."""
    calls = []
    real = forms.onednn_linear

    def recording(x, layer, activation="none"):
        calls.append(activation)
        return real(x, layer, activation)

    monkeypatch.setattr(forms, "onednn_linear", recording)
    return calls


def test_mlp_has_timm_parameter_names_and_outputs():
    ours, theirs = mlp_and_timm_twin()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 5, 7, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.skipif(torch.float32 not in forms.onednn_linear_dtypes(), reason="no oneDNN linear")
def test_cpu_inference_form_matches_plain_and_runs_onednn(onednn_calls):
    ours, theirs = mlp_and_timm_twin()
    prepare_for(ours, "cpu_inference")
    assert type(ours) is forms.OneDnnMlp and type(ours.fc1) is forms.OneDnnLinear
    x = torch.randn(2, 5, 7, 24)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        torch.testing.assert_close(ours(x.transpose(1, 2)), theirs(x.transpose(1, 2)), **TOL)
    for bias in (True, False):
        linear, plain = Linear(16, 48, bias=bias), nn.Linear(16, 48, bias=bias)
        plain.load_state_dict(linear.state_dict())
        prepare_for(linear, "cpu_inference")
        x = torch.randn(3, 10, 16)
        with torch.no_grad():
            torch.testing.assert_close(linear(x), plain(x), **TOL)
    assert onednn_calls == ["gelu", "none"] * 2 + ["none"] * 2


@pytest.mark.skipif(torch.float32 not in forms.onednn_linear_dtypes(), reason="no oneDNN linear")
def test_onednn_guards_fall_back_to_the_plain_computation(onednn_calls):
    """Autograd, autocast and dtypes other than the weight's (or not probed) take the plain path."""
    ours, theirs = mlp_and_timm_twin()
    prepare_for(ours, "cpu_inference")
    x = torch.randn(4, 24, requires_grad=True)
    ours(x).square().sum().backward()  # grad mode: autograd needs the plain path
    expected = torch.autograd.grad(theirs(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, **TOL)
    assert ours.fc1.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ours(x), theirs(x), atol=0.05, rtol=0.05)
    with torch.no_grad():
        for dtype in (torch.float16, torch.float64):
            ours.to(dtype), theirs.to(dtype)
            torch.testing.assert_close(ours(x.to(dtype)), theirs(x.to(dtype)), **TOL)
    assert onednn_calls == []


@pytest.mark.skipif(torch.float32 not in forms.onednn_linear_dtypes(), reason="no oneDNN linear")
def test_cpu_inference_form_compiles_to_the_plain_computation(onednn_calls):
    """``torch.compile`` traces the plain linear: Inductor cannot lower oneDNN's on unfrozen weights."""
    ours, theirs = mlp_and_timm_twin()
    prepare_for(ours, "cpu_inference")
    x = torch.randn(2, 5, 7, 24)
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(ours, fullgraph=True)(x), theirs(x), **TOL)
        assert onednn_calls == []
        ours(x)
    assert onednn_calls == ["gelu", "none"]  # eager, the same layers still run oneDNN


def test_without_a_working_onednn_operator_the_plain_layers_stay(monkeypatch):
    monkeypatch.setattr(forms, "onednn_linear_dtypes", lambda: frozenset())
    monkeypatch.setattr("sepvit.layers.forms.onednn_linear_dtypes", lambda: frozenset())
    ours, theirs = mlp_and_timm_twin()
    prepare_for(ours, "cpu_inference")
    assert type(ours) is Mlp and type(ours.fc1) is Linear
    with torch.inference_mode():
        torch.testing.assert_close(ours(torch.ones(3, 24)), theirs(torch.ones(3, 24)), **TOL)


def test_forms_keep_parameters_and_switch_back():
    model = timm.create_model("sepvit_lite", num_classes=10).eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        for form in ("export", "cpu_inference", "plain"):
            prepare_for(model, form)
            assert model.state_dict().keys() == state.keys()
            torch.testing.assert_close(model(x), plain, atol=1e-5, rtol=1e-5)
    assert all(type(m) in (Linear, nn.Linear) for m in model.modules() if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="form must be one of"):
        prepare_for(model, "fast")


def test_mac_counts_and_exports_see_plain_layers():
    ours, theirs = mlp_and_timm_twin()
    assert count_macs(ours, (10, 24)) == count_macs(theirs, (10, 24)) == 10 * (24 * 96 * 2)
    program = torch.export.export(prepare_for(ours, "export"), (torch.randn(2, 24),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in target for target in targets)
    assert "aten.erf.default" in targets  # the GELU in the operand order ONNX Runtime fuses
