"""Image files -> uint8 (3, 32, 32): every odd or hostile input is converted as documented or refused."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab import images
from cifarlab.errors import ImageError
from cifarlab.images import load_image, load_images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG written by hand, so a header can claim any size without allocating it."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _solid(mode: str, size, color) -> Image.Image:
    return Image.new(mode, size, color)


def _assert_all(t: torch.Tensor, rgb, tol: int = 0):
    expected = torch.tensor(rgb, dtype=torch.int16).view(3, 1, 1)
    assert t.dtype == torch.uint8 and t.shape == (3, 32, 32)
    assert (t.to(torch.int16) - expected).abs().max() <= tol, t[:, 0, 0]


# ---------------------------------------------------------------------------------------------------
# Converted


def test_rgb_32x32_passes_through_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")
    assert torch.equal(t, torch.from_numpy(pixels).permute(2, 0, 1))


def test_wide_image_is_center_cropped_then_resized(tmp_path):
    # 300x100: red | green | blue thirds; the centered 100x100 square is the green third only.
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100], a[:, 100:200], a[:, 200:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(a).save(tmp_path / "wide.png")
    _assert_all(load_image(tmp_path / "wide.png"), (0, 255, 0))


def test_tall_small_image_is_upscaled(tmp_path):
    _solid("RGB", (5, 17), (10, 20, 30)).save(tmp_path / "tiny.bmp")
    _assert_all(load_image(tmp_path / "tiny.bmp"), (10, 20, 30))


def test_one_pixel_image(tmp_path):
    _solid("RGB", (1, 1), (200, 100, 50)).save(tmp_path / "one.png")
    _assert_all(load_image(tmp_path / "one.png"), (200, 100, 50))


def test_grayscale_goes_to_three_equal_channels(tmp_path):
    _solid("L", (40, 40), 77).save(tmp_path / "g.png")
    _assert_all(load_image(tmp_path / "g.png"), (77, 77, 77))


def test_one_bit_image(tmp_path):
    _solid("1", (32, 32), 1).save(tmp_path / "b.png")
    _assert_all(load_image(tmp_path / "b.png"), (255, 255, 255))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    # 0x8080 is mid-grey in 16 bits; Pillow's own convert("L") would clip it to 255.
    Image.fromarray(np.full((32, 32), 0x8080, np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    _assert_all(load_image(tmp_path / "g16.png"), (128, 128, 128))


def test_sixteen_bit_pgm_opened_as_mode_i_is_scaled(tmp_path):
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(tmp_path / "g16.pgm")
    with Image.open(tmp_path / "g16.pgm") as im:
        assert im.mode == "I"
    _assert_all(load_image(tmp_path / "g16.pgm"), (255, 255, 255))


def test_sixteen_bit_rgb_png(tmp_path):
    row = b"\x00" + np.full((32, 3), 0x4020, ">u2").tobytes()
    (tmp_path / "rgb16.png").write_bytes(_png(32, 32, zlib.compress(row * 32), bit_depth=16, color_type=2))
    _assert_all(load_image(tmp_path / "rgb16.png"), (0x40, 0x40, 0x40))


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((32, 32, 4), np.uint8)
    a[:16] = (255, 0, 0, 0)       # fully transparent red: must not show
    a[16:] = (0, 0, 0, 128)       # half-transparent black on white: mid grey
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")
    assert (t[:, :16] == 255).all()
    assert ((t[:, 16:].to(torch.int16) - 127).abs() <= 1).all()


def test_gray_alpha(tmp_path):
    _solid("LA", (32, 32), (0, 0)).save(tmp_path / "la.png")
    _assert_all(load_image(tmp_path / "la.png"), (255, 255, 255))


def test_palette_image(tmp_path):
    p = Image.new("P", (32, 32), 1)
    p.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    p.save(tmp_path / "p.png")
    _assert_all(load_image(tmp_path / "p.png"), (12, 34, 56))


def test_palette_transparency_gif(tmp_path):
    p = Image.new("P", (32, 32), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (0, 0, 32, 16))  # top half green, bottom half index 0 = transparent
    p.save(tmp_path / "t.gif", transparency=0)
    t = load_image(tmp_path / "t.gif")
    assert (t[:, :16] == torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1)).all()
    assert (t[:, 16:] == 255).all()


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [_solid("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    _assert_all(load_image(tmp_path / "anim.gif"), (255, 0, 0), tol=2)


def test_cmyk_jpeg(tmp_path):
    _solid("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    _assert_all(load_image(tmp_path / "c.jpg"), (255, 0, 0), tol=3)


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_exif_rotated_image_is_turned_upright(tmp_path, ext):
    # Stored 64 wide x 32 high, left half red, right half blue, with "rotate 90 CW to display" (6).
    # Upright it is 32 x 64 with red on top; the centered square is then red over blue.
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32], a[:, 32:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / f"r.{ext}", exif=exif)
    t = load_image(tmp_path / f"r.{ext}").to(torch.int16)
    red, blue = torch.tensor([255, 0, 0]).view(3, 1, 1), torch.tensor([0, 0, 255]).view(3, 1, 1)
    assert (t[:, :12] - red).abs().max() <= 8   # JPEG blurs colors near the edge a little
    assert (t[:, 20:] - blue).abs().max() <= 8


def test_webp_and_tiff(tmp_path):
    _solid("RGB", (48, 40), (0, 128, 255)).save(tmp_path / "x.tiff")
    _assert_all(load_image(tmp_path / "x.tiff"), (0, 128, 255))
    _solid("RGB", (48, 40), (0, 128, 255)).save(tmp_path / "x.webp", lossless=True)
    _assert_all(load_image(tmp_path / "x.webp"), (0, 128, 255))


def test_extension_does_not_matter(tmp_path):
    _solid("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "really_a_png.jpg", format="PNG")
    _assert_all(load_image(tmp_path / "really_a_png.jpg"), (1, 2, 3))


def test_load_images_stacks(tmp_path):
    for i in range(3):
        _solid("RGB", (32 + i, 32), (i, i, i)).save(tmp_path / f"{i}.png")
    batch = load_images([tmp_path / f"{i}.png" for i in range(3)])
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.uint8
    assert load_images([]).shape == (0, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------
# Refused, with the file named


def _refused(path, *fragments):
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    _refused(tmp_path / "nope.png", "no such file")


def test_folder(tmp_path):
    _refused(tmp_path, "is a folder")


def test_empty_file(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    _refused(tmp_path / "e.png", "the file is empty")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels\n" * 10)
    _refused(tmp_path / "notes.jpg", "not an image file Pillow can read")


def test_truncated_jpeg(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:1500])
    _refused(tmp_path / "cut.jpg", "cannot decode the JPEG data; it is truncated or damaged", "OSError")


def test_truncated_png(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:2000])
    _refused(tmp_path / "cut.png", "cannot decode the PNG data; it is truncated or damaged")


def test_damaged_png_data(tmp_path):
    (tmp_path / "bad.png").write_bytes(_png(32, 32, b"this is not zlib data"))
    _refused(tmp_path / "bad.png", "cannot decode the PNG data")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # A real zlib bomb: 100 megapixels of zeros in ~100 kB. Refused from the header alone.
    rows = zlib.compress(b"\x00" * 10001 * 10000, 9)
    (tmp_path / "bomb.png").write_bytes(_png(10000, 10000, rows, color_type=0))
    _refused(tmp_path / "bomb.png", "10000x10000 = 100,000,000 pixels is more than the 50,000,000 allowed",
             "decompression bomb")


def test_giant_header_beyond_pillows_own_limit(tmp_path):
    (tmp_path / "huge.png").write_bytes(_png(30000, 30000, zlib.compress(b"\x00" * 10)))
    _refused(tmp_path / "huge.png", "larger than the 50,000,000 pixels allowed", "decompression bomb")


def test_pixel_limit_is_adjustable(tmp_path):
    _solid("RGB", (100, 100), 0).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="10,000 pixels is more than the 9,999 allowed"):
        load_image(tmp_path / "a.png", max_pixels=9_999)


def test_oversized_file(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1000)
    (tmp_path / "big.png").write_bytes(b"\x00" * 5000)
    _refused(tmp_path / "big.png", "MiB is more than the")


def test_float_image_refused(tmp_path):
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(tmp_path / "f.tiff")
    _refused(tmp_path / "f.tiff", "floating-point image (mode F)")


def test_lab_image_refused(tmp_path):
    _solid("LAB", (32, 32), (50, 0, 0)).save(tmp_path / "lab.tiff")
    _refused(tmp_path / "lab.tiff", "CIELab images are not supported")

