"""DSA, PSA, GSA and the SepViT block against plain references: a loop over windows, explicit softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sepvit.layers import GlobalSelfAttention, SeparableWindowAttention, window_partition, window_reverse
from sepvit.layers import separable_window_attention as swa

TOL = dict(atol=1e-5, rtol=1e-5)


def reference_attention(z: torch.Tensor, weight, bias, num_heads: int, real_keys: torch.Tensor | None = None):
    """Eq. (1) for one group of tokens z (L, C): softmax(QK^T / sqrt(d)) V + z, heads one by one."""
    channels = z.shape[-1]
    head_dim = channels // num_heads
    q, k, v = (z @ weight.T + bias).split(channels, dim=-1)
    heads = []
    for h in range(num_heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[:, part] @ k[:, part].T / math.sqrt(head_dim)
        if real_keys is not None:
            scores = scores.masked_fill(~real_keys[None, :], float("-inf"))
        probs = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        heads.append(probs @ v[:, part])
    return torch.cat(heads, dim=-1) + z


def reference_separable(module: SeparableWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """DSSA/GSA by hand: windows one at a time, then PSA window by window, head by head."""
    batch, height, width, channels = x.shape
    m, heads = module.window_size, module.num_heads
    head_dim = channels // heads
    grid_h, grid_w = math.ceil(height / m), math.ceil(width / m)
    padded = torch.zeros(batch, grid_h * m, grid_w * m, channels)
    padded[:, :height, :width] = x
    real = torch.zeros(grid_h * m, grid_w * m, dtype=torch.bool)
    real[:height, :width] = True
    tokens = module.window_tokens
    assert tokens is not None and tokens.shape[1:3] == (grid_h, grid_w)
    out = torch.zeros_like(padded)
    for b in range(batch):
        window_tokens, maps = [], []
        for i in range(grid_h):
            for j in range(grid_w):
                rows, cols = slice(i * m, (i + 1) * m), slice(j * m, (j + 1) * m)
                pixels = padded[b, rows, cols].reshape(m * m, channels)
                keys = torch.cat((torch.tensor([True]), real[rows, cols].reshape(-1)))
                z = torch.cat((tokens[0, i, j][None], pixels))
                dsa = reference_attention(z, module.qkv.weight, module.qkv.bias, heads, keys)
                window_tokens.append(dsa[0])
                maps.append(dsa[1:] * real[rows, cols].reshape(-1, 1))
        t = F.gelu(
            F.layer_norm(
                torch.stack(window_tokens), (channels,), module.psa.norm.weight, module.psa.norm.bias
            )
        )
        q, k = (t @ module.psa.qk.weight.T + module.psa.qk.bias).split(channels, dim=-1)
        n = len(maps)
        for i in range(n):
            mixed = torch.zeros_like(maps[i])
            for h in range(heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                scores = torch.stack([q[i, part] @ k[j, part] for j in range(n)]) / math.sqrt(head_dim)
                probs = scores.exp() / scores.exp().sum()
                for j in range(n):
                    mixed[:, part] += probs[j] * maps[j][:, part]
            window = (mixed + maps[i]).reshape(m, m, channels)
            row, col = divmod(i, grid_w)
            out[b, row * m : (row + 1) * m, col * m : (col + 1) * m] = window
    out = out[:, :height, :width]
    return out @ module.proj.weight.T + module.proj.bias


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter (window tokens and norms too) random values, so no term hides."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return module.eval()


@pytest.mark.parametrize("size", [(14, 21), (10, 17), (7, 7)])
def test_dsa_matches_reference(size):
    height, width = size
    module = randomize(SeparableWindowAttention(16, 2, 7, (math.ceil(height / 7), math.ceil(width / 7))))
    x = torch.randn(2, height, width, 16)
    windows = window_partition(x, 7)
    tokens = module.window_tokens_for(x).flatten(1, 2)[:, :, None].expand(2, -1, -1, -1)
    z = torch.cat((tokens, windows), dim=2).flatten(0, 1)
    real = torch.zeros(math.ceil(height / 7) * 7, math.ceil(width / 7) * 7, dtype=torch.bool)
    real[:height, :width] = True
    real_windows = window_partition(real[None, :, :, None], 7)[0, :, :, 0]
    key_mask = F.pad(real_windows, (1, 0), value=True).repeat(2, 1)
    got = module.depthwise(z, key_mask)
    expected = torch.stack(
        [reference_attention(g, module.qkv.weight, module.qkv.bias, 2, m) for g, m in zip(z, key_mask)]
    )
    torch.testing.assert_close(got, expected, **TOL)


def test_psa_matches_reference():
    module = randomize(SeparableWindowAttention(12, 3, 2, (2, 3))).psa
    tokens, windows = torch.randn(2, 6, 12), torch.randn(2, 6, 4, 12)
    got = module(tokens, windows).permute(0, 2, 3, 1, 4).flatten(-2)  # head-major -> (B, N, P, C)
    t = F.gelu(F.layer_norm(tokens, (12,), module.norm.weight, module.norm.bias))
    q, k = (t @ module.qk.weight.T + module.qk.bias).split(12, dim=-1)
    expected = torch.empty_like(windows)
    for b in range(2):
        for h in range(3):
            part = slice(4 * h, 4 * h + 4)
            probs = torch.softmax(q[b, :, part] @ k[b, :, part].T / 2.0, dim=-1)  # scale: head_dim ** -0.5
            expected[b, :, :, part] = (
                torch.einsum("ij,jpc->ipc", probs, windows[b, :, :, part]) + windows[b, :, :, part]
            )
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize(
    "window_size, size",
    [(7, (14, 14)), (7, (10, 17)), (14, (28, 28)), (14, (20, 33))],
    ids=["dssa", "dssa-padded", "gsa", "gsa-padded"],
)
def test_separable_attention_matches_reference(window_size, size):
    grid = (math.ceil(size[0] / window_size), math.ceil(size[1] / window_size))
    module = randomize(SeparableWindowAttention(16, 2, window_size, grid))
    x = torch.randn(2, *size, 16)
    tokens = module.window_tokens_for(x)
    torch.testing.assert_close(module(x, tokens), reference_separable(module, x), **TOL)


def test_global_attention_matches_reference():
    module = randomize(GlobalSelfAttention(16, 4))
    x = torch.randn(2, 5, 6, 16)
    expected = torch.stack(
        [reference_attention(t, module.qkv.weight, module.qkv.bias, 4) for t in x.reshape(2, 30, 16)]
    )
    expected = expected @ module.proj.weight.T + module.proj.bias
    torch.testing.assert_close(module(x), expected.view(2, 5, 6, 16), **TOL)


def test_padded_pixels_get_zero_attention_weight(monkeypatch):
    """Every DSA call masks exactly the padded pixels; their softmax weight is exactly zero."""
    module = randomize(SeparableWindowAttention(8, 2, 7, (2, 3)))
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        calls.append((q, k, attn_mask))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(swa.F, "scaled_dot_product_attention", recording_sdpa)
    x = torch.randn(1, 10, 17, 8)
    module(x, module.window_tokens_for(x))
    q, k, mask = calls[0]  # the DSA call; PSA attends among whole windows
    assert mask is not None and mask.shape == (6, 1, 1, 50)
    padded_pixels = 2 * 7 * 3 * 7 - 10 * 17
    assert int((~mask).sum()) == padded_pixels
    scores = (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    assert torch.all(weights.masked_select(~mask) == 0)
    assert torch.all(weights.masked_select(mask.expand_as(weights)) > 0)


def test_real_pixels_do_not_see_padding_values():
    """Real outputs are unchanged whatever the padded region holds (its values are zeroed for PSA)."""
    module = randomize(SeparableWindowAttention(8, 2, 7, (2, 3)))
    x = torch.randn(1, 14, 21, 8)
    tokens = module.window_tokens_for(x[:, :10, :17])
    reference = module(x[:, :10, :17], tokens)
    altered = x.clone()
    altered[:, 10:, :] = 100.0
    altered[:, :, 17:] = -100.0
    windows = window_partition(altered, 7)
    torch.testing.assert_close(window_reverse(windows, 7, 10, 17), x[:, :10, :17])
    heads_first = windows.unflatten(-1, (2, -1)).permute(0, 3, 1, 2, 4).contiguous()  # (B, heads, N, P, d)
    torch.testing.assert_close(window_reverse(heads_first, 7, 10, 17, heads_first=True), x[:, :10, :17])
    torch.testing.assert_close(module(x[:, :10, :17], tokens), reference)


@pytest.mark.parametrize("representation", ["avgpool", "dwconv"])
def test_pooled_window_representations(representation):
    module = randomize(SeparableWindowAttention(8, 2, 7, (2, 2), window_representation=representation))
    assert module.window_tokens is None
    x = torch.randn(1, 14, 14, 8)
    z = module.depthwise(window_partition(x, 7).flatten(0, 1)).view(1, 4, 49, 8)
    if representation == "avgpool":
        expected = z.mean(dim=2)
    else:
        maps = z.view(4, 7, 7, 8).permute(0, 3, 1, 2)
        expected = F.conv2d(maps, module.window_pool.weight, module.window_pool.bias, groups=8).flatten(1)[
            None
        ]
    torch.testing.assert_close(module.pooled_representation(z, None), expected, **TOL)
    assert module(x).shape == x.shape


def test_zero_window_tokens_are_fixed():
    module = SeparableWindowAttention(8, 2, 7, (2, 2), window_token="zero")
    assert module.window_tokens is None
    tokens = module.window_tokens_for(torch.zeros(1, 14, 14, 8))
    assert tokens.shape == (1, 2, 2, 8) and torch.count_nonzero(tokens) == 0


def test_window_tokens_resize_to_the_grid():
    module = randomize(SeparableWindowAttention(8, 2, 7, (2, 2)))
    same = module.window_tokens_for(torch.zeros(1, 14, 14, 8))
    torch.testing.assert_close(same, module.window_tokens)
    bigger = module.window_tokens_for(torch.zeros(1, 28, 21, 8))
    assert bigger.shape == (1, 4, 3, 8)
    grid = bigger[0]
    tokens = module.window_tokens[0]
    # Bilinear resizing keeps the corner windows' tokens and stays inside the learned values.
    torch.testing.assert_close(grid[0, 0], tokens[0, 0])
    torch.testing.assert_close(grid[-1, -1], tokens[-1, -1])
    assert torch.all(grid <= tokens.amax(dim=(0, 1)) + 1e-6) and torch.all(
        grid >= tokens.amin(dim=(0, 1)) - 1e-6
    )


@pytest.mark.parametrize("grid", [(4, 5), (16, 16), (3, 11), (1, 1), (25, 42)])
def test_token_grid_resizing_is_bilinear_interpolation(grid):
    tokens = torch.randn(1, 8, 8, 5)
    expected = F.interpolate(tokens.permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(swa.resize_token_grid(tokens, grid), expected.permute(0, 2, 3, 1), **TOL)


@pytest.mark.parametrize("size", [(8, 12), (10, 13)])  # whole windows; windows that overhang the map
def test_local_window_attention_is_global_attention_window_by_window(size):
    torch.manual_seed(0)
    local = swa.LocalWindowAttention(8, 2, 4).eval()
    reference = GlobalSelfAttention(8, 2).eval()
    reference.load_state_dict(local.state_dict())
    x = torch.randn(2, *size, 8)
    out = local(x)
    for top in range(0, size[0], 4):
        for left in range(0, size[1], 4):
            window = x[:, top : top + 4, left : left + 4]
            torch.testing.assert_close(out[:, top : top + 4, left : left + 4], reference(window), **TOL)


def test_psa_attention_weights_are_what_its_forward_applies():
    torch.manual_seed(0)
    psa = swa.PointwiseSelfAttention(8, 2).eval()
    tokens, windows = torch.randn(2, 6, 8), torch.randn(2, 6, 16, 8)
    weights = psa.attention_weights(tokens)  # (B, heads, N, N)
    assert weights.shape == (2, 2, 6, 6)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2, 6))
    values = windows.unflatten(-1, (2, 4)).permute(0, 3, 1, 2, 4)  # (B, heads, N, P, C / heads)
    expected = torch.einsum("bhnm,bhmpc->bhnpc", weights, values) + values
    torch.testing.assert_close(psa(tokens, windows), expected, **TOL)


def swin_may_attend(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(H*W, H*W) pairs of pixels that SW-MSA lets attend to each other, from Swin's definition:
    the same window of the map shifted by ``shift`` and on the same side of the wrap, along both axes
    (an axis with a single window is not shifted)."""

    def same_group(size: int) -> torch.Tensor:
        padded = math.ceil(size / window) * window
        step = shift if padded > window else 0
        position = torch.arange(size)
        shifted_window = ((position - step) % padded) // window
        wrapped = position < step
        return (shifted_window[:, None] == shifted_window[None, :]) & (wrapped[:, None] == wrapped[None, :])

    rows, cols = same_group(height), same_group(width)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(height * width, height * width)


