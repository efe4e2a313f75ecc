"""Every SepViT model infers and trains on the CPU in bf16 and fp16 (autocast and cast), in the plain and
the CPU-inference forms, and matches fp32 within the dtype's tolerance."""

from __future__ import annotations

import contextlib
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import sepvit
from sepvit.layers import prepare_for

# mode: (dtype, autocast, tolerance relative to the fp32 output's scale, least gradient cosine)
MODES = {
    "bf16-autocast": (torch.bfloat16, True, 0.1, 0.99),
    "bf16-cast": (torch.bfloat16, False, 0.1, 0.99),
    "fp16-autocast": (torch.float16, True, 0.02, 0.999),
    "fp16-cast": (torch.float16, False, 0.02, 0.999),
}
MODELS = [pytest.param(name, marks=[] if name == "sepvit_lite" else [pytest.mark.slow]) for name in
          sepvit.list_models("sepvit_*")]  # fmt: skip
TARGETS = torch.tensor([1, 7])


@pytest.fixture(scope="module")
def fp32_runs() -> dict:
    return {}


def fp32_reference(name: str, cache: dict) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """The fp32 model (random weights, random window tokens), its eval logits and one training step."""
    if name not in cache:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("window_tokens"):
                    param.normal_()
        x = torch.randn(2, 3, 32, 32)
        cache[name] = (
            model,
            x,
            train_step(model, x, contextlib.nullcontext()),
            infer(model, x, contextlib.nullcontext()),
        )
    return cache[name]


def train_step(model: torch.nn.Module, x: torch.Tensor, context) -> dict:
    model.train().zero_grad()
    with context:
        loss = F.cross_entropy(model(x).float(), TARGETS)
    loss.backward()
    grads = torch.cat([param.grad.double().flatten() for param in model.parameters()])
    return {"loss": loss.item(), "grads": grads}


def infer(
    model: torch.nn.Module, x: torch.Tensor, context: contextlib.AbstractContextManager
) -> torch.Tensor:
    with torch.inference_mode(), context:
        return model.eval()(x).float()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", MODELS)
def test_low_precision_inference_and_training_match_fp32(name, mode, fp32_runs):
    dtype, autocast, tolerance, least_cosine = MODES[mode]
    reference, x, reference_step, reference_logits = fp32_reference(name, fp32_runs)
    model = copy.deepcopy(reference)
    context = torch.autocast("cpu", dtype=dtype) if autocast else contextlib.nullcontext()
    if not autocast:
        model, x = model.to(dtype), x.to(dtype)
    scale = reference_logits.abs().max().item()

    for form in ("plain", "cpu_inference"):
        logits = infer(prepare_for(model, form), x, context)
        error = (logits - reference_logits).abs().max().item()
        assert error <= tolerance * scale, f"{form}: {error:.4f} > {tolerance} × {scale:.3f}"

    step = train_step(prepare_for(model, "plain"), x, context)
    assert step["loss"] == pytest.approx(reference_step["loss"], rel=tolerance)
    cosine = F.cosine_similarity(step["grads"], reference_step["grads"], dim=0).item()
    assert cosine >= least_cosine
    assert all(param.grad.dtype == param.dtype for param in model.parameters())
