"""Pretrained weights without network: a local Hugging Face cache, local files, missing weights.

The cache is laid out as huggingface_hub writes it (blobs, a snapshot per revision linking to
them, refs/main naming the revision) and holds timm-format state dicts saved from timm's own
models (random weights) under the real hub ids.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

import sepvit
from sepvit.cli.models import print_table
from sepvit.errors import CheckpointError, WeightsNotFoundError

REVISION = "0123456789abcdef0123456789abcdef01234567"


def randomized_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state dict with every float tensor moved off its init (norm variances > 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            noise = torch.rand(value.shape, generator=gen)
            value = 0.5 + noise if key.endswith("running_var") else value + 0.2 * (noise - 0.5)
        out[key] = value.contiguous()
    return out


def add_to_hub_cache(cache: Path, hub_id: str, state_dict: dict[str, torch.Tensor]) -> Path:
    """Store ``state_dict`` as ``model.safetensors`` of ``hub_id`` the way huggingface_hub does."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    blob = repo / "blobs" / "incoming"
    blob.parent.mkdir(parents=True)
    save_file(state_dict, str(blob))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    blob = blob.rename(blob.with_name(digest))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot / "model.safetensors"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache in offline mode (as HF_HUB_CACHE and HF_HUB_OFFLINE=1 set at start-up)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def assert_same_outputs(ours: torch.nn.Module, reference: torch.nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.eval()(x)
        assert (ours.eval()(x) - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_every_published_size_has_timms_weights_and_preprocessing():
    names = timm.list_pretrained("sv_*")
    assert len(names) == 6 + 7 + 6
    timm_names = {n.removeprefix("sv_") for n in names}
    assert timm_names == set(timm.list_pretrained("efficientvit_m*") + timm.list_pretrained("mobilevitv2_*"))
    for name in names:
        ours, theirs = timm.models.get_pretrained_cfg(name), timm.models.get_pretrained_cfg(name[3:])
        assert ours.hf_hub_id == f"timm/{name[3:]}"
        for field in ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes"):
            assert getattr(ours, field) == getattr(theirs, field), (name, field)
    assert sepvit.models.published_top1("sv_efficientvit_m5.r224_in1k") == 77.1
    assert sepvit.models.published_top1("sv_mobilevitv2_100") == 78.09  # the default tag's
    assert sepvit.models.published_top1("sepvit_tiny") is None


@pytest.mark.parametrize(
    ("name", "timm_name", "size"),
    [
        ("sv_efficientvit_m0", "efficientvit_m0.r224_in1k", 224),
        ("sv_mobilevitv2_050.cvnets_in1k", "mobilevitv2_050.cvnets_in1k", 128),
    ],
)
def test_pretrained_loads_from_the_offline_hub_cache(offline_hub, name, timm_name, size):
    state_dict = randomized_state_dict(timm.create_model(timm_name))
    add_to_hub_cache(offline_hub, f"timm/{timm_name}", state_dict)
    ours = timm.create_model(name, pretrained=True)
    reference = timm.create_model(timm_name, pretrained=True)  # timm's own model from the same file
    assert torch.equal(reference.state_dict()[next(iter(state_dict))], next(iter(state_dict.values())))
    assert_same_outputs(ours, reference, size)


def test_pretrained_with_another_head_and_features_only(offline_hub):
    state_dict = randomized_state_dict(timm.create_model("efficientvit_m0"))
    add_to_hub_cache(offline_hub, "timm/efficientvit_m0.r224_in1k", state_dict)
    model = timm.create_model("sv_efficientvit_m0", pretrained=True, num_classes=5)
    assert model.get_classifier().out_features == 5
    assert torch.equal(model.patch_embed[0].conv.weight, state_dict["patch_embed.conv1.conv.weight"])
    # timm's test_model_load_pretrained: one input channel (the stem's kernels summed), no head
    gray = timm.create_model("sv_efficientvit_m0", pretrained=True, in_chans=1, num_classes=0)
    summed = state_dict["patch_embed.conv1.conv.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(gray.patch_embed[0].conv.weight, summed)
    assert gray.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 192)
    backbone = timm.create_model("sv_efficientvit_m0", pretrained=True, features_only=True).eval()
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == [64, 128, 192]


def test_local_files_timm_state_dict_and_own_safetensors(tmp_path):
    timm_file = tmp_path / "efficientvit_m0.pth"
    torch.save(randomized_state_dict(timm.create_model("efficientvit_m0")), timm_file)
    ours = timm.create_model(
        "sv_efficientvit_m0", pretrained=True, pretrained_cfg_overlay=dict(file=str(timm_file))
    )
    reference = timm.create_model(
        "efficientvit_m0", pretrained=True, pretrained_cfg_overlay=dict(file=str(timm_file))
    )
    assert_same_outputs(ours, reference, 224)

    trained = timm.create_model("sv_mobilevitv2_050")
    trained.load_state_dict(randomized_state_dict(trained))
    own_file = tmp_path / "best.safetensors"
    save_file(trained.state_dict(), str(own_file))
    loaded = timm.create_model(
        "sv_mobilevitv2_050", pretrained=True, pretrained_cfg_overlay=dict(file=str(own_file))
    )
    assert_same_outputs(loaded, trained, 64)


def test_local_file_sepvit(tmp_path):
    """SepViT has no published weights; its own checkpoints load the standard way."""
    trained = timm.create_model("sepvit_lite")
    trained.load_state_dict(randomized_state_dict(trained))
    path = tmp_path / "sepvit_lite.safetensors"
    save_file(trained.state_dict(), str(path))
    loaded = timm.create_model("sepvit_lite", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert_same_outputs(loaded, trained, 64)


def test_missing_hub_weights_say_how_to_supply_them(offline_hub):
    with pytest.raises(WeightsNotFoundError) as error:
        timm.create_model("sv_mobilevitv2_100.cvnets_in1k", pretrained=True)
    message = str(error.value)
    assert "\n" not in message
    assert "timm/mobilevitv2_100.cvnets_in1k" in message and str(offline_hub) in message
    assert "pretrained_cfg_overlay=dict(file=PATH)" in message
    assert isinstance(error.value, FileNotFoundError)  # also what callers of timm catch


def test_sepvit_without_weights_says_how_to_supply_them(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"sepvit_lite\S* has no published weights.*file=PATH"):
        timm.create_model("sepvit_lite", pretrained=True)
    missing = tmp_path / "official.pth"
    with pytest.raises(WeightsNotFoundError, match=r"official\.pth"):
        timm.create_model("sepvit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


def test_missing_or_corrupt_local_file(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(WeightsNotFoundError, match=f"{missing}.*not found"):
        timm.create_model(
            "sv_efficientvit_m1", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing))
        )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"corrupt\.safetensors.*cannot be read"):
        timm.create_model(
            "sv_efficientvit_m1", pretrained=True, pretrained_cfg_overlay=dict(file=str(corrupt))
        )


def test_environment_variables_at_start_up(tmp_path):
    """A user's setup: HF_HUB_CACHE and HF_HUB_OFFLINE=1 set before Python starts."""
    add_to_hub_cache(
        tmp_path,
        "timm/efficientvit_m0.r224_in1k",
        randomized_state_dict(timm.create_model("efficientvit_m0")),
    )
    script = (
        "import timm, torch, sepvit\n"
        "ours = timm.create_model('sv_efficientvit_m0', pretrained=True).eval()\n"
        "theirs = timm.create_model('efficientvit_m0', pretrained=True).eval()\n"
        "x = torch.randn(1, 3, 224, 224)\n"
        "print(float((ours(x) - theirs(x)).abs().max()))\n"
        "try:\n"
        "    timm.create_model('sv_efficientvit_m5', pretrained=True)\n"
        "except sepvit.errors.WeightsNotFoundError as error:\n"
        "    print(error)\n"
    )
    source = str(Path(sepvit.__file__).parents[1])
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=source)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    difference, message = result.stdout.strip().splitlines()
    assert float(difference) <= 1e-5
    assert message.startswith("weights timm/efficientvit_m5.r224_in1k for sv_efficientvit_m5.r224_in1k")


def test_models_table_shows_weights_and_top1(capsys):
    print_table("sv_mobilevitv2_150", image_size=(32, 32), repeats=1)
    print_table("sepvit_lite", image_size=(32, 32), repeats=1)
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("sv_mobilevitv2_150 "))
    assert row.split()[-2:] == ["cvnets_in1k", "80.38"]
    assert [line.split() for line in lines[lines.index(row) + 1 : lines.index(row) + 3]] == [
        ["cvnets_in22k_ft_in1k", "-"],
        ["cvnets_in22k_ft_in1k_384", "-"],
    ]
    assert next(line for line in lines if line.startswith("sepvit_lite ")).split()[-2:] == ["-", "-"]