@pytest.mark.parametrize("size", [(8, 12), (10, 13), (2, 12), (1, 6)])  # whole, overhanging, one row
def test_shifted_window_attention_is_masked_global_attention(size):
    torch.manual_seed(0)
    shifted = (
        swa.LocalWindowAttention(8, 2, 2, shift_size=1)
        if size[0] <= 2
        else swa.LocalWindowAttention(8, 2, 4, shift_size=2).eval()
    )
    x = torch.randn(2, *size, 8)
    allowed = swin_may_attend(*size, shifted.window_size, shifted.shift_size)
    for image in range(2):
        tokens = x[image].flatten(0, 1)
        heads = []
        q, k, v = (tokens @ shifted.qkv.weight.T + shifted.qkv.bias).split(8, dim=-1)
        for h in range(2):
            part = slice(4 * h, 4 * h + 4)
            scores = (q[:, part] @ k[:, part].T / 2).masked_fill(~allowed, float("-inf"))
            heads.append(scores.softmax(dim=-1) @ v[:, part])
        expected = shifted.proj(torch.cat(heads, dim=-1) + tokens).view(*size, 8)
        torch.testing.assert_close(shifted(x)[image], expected, **TOL)


def test_shifted_window_attention_reaches_across_window_borders():
    torch.manual_seed(0)
    plain = swa.LocalWindowAttention(8, 2, 4).eval()
    shifted = swa.LocalWindowAttention(8, 2, 4, shift_size=2).eval()
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 8, 8)
    changed = x.clone()
    changed[0, 4, 4] += 1.0  # first pixel of the bottom-right window
    assert torch.equal(plain(x)[0, 3, 3], plain(changed)[0, 3, 3])  # another window: untouched
    assert not torch.allclose(shifted(x)[0, 3, 3], shifted(changed)[0, 3, 3])  # one shifted window
