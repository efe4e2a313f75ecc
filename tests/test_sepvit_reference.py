"""SepViT against an independent reference of the official model, written from Eq. (1)-(9).

The reference below shares no code with ``sepvit.layers`` or ``sepvit.models``: it reads parameters
by the official implementation's names (liwei109/SepViT, ``classification/sepvit.py``) and runs
every window, token and head in a plain Python loop in float64. Its block is the paper's:

    Eq. (5)  z~ = Concat(z, wt)                       window token first, then the M² pixels
    Eq. (6)  z" = DSA(LN(z~)),  DSA(z) = Attention(zW_Q, zW_K, zW_V) + z      (Eq. 1)
    Eq. (7)  z., wt. = Slice(z")
    Eq. (8)  z^ = Proj(PSA(z., wt.)) + z,  PSA = Attention(GELU(LN(wt.))W_Q, GELU(LN(wt.))W_K, z.) + z.
    Eq. (9)  out = MLP(LN(z^)) + z^

Models are compared on random weights with every term non-trivial (window tokens, biases and
LayerNorm affines all random), so that no difference hides behind the default initialisation.
Windows that overhang the map hold only their real pixels here (nothing to mask), and a pixel
position that is padding in a neighbouring window contributes nothing to PSA.
"""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import sepvit  # noqa: F401  (registers the models)
from sepvit.models.sepvit import SepViTBlock, checkpoint_filter_fn

TOL = dict(atol=1e-6, rtol=1e-6)
Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# The reference: plain loops, float64, official parameter names.


