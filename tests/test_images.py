"""open_image: every pixel format decoded to the 8-bit RGB that numpy says it should be, bad files refused."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile
from skimage import data

from sepvit.data_io import ALPHA_BACKGROUND, IMAGE_SUFFIXES, is_image_file, open_image
from sepvit.errors import DataError

PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, gray+alpha, RGB, RGBA)


def write_png(path: Path, pixels: np.ndarray, size: tuple[int, int] | None = None) -> Path:
    """A PNG written byte by byte (Pillow writes no 16-bit colour PNGs); ``size`` overrides the header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    height, width, channels = pixels.shape
    depth = 16 if pixels.dtype == np.uint16 else 8
    rows = b"".join(b"\x00" + row.astype(">u2" if depth == 16 else "u1").tobytes() for row in pixels)
    width, height = size or (width, height)
    header = struct.pack(">IIBBBBB", width, height, depth, PNG_COLOR_TYPES[channels], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def pixels(path: Path) -> np.ndarray:
    image = open_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.int64)[..., None], 3, axis=-1)


def scaled_16_to_8(values: np.ndarray) -> np.ndarray:
    """``v * 255 / 65535`` rounded half up, in integers (no ties occur: 65535 = 255 * 257)."""
    return (values.astype(np.int64) * 255 + 32767) // 65535


def composite_on_background(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weight = alpha[..., None].astype(np.float64) / 255
    return rgb * weight + np.array(ALPHA_BACKGROUND) * (1 - weight)


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return data.camera()[::2, ::2]  # 256x256 uint8, real content


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()[::4, ::2]  # 128x256x3 uint8, not square


def test_16_bit_gradient_png_scales_to_8_bit(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 1024).round().astype(np.uint16), (4, 1))
    out = pixels(write_png(tmp_path / "g.png", gradient))
    np.testing.assert_array_equal(out, gray3(scaled_16_to_8(gradient)))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and len(np.unique(out)) == 256


def test_16_bit_grayscale_of_real_content_round_trips(tmp_path, camera):
    # v * 257 is v's exact 16-bit equivalent, so it must decode back to v.
    out = pixels(write_png(tmp_path / "camera16.png", camera.astype(np.uint16) * 257))
    np.testing.assert_array_equal(out, gray3(camera))


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_16_bit_tiff_in_either_byte_order(tmp_path, byte_order):
    values = np.arange(0, 65536, 61, dtype=np.uint16)[:1000].reshape(20, 50)
    tifffile.imwrite(tmp_path / "g.tif", values.astype(f"{byte_order}u2"))
    assert Image.open(tmp_path / "g.tif").mode == ("I;16B" if byte_order == ">" else "I;16")
    np.testing.assert_array_equal(pixels(tmp_path / "g.tif"), gray3(scaled_16_to_8(values)))


def test_16_bit_colour_png_keeps_the_high_byte(tmp_path, astronaut):
    rng = np.random.default_rng(0)
    rgb16 = (astronaut.astype(np.uint16) << 8) | rng.integers(0, 256, astronaut.shape, dtype=np.uint16)
    out = pixels(write_png(tmp_path / "rgb16.png", rgb16))
    np.testing.assert_array_equal(out, astronaut)
    assert np.abs(out - rgb16 / 257).max() <= 1


def test_16_bit_rgba_png_is_composited(tmp_path, astronaut):
    alpha = np.tile(np.linspace(0, 255, astronaut.shape[1]).astype(np.uint8), (astronaut.shape[0], 1))
    rgba16 = np.dstack([astronaut, alpha]).astype(np.uint16) * 257
    out = pixels(write_png(tmp_path / "rgba16.png", rgba16))
    np.testing.assert_allclose(out, composite_on_background(astronaut, alpha), atol=1)


