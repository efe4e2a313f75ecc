"""Image files decoded to 8-bit RGB, the one way training, evaluation, prediction and dense tasks read them.

:func:`open_image` maps every pixel format Pillow reads to 8-bit RGB by these rules:

- 8-bit grayscale, palette, CMYK, YCbCr, LAB and 1-bit images: Pillow's conversion to RGB
  (1-bit pixels become 0 or 255, CMYK ``(c, m, y, k)`` becomes ``(255 - c)(255 - k) / 255`` etc.).
- 16-bit grayscale (Pillow modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): scaled, not clipped,
  ``v * 255 / 65535`` rounded (their single transparent grey level, if any, is ignored). 16-bit
  colour PNGs and TIFFs are reduced to 8 bits by Pillow itself, which keeps the high byte
  (``v >> 8``, within one level of the scaled value).
- 32-bit integer (mode ``I``, e.g. signed or 32-bit TIFFs, 16-bit PNGs in old Pillow): values
  within 0..65535 are taken as 16-bit and scaled like them; otherwise the image's own range
  ``[min, max]`` is stretched to 0..255.
- Floating point (mode ``F``, e.g. float TIFFs): values within [0, 1] follow that convention and are
  multiplied by 255; otherwise the image's own range ``[min, max]`` is stretched to 0..255 (a
  constant image outside [0, 1] becomes black). Images holding NaN or infinite values are refused.
- Transparency (``LA``, ``RGBA``, ``PA``, premultiplied ``La``/``RGBa``, palette or single-colour
  transparency): composited onto :data:`ALPHA_BACKGROUND` (white), so transparent pixels do not
  show whatever colour happens to be stored under them.
- EXIF orientation is applied (``ImageOps.exif_transpose``); animated and multi-page files give
  their first frame.

Files that cannot be used raise :class:`sepvit.errors.DataError` with one line naming the file and
the problem: missing or unreadable files, unknown formats and zero-size images (which Pillow does
not identify), corrupt or truncated data (Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set
here), NaN or infinite pixels, and images of more than
``PIL.Image.MAX_IMAGE_PIXELS`` pixels (refused as possible decompression bombs; raise that limit to
accept larger images).
"""

from __future__ import annotations

import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sepvit.errors import DataError

# File name suffixes of the image formats datasets may hold (lower case); one list for every task.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
# The colour transparent pixels are composited onto.
ALPHA_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_SIXTEEN_BIT_MAX = 65535


class _Unusable(Exception):
    """The decoded pixels cannot be mapped to RGB; the message says why."""


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path``'s suffix is one of :data:`IMAGE_SUFFIXES` (any case); the file is not opened."""
    return os.fspath(path).lower().endswith(IMAGE_SUFFIXES)


def open_image(path: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """The first frame of the image file at ``path`` (or an open binary file, such as an image
    read from a shard) as an 8-bit RGB image, upright per its EXIF.

    Pixel formats are mapped as the module documentation describes. Raises
    :class:`~sepvit.errors.DataError` (one line naming the file, or ``name``) when it cannot be used.
    """
    try:
        with warnings.catch_warnings():
            # The size check below refuses these images with a message of its own.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            _check_size(image)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        shown = name or (os.fspath(path) if isinstance(path, (str, os.PathLike)) else "(in memory)")
        raise DataError(f"cannot read image {shown}: {_reason(error, path)}") from error


def _check_size(image: Image.Image) -> None:
    """Refuse images beyond Pillow's decompression-bomb limit before decoding them."""
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise _Unusable(
            f"{width}×{height} pixels is more than PIL.Image.MAX_IMAGE_PIXELS ({limit}); "
            "refused as a possible decompression bomb"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(np.asarray(image, dtype=np.float64) * (255 / _SIXTEEN_BIT_MAX))
    if image.mode in ("I", "F"):
        return _gray_to_rgb(_rescale(np.asarray(image, dtype=np.float64), image.mode))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        if image.mode == "La":  # Pillow converts premultiplied L only to LA
            image = image.convert("LA")
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise _Unusable(f"pixel mode {image.mode} cannot be converted to RGB") from error


def _rescale(values: np.ndarray, mode: str) -> np.ndarray:
    """Values of a mode ``I`` or ``F`` image mapped to 0..255 (floats) by the module's rules."""
    if not np.isfinite(values).all():
        raise _Unusable("the image holds NaN or infinite pixel values")
    low, high = float(values.min()), float(values.max())
    full_scale = 1.0 if mode == "F" else _SIXTEEN_BIT_MAX
    if low >= 0 and high <= full_scale:
        return values * (255 / full_scale)
    if high == low:
        return np.zeros_like(values)
    return (values - low) * (255 / (high - low))


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(values).astype(np.uint8)).convert("RGB")


def _size(path: str | os.PathLike | BinaryIO) -> int | None:
    if isinstance(path, (str, os.PathLike)):
        return os.path.getsize(path) if os.path.isfile(path) else None
    return len(path.getbuffer()) if hasattr(path, "getbuffer") else None


def _reason(error: Exception, path: str | os.PathLike | BinaryIO) -> str:
    """One line saying what is wrong with the file, without Pillow's repetition of its name."""
    message = " ".join(str(error).split())
    if isinstance(error, _Unusable):
        return message
    if isinstance(error, Image.DecompressionBombError):
        return f"refused as a possible decompression bomb ({message})"
    if isinstance(error, UnidentifiedImageError):
        if _size(path) == 0:
            return "the file is empty"
        return "not an image Pillow can read (unknown format, corrupt header or zero size)"
    if isinstance(error, OSError) and error.errno is not None:  # the file system's own reason
        return (error.strerror or message).lower()
    if isinstance(error, OSError):  # Pillow's decoders: "image file is truncated", "broken data stream"
        return f"corrupt or truncated image data ({message})"
    return f"corrupt image data ({type(error).__name__}: {message})"