def layer_norm(x: torch.Tensor, params: Params, prefix: str, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * params[f"{prefix}.weight"] + params[f"{prefix}.bias"]


def linear(x: torch.Tensor, params: Params, prefix: str) -> torch.Tensor:
    return x @ params[f"{prefix}.weight"].T + params[f"{prefix}.bias"]


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def softmax(scores: torch.Tensor) -> torch.Tensor:
    e = (scores - scores.max(dim=-1, keepdim=True).values).exp()
    return e / e.sum(dim=-1, keepdim=True)


def dsa(z: torch.Tensor, params: Params, prefix: str, heads: int) -> torch.Tensor:
    """Eq. (1) over one window's tokens z (L, C), head by head: Attention(zW_Q, zW_K, zW_V) + z."""
    channels = z.shape[1]
    d = channels // heads
    q, k, v = linear(z, params, f"{prefix}.DSA_qkv").split(channels, dim=1)
    out = torch.cat(
        [
            softmax(q[:, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T / math.sqrt(d))
            @ v[:, h * d : (h + 1) * d]
            for h in range(heads)
        ],
        dim=1,
    )
    return out + z


def reference_block(
    params: Params,
    x: torch.Tensor,
    window_size: int,
    heads: int,
    token: str = "learnable",
    representation: str = "token",
    build_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One SepViT block on a (H, W, C) map. A block without ``attn.PSA_qk`` holds one window.

    ``build_grid``: the window grid the tokens were made for (the official code's is square).
    """
    height, width, channels = x.shape
    d = channels // heads
    norm1 = lambda t: layer_norm(t, params, "norm1", 1e-6)  # noqa: E731
    if "attn.PSA_qk.weight" not in params:  # one window: global attention, no token, no PSA
        z = norm1(x.reshape(-1, channels))
        attended = linear(dsa(z, params, "attn", heads), params, "attn.proj").reshape(x.shape)
    else:
        m = window_size
        rows, cols = math.ceil(height / m), math.ceil(width / m)
        if representation == "token" and token == "learnable":
            tokens = params["win_tokens"]  # official layout (1, windows, 1, C)
            side = math.isqrt(tokens.shape[1])
            build_grid = build_grid or (side, side)
            grid = tokens.reshape(*build_grid, channels)
            if build_grid != (rows, cols):  # our extension: bilinear resize to the input's grid
                grid = F.interpolate(grid.permute(2, 0, 1)[None], (rows, cols), mode="bilinear")[0]
                grid = grid.permute(1, 2, 0)
        elif representation == "token":
            grid = torch.zeros(rows, cols, channels, dtype=x.dtype)
        window_tokens, maps = [], []  # maps: the DSA output of each window, as (M, M, C), zero where padded
        for i in range(rows):
            for j in range(cols):
                pixels = x[i * m : (i + 1) * m, j * m : (j + 1) * m]  # only the real pixels
                h, w = pixels.shape[:2]
                z = pixels.reshape(-1, channels)
                if representation == "token":
                    z = torch.cat((grid[i, j][None], z))  # Eq. (5)
                z = dsa(norm1(z), params, "attn", heads)  # Eq. (6)
                if representation == "token":  # Eq. (7)
                    window_tokens.append(z[0])
                    z = z[1:]
                elif representation == "avgpool":
                    window_tokens.append(z.mean(dim=0))
                else:  # dwconv: an M×M depthwise convolution over the window
                    kernel = params["attn.window_pool.weight"][:, 0, :h, :w].reshape(channels, -1)
                    window_tokens.append((z * kernel.T).sum(dim=0) + params["attn.window_pool.bias"])
                window_map = torch.zeros(m, m, channels, dtype=x.dtype)
                window_map[:h, :w] = z.reshape(h, w, channels)
                maps.append(window_map)
        t = gelu(layer_norm(torch.stack(window_tokens), params, "attn.win_tokens_norm", 1e-5))
        q, k = linear(t, params, "attn.PSA_qk").split(channels, dim=1)
        out = torch.zeros(rows * m, cols * m, channels, dtype=x.dtype)
        values = torch.stack(maps)  # (windows, M, M, C)
        for i in range(len(maps)):  # Eq. (2): attention among windows, the maps as values, + input
            mixed = maps[i].clone()
            for h in range(heads):
                part = slice(h * d, (h + 1) * d)
                weights = softmax(k[:, part] @ q[i, part] / math.sqrt(d))  # over the windows
                mixed[..., part] += torch.einsum("n,nabc->abc", weights, values[..., part])
            r, c = divmod(i, cols)
            out[r * m : (r + 1) * m, c * m : (c + 1) * m] = mixed
        attended = linear(out[:height, :width], params, "attn.proj")
    x = x + attended  # Eq. (8)
    hidden = gelu(linear(layer_norm(x, params, "norm2", 1e-6), params, "mlp.fc1"))
    return x + linear(hidden, params, "mlp.fc2")  # Eq. (9)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, groups: int = 1):
    return F.conv2d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2, groups=groups)


def reference_model(params: Params, x: torch.Tensor, window_sizes: list[list[int]], heads: list[int]):
    """The official SepViT forward on an official-format state dict; images (B, 3, H, W) -> logits."""
    logits = []
    for image in x:
        feature = image[None]
        for i, (stage_windows, stage_heads) in enumerate(zip(window_sizes, heads)):
            prefix = f"patch_embeds.{i}"
            feature = conv2d(
                feature, params[f"{prefix}.proj.weight"], params[f"{prefix}.proj.bias"], 4 if i == 0 else 2
            )
            feature = layer_norm(feature[0].permute(1, 2, 0), params, f"{prefix}.norm", 1e-5)
            for j, window_size in enumerate(stage_windows):
                block = {
                    k[len(f"blocks.{i}.{j}.") :]: v
                    for k, v in params.items()
                    if k.startswith(f"blocks.{i}.{j}.")
                }
                feature = reference_block(block, feature, window_size, stage_heads)
                if j == 0:  # PEG: depthwise 3×3 conv plus identity
                    weight, bias = (
                        params[f"pos_block.{i}.proj.0.weight"],
                        params[f"pos_block.{i}.proj.0.bias"],
                    )
                    chw = feature.permute(2, 0, 1)[None]
                    feature = (conv2d(chw, weight, bias, 1, groups=chw.shape[1]) + chw)[0].permute(1, 2, 0)
            feature = feature.permute(2, 0, 1)[None]
        pooled = layer_norm(feature[0].permute(1, 2, 0), params, "norm", 1e-6).mean(dim=(0, 1))
        logits.append(linear(pooled, params, "head"))
    return torch.stack(logits)


# ---------------------------------------------------------------------------------------------------
# Our modules against it.

# Our block's parameter names -> the official code's.
_TO_OFFICIAL = (
    (r"^attn\.window_tokens$", "win_tokens"),
    (r"^attn\.qkv\.", "attn.DSA_qkv."),
    (r"^attn\.psa\.norm\.", "attn.win_tokens_norm."),
    (r"^attn\.psa\.qk\.", "attn.PSA_qk."),
)


def official_block_params(block: torch.nn.Module) -> Params:
    params = {}
    for key, value in block.state_dict().items():
        for pattern, replacement in _TO_OFFICIAL:
            key = re.sub(pattern, replacement, key)
        params[key] = value.reshape(1, -1, 1, value.shape[-1]) if key == "win_tokens" else value
    return params


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter: window tokens, biases and LayerNorm affines included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 1.0 if name.endswith(("window_tokens", "norm.bias", "norm1.bias", "norm2.bias")) else 0.3
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
            if name.endswith("weight") and "norm" in name:
                param.add_(1.0)
    return module.eval()


BLOCK_CASES = {
    # name: (window size, build grid, input (H, W), window token, representation)
    "dssa": (7, (2, 3), (14, 21), "learnable", "token"),
    "dssa-zero-token": (7, (2, 3), (14, 21), "zero", "token"),
    "dssa-padded": (7, (2, 3), (10, 17), "learnable", "token"),
    "dssa-padded-zero-token": (7, (2, 3), (10, 17), "zero", "token"),
    "gsa": (14, (2, 2), (28, 28), "learnable", "token"),
    "gsa-padded": (14, (2, 3), (20, 33), "learnable", "token"),
    "single-window": (7, (1, 1), (7, 7), "learnable", "token"),
    "single-window-other-size": (14, (1, 1), (9, 12), "learnable", "token"),
    "avgpool": (7, (2, 2), (14, 14), "learnable", "avgpool"),
    "avgpool-padded": (7, (2, 3), (10, 17), "learnable", "avgpool"),
    "dwconv": (7, (2, 2), (14, 14), "learnable", "dwconv"),
    "dwconv-padded": (7, (2, 3), (10, 17), "learnable", "dwconv"),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_matches_the_equations(case):
    window_size, grid, size, token, representation = BLOCK_CASES[case]
    block = SepViTBlock(
        16, 2, window_size, grid, window_token=token, window_representation=representation
    ).double()
    randomize(block)
    x = torch.randn(2, *size, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    params = official_block_params(block)
    expected = torch.stack(
        [reference_block(params, image, window_size, 2, token, representation, grid) for image in x]
    )
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, **TOL)


def test_block_matches_the_equations_with_resized_window_tokens():
    """A map whose window grid differs from the build grid: the tokens are resized, then normalised."""
    block = randomize(SepViTBlock(16, 2, 7, (2, 2)).double())
    x = torch.randn(1, 20, 26, 16, dtype=torch.float64)
    expected = reference_block(official_block_params(block), x[0], 7, 2, build_grid=(2, 2))[None]
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, **TOL)


def random_official_checkpoint(name: str, seed: int = 0) -> tuple[Params, list[list[int]], list[int]]:
    """An official-format state dict for ``name`` (as liwei109/SepViT names and shapes its parameters)."""
    model = timm.create_model(name)
    heads = [stage.blocks[0].attn.num_heads for stage in model.stages]
    window_sizes = [
        [getattr(block.attn, "window_size", 7) for block in stage.blocks] for stage in model.stages
    ]
    renames = (
        (r"^stages\.(\d+)\.downsample\.", r"patch_embeds.\1."),
        (r"^stages\.(\d+)\.pos_embed\.proj\.", r"pos_block.\1.proj.0."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.window_tokens$", r"blocks.\1.\2.win_tokens"),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2."),
        (r"\.attn\.qkv\.", ".attn.DSA_qkv."),
        (r"\.attn\.psa\.norm\.", ".attn.win_tokens_norm."),
        (r"\.attn\.psa\.qk\.", ".attn.PSA_qk."),
        (r"^head\.fc\.", "head."),
    )
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for key, value in model.state_dict().items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        shape = (
            (1, value[0].numel() // value.shape[-1], 1, value.shape[-1])
            if key.endswith("win_tokens")
            else value.shape
        )
        scale = 1.0 if key.endswith(("win_tokens", "norm.bias", "norm1.bias", "norm2.bias")) else 0.3
        random = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
        params[key] = (
            random + 1.0
            if key.endswith("norm.weight") or key.endswith(("norm1.weight", "norm2.weight"))
            else random
        )
    return params, window_sizes, heads


@pytest.mark.parametrize("size", [(224, 224), (200, 232)], ids=["224", "other-size"])
def test_official_checkpoint_loads_strictly_and_gives_the_official_outputs(size):
    params, window_sizes, heads = random_official_checkpoint("sepvit_lite")
    model = timm.create_model("sepvit_lite").double().eval()
    model.load_state_dict(checkpoint_filter_fn({"state_dict": dict(params)}, model), strict=True)
    x = torch.randn(1, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_model(params, x, window_sizes, heads), **TOL)