def test_float_tiff_in_unit_range_maps_to_0_255(tmp_path, camera):
    tifffile.imwrite(tmp_path / "f.tif", camera.astype(np.float32) / 255)
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_array_equal(pixels(tmp_path / "f.tif"), gray3(camera))
    ramp = np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(3, axis=0)
    tifffile.imwrite(tmp_path / "ramp.tif", ramp)
    np.testing.assert_array_equal(pixels(tmp_path / "ramp.tif")[0, :, 0], np.round(ramp[0] * 255))


def test_float_tiff_outside_unit_range_is_stretched_over_its_own_range(tmp_path, camera):
    values = camera.astype(np.float32) * 0.25 - 10  # range [-10, 53.75]
    tifffile.imwrite(tmp_path / "f.tif", values)
    low, high = values.min(), values.max()
    expected = np.round((values.astype(np.float64) - low) / (high - low) * 255)
    np.testing.assert_allclose(pixels(tmp_path / "f.tif"), gray3(expected), atol=1)
    tifffile.imwrite(tmp_path / "constant.tif", np.full((4, 5), 7.0, np.float32))
    assert not pixels(tmp_path / "constant.tif").any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_non_finite_pixels_is_refused(tmp_path, bad):
    values = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    values[2, 3] = bad
    tifffile.imwrite(tmp_path / "f.tif", values)
    with pytest.raises(DataError, match=r"f\.tif: .*NaN or infinite"):
        open_image(tmp_path / "f.tif")


def test_32_bit_integer_tiff(tmp_path):
    values = np.arange(0, 65536, 331, dtype=np.int32)[:180].reshape(12, 15)
    tifffile.imwrite(tmp_path / "i.tif", values)
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(pixels(tmp_path / "i.tif"), gray3(scaled_16_to_8(values)))
    signed = values - 30000  # negative values: the image's own range is stretched
    tifffile.imwrite(tmp_path / "s.tif", signed)
    expected = np.round((signed - signed.min()) / (signed.max() - signed.min()) * 255)
    np.testing.assert_allclose(pixels(tmp_path / "s.tif"), gray3(expected), atol=1)


def test_one_bit(tmp_path):
    bits = np.indices((9, 14)).sum(axis=0) % 3 == 0
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(pixels(tmp_path / "b.png"), gray3(bits * 255))


def test_palette_with_transparency_is_composited(tmp_path):
    indices = (np.arange(60).reshape(6, 10) % 4).astype(np.uint8)
    palette = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "p.png", transparency=2)
    expected = palette[indices].astype(np.int64)
    expected[indices == 2] = ALPHA_BACKGROUND
    np.testing.assert_array_equal(pixels(tmp_path / "p.png"), expected)
    image.save(tmp_path / "p.gif")  # no transparency: plain palette lookup
    np.testing.assert_array_equal(pixels(tmp_path / "p.gif"), palette[indices])


