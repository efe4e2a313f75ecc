"""Table 1 of the SepViT paper: one SepViT block against two successive Swin or Twins blocks.

All three take the same channels-last map (B, 56, 56, 96), stage 1 of a Tiny model at 224×224
with 3 heads and window 7: one SepViT block (DSSA: window attention with window tokens, then
attention among windows), timm's two Swin blocks (plain, then shifted windows) and timm's two
Twins-SVT blocks (locally grouped attention, then global sub-sampled attention with reduction 8).
"""

from __future__ import annotations

from torch import Tensor, nn

from sepvit.bench.measure import Subject

RESOLUTION = 56
CHANNELS = 96
HEADS = 3
WINDOW = 7
TWINS_REDUCTION = 8  # Twins-SVT's spatial reduction of GSA in its first stage


class TwinsBlockPair(nn.Module):
    """timm's Twins LSA block then GSA block, on a channels-last map."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.twins import Block

        self.local = Block(CHANNELS, HEADS, ws=WINDOW)
        self.global_ = Block(CHANNELS, HEADS, sr_ratio=TWINS_REDUCTION, ws=1)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        tokens = self.global_(self.local(tokens, (height, width)), (height, width))
        return tokens.view(batch, height, width, channels)


def sepvit_block() -> nn.Module:
    from sepvit.models.sepvit import SepViTBlock

    grid = RESOLUTION // WINDOW
    return SepViTBlock(CHANNELS, HEADS, window_size=WINDOW, grid_size=(grid, grid))


def swin_block_pair() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformerBlock

    size = (RESOLUTION, RESOLUTION)
    return nn.Sequential(
        SwinTransformerBlock(CHANNELS, size, HEADS, window_size=WINDOW, shift_size=0),
        SwinTransformerBlock(CHANNELS, size, HEADS, window_size=WINDOW, shift_size=WINDOW // 2),
    )


def table1_subjects(backends: tuple[str, ...] = ("eager",)) -> list[Subject]:
    """The three Table 1 contenders, once per backend."""
    shape = (RESOLUTION, RESOLUTION, CHANNELS)
    factories = {
        "sepvit_block (1 DSSA)": sepvit_block,
        "swin_blocks (W-MSA + SW-MSA)": swin_block_pair,
        "twins_blocks (LSA + GSA)": TwinsBlockPair,
    }
    return [
        Subject(name, factory, shape, backend) for backend in backends for name, factory in factories.items()
    ]
