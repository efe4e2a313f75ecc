"""The input sizes a model can sensibly be built and run at, per family.

Below the smallest, a family's downsampling leaves no pixel to attend to (EfficientViT's 16-pixel
patches divide by zero below 16 px); above the largest, the per-window parameters that follow the
size (SepViT's window tokens) and the activations grow past what any machine here holds, so a
mistyped ``--img-size 100000`` is refused at once instead of being killed for memory later.
"""

from __future__ import annotations

from collections.abc import Sequence

from sepvit.errors import ConfigError

LARGEST = 2048
# (smallest side, largest side) in pixels, by model-name prefix; other timm models get ANY_MODEL.
FAMILY_SIZES = {
    "sepvit_": (16, LARGEST),  # stride 32: below 16 px every stage is one zero-padded pixel
    "sv_mobilevitv2_": (16, LARGEST),  # stride 32, likewise
    "sv_efficientvit_": (16, LARGEST),  # its 16-pixel patch embedding leaves nothing below 16 px
}
ANY_MODEL = (8, LARGEST)


def size_limits(model: str) -> tuple[int, int]:
    """(smallest, largest) sensible side of an input to ``model``, in pixels."""
    name = model.split(".")[0].split("/")[-1]
    return next((sizes for prefix, sizes in FAMILY_SIZES.items() if name.startswith(prefix)), ANY_MODEL)


def check_input_size(model: str, size: Sequence[int], what: str = "--img-size") -> tuple[int, ...]:
    """``size`` (sides in pixels) when every side is sensible for ``model``, else a :class:`ConfigError`."""
    smallest, largest = size_limits(model)
    sides = tuple(size)
    for side in sides:
        if isinstance(side, bool) or not isinstance(side, int) or not smallest <= side <= largest:
            raise ConfigError(
                f"{what} {' '.join(map(str, sides))} is outside {model}'s sensible input sizes, "
                f"{smallest} to {largest} pixels a side"
            )
    return sides