def test_grayscale_and_colour_alpha_are_composited(tmp_path, camera, astronaut):
    alpha = np.tile(np.linspace(0, 255, camera.shape[1]).astype(np.uint8), (camera.shape[0], 1))
    Image.fromarray(np.dstack([camera, alpha]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(
        pixels(tmp_path / "la.png"), composite_on_background(gray3(camera), alpha), atol=1
    )
    alpha = alpha[: astronaut.shape[0], : astronaut.shape[1]][::-1]
    Image.fromarray(np.dstack([astronaut, alpha]), mode="RGBA").save(tmp_path / "rgba.webp", lossless=True)
    np.testing.assert_allclose(
        pixels(tmp_path / "rgba.webp"), composite_on_background(astronaut, alpha), atol=1
    )


def test_cmyk(tmp_path):
    cmyk = np.random.default_rng(1).integers(0, 256, (8, 12, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    c, m, y, k = np.moveaxis(cmyk.astype(np.float64), -1, 0)
    expected = np.stack([(255 - c), (255 - m), (255 - y)], -1) * (255 - k)[..., None] / 255
    np.testing.assert_allclose(pixels(tmp_path / "c.tif"), expected, atol=1)


def test_cmyk_jpeg(tmp_path):
    flat = np.zeros((16, 16, 4), np.uint8)
    flat[..., 0] = 255  # pure cyan: Adobe's inverted CMYK JPEGs must not come out red
    Image.fromarray(flat, mode="CMYK").save(tmp_path / "c.jpg", quality=100)
    np.testing.assert_allclose(
        pixels(tmp_path / "c.jpg"), np.broadcast_to([0, 255, 255], (16, 16, 3)), atol=3
    )


ORIENTATIONS = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, astronaut, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(astronaut).save(tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(pixels(tmp_path / "o.png"), ORIENTATIONS[orientation](astronaut))


def test_exif_rotated_jpeg_comes_out_rotated(tmp_path, astronaut):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.fromarray(astronaut).save(tmp_path / "r.jpg", exif=exif, quality=95)
    stored = np.asarray(Image.open(tmp_path / "r.jpg").convert("RGB"))  # as decoded, sideways
    assert stored.shape == astronaut.shape
    np.testing.assert_array_equal(pixels(tmp_path / "r.jpg"), np.rot90(stored, -1))


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "a.gif").n_frames == 3
    np.testing.assert_array_equal(pixels(tmp_path / "a.gif"), np.broadcast_to([255, 0, 0], (6, 8, 3)))


def test_plain_8_bit_files_are_unchanged(tmp_path, astronaut, camera):
    Image.fromarray(astronaut).save(tmp_path / "a.png")
    np.testing.assert_array_equal(pixels(tmp_path / "a.png"), astronaut)
    Image.fromarray(camera).save(tmp_path / "c.bmp")
    np.testing.assert_array_equal(pixels(tmp_path / "c.bmp"), gray3(camera))


def assert_refused(path: Path, problem: str) -> None:
    with pytest.raises(DataError) as caught:
        open_image(path)
    message = str(caught.value)
    assert str(path) in message and problem in message and "\n" not in message, message


def test_truncated_files_are_refused(tmp_path, astronaut):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name in ("t.jpg", "t.png"):
        Image.fromarray(astronaut).save(tmp_path / name)
        content = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(content[: len(content) // 2])
        assert_refused(tmp_path / name, "truncated")


def test_corrupt_files_are_refused(tmp_path, astronaut):
    Image.fromarray(astronaut).save(tmp_path / "c.png")
    content = bytearray((tmp_path / "c.png").read_bytes())
    content[len(content) // 2 : len(content) // 2 + 64] = bytes(64)  # damaged compressed data
    (tmp_path / "c.png").write_bytes(bytes(content))
    assert_refused(tmp_path / "c.png", "corrupt")
    (tmp_path / "text.jpg").write_text("not an image\n")
    assert_refused(tmp_path / "text.jpg", "not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    assert_refused(tmp_path / "empty.png", "empty")


def test_zero_size_images_are_refused(tmp_path):
    assert_refused(write_png(tmp_path / "w0.png", np.zeros((3, 1), np.uint8), size=(0, 3)), "zero size")
    assert_refused(write_png(tmp_path / "h0.png", np.zeros((1, 3), np.uint8), size=(3, 0)), "zero size")


def test_missing_file_and_directory_name_the_real_reason(tmp_path):
    assert_refused(tmp_path / "missing.png", "no such file")
    (tmp_path / "folder.png").mkdir()
    assert_refused(tmp_path / "folder.png", "is a directory")


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    # Only the header claims 100000x100000 pixels: the refusal must come before any decoding.
    assert_refused(write_png(tmp_path / "bomb.png", np.zeros((1, 1), np.uint8), (100_000, 100_000)), "bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (30, 30)).save(tmp_path / "small.png")
    Image.new("L", (40, 40)).save(tmp_path / "large.png")  # within Pillow's warning-only zone
    assert pixels(tmp_path / "small.png").shape == (30, 30, 3)
    assert_refused(tmp_path / "large.png", "decompression bomb")


def test_one_list_of_image_suffixes():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"} == set(IMAGE_SUFFIXES)
    assert is_image_file("a/B.JPG") and is_image_file(Path("x.tiff"))
    assert not is_image_file("notes.txt") and not is_image_file("png")
