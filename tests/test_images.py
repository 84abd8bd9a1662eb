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



# ---------------------------------------------------------------------------------------------------
# Fits: how a non-square picture becomes the square the net takes

RED, BLUE = (255, 0, 0), (0, 0, 255)
PHOTOS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "photos" / "hymenoptera_data"


def _halves(tmp_path, width: int = 40, height: int = 20):
    """A wide picture: red left half, blue right half (lossless PNG)."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, :width // 2], a[:, width // 2:] = RED, BLUE
    Image.fromarray(a).save(tmp_path / "halves.png")
    return tmp_path / "halves.png", a


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def _near(region: np.ndarray, rgb, tol: int = 1) -> bool:
    """Every pixel of ``region`` within ``tol`` of ``rgb`` (Lanczos rings by a level or two near an edge)."""
    return bool((np.abs(region.astype(np.int16) - np.array(rgb, np.int16)) <= tol).all())


def _old_center_crop(path, size: int) -> torch.Tensor:
    """What load_image did before fits existed, written out with Pillow alone (an RGB file, no EXIF)."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = im.crop((left, top, left + side, top + side))
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)


def test_fits_are_named_and_checked():
    assert images.FITS == ("crop", "squish", "pad") and images.DEFAULT_FIT in images.FITS
    with pytest.raises(ImageError, match="unknown fit 'stretch': use one of crop, squish, pad"):
        images.check_fit("stretch")


def test_unknown_fit_is_refused_before_reading(tmp_path):
    with pytest.raises(ImageError, match="unknown fit 'zoom'"):
        load_image(tmp_path / "not-even-there.png", 20, fit="zoom")


def test_crop_keeps_only_the_middle(tmp_path):
    path, a = _halves(tmp_path)
    t = load_image(path, 20, fit="crop")  # the centered 20x20: columns 10..29, no resizing
    assert np.array_equal(_hwc(t), a[:, 10:30])
    assert (_hwc(t)[:, :10] == RED).all() and (_hwc(t)[:, 10:] == BLUE).all()


def test_crop_is_the_default_and_bit_identical_to_the_old_center_crop(tmp_path):
    rng = np.random.default_rng(1)
    for w, h in ((40, 20), (33, 50), (300, 100), (7, 64), (32, 32)):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{w}x{h}.png")
        for size in (16, 32, 64):
            expected = _old_center_crop(tmp_path / f"{w}x{h}.png", size)
            assert torch.equal(load_image(tmp_path / f"{w}x{h}.png", size), expected)
            assert torch.equal(load_image(tmp_path / f"{w}x{h}.png", size, fit="crop"), expected)


def test_crop_is_bit_identical_on_real_photos():
    jpegs = sorted((PHOTOS / "train" / "ants").glob("*.jpg"))[:6]
    assert jpegs, f"the real photos are needed at {PHOTOS}"
    for path in jpegs:
        with Image.open(path) as im:
            assert not im.getexif().get(0x0112, 1) > 1  # upright already: the reference ignores EXIF
        for size in (32, 64):
            assert torch.equal(load_image(path, size, fit="crop"), _old_center_crop(path, size))


def test_squish_keeps_all_of_it_stretched(tmp_path):
    path, a = _halves(tmp_path)
    t = _hwc(load_image(path, 20, fit="squish"))  # 40x20 -> 20x20: each half becomes 10 columns
    assert t.shape == (20, 20, 3)
    assert _near(t[:, :9], RED) and _near(t[:, 11:], BLUE)  # each colour in its half (Lanczos rings a level)
    assert (t == t[:1]).all()  # every row the same: nothing was cut or padded vertically
    expected = np.asarray(Image.fromarray(a).resize((20, 20), Image.Resampling.LANCZOS))
    assert np.array_equal(t, expected)


def test_pad_keeps_all_of_it_with_reflected_rows(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    a[:, :20, 1:] = 0  # a red-ish left half...
    a[:, 20:, :2] = 0  # ...and a blue-ish right half, with content that changes row by row
    Image.fromarray(a).save(tmp_path / "wide.png")
    t = _hwc(load_image(tmp_path / "wide.png", 20, fit="pad"))
    content = np.asarray(Image.fromarray(a).resize((20, 10), Image.Resampling.LANCZOS))  # longer side -> 20
    assert t.shape == (20, 20, 3)
    assert np.array_equal(t[5:15], content)  # the whole picture, 5 rows of margin above and below
    assert np.array_equal(t[:5], content[5:0:-1]) and np.array_equal(t[15:], content[-2:-7:-1])  # mirrored
    assert t[:, :9, 0].mean() > 4 * t[:, :9, 2].mean() and t[:, 11:, 2].mean() > 4 * t[:, 11:, 0].mean()
    # The red|blue halves: every row is the same, so the margins are too.
    path, _ = _halves(tmp_path)
    halves = _hwc(load_image(path, 20, fit="pad"))
    assert _near(halves[:, :9], RED) and _near(halves[:, 11:], BLUE) and (halves == halves[:1]).all()


def test_pad_of_a_tall_picture_pads_columns_and_an_odd_margin_goes_bottom_right(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (40, 14, 3), dtype=np.uint8)  # 14 wide, 40 tall -> 7 x 20, margin 13
    Image.fromarray(a).save(tmp_path / "tall.png")
    t = _hwc(load_image(tmp_path / "tall.png", 20, fit="pad"))
    content = np.asarray(Image.fromarray(a).resize((7, 20), Image.Resampling.LANCZOS))
    assert np.array_equal(t, np.pad(content, ((0, 0), (6, 7), (0, 0)), mode="reflect"))
    assert np.array_equal(t[:, 6:13], content)


def test_pad_of_a_one_pixel_line_repeats_its_edge(tmp_path):
    rng = np.random.default_rng(4)
    line = rng.integers(0, 256, (1, 100, 3), dtype=np.uint8)  # 100x1 -> 32x1: nothing to reflect
    Image.fromarray(line).save(tmp_path / "line.png")
    t = _hwc(load_image(tmp_path / "line.png", 32, fit="pad"))
    assert t.shape == (32, 32, 3) and (t == t[16:17]).all()
    assert np.array_equal(t[16], np.asarray(Image.fromarray(line).resize((32, 1), Image.Resampling.LANCZOS))[0])
    Image.fromarray(line.transpose(1, 0, 2)).save(tmp_path / "column.png")  # and standing up
    t = _hwc(load_image(tmp_path / "column.png", 32, fit="pad"))
    assert (t == t[:, 16:17]).all()


@pytest.mark.parametrize("fit", images.FITS)
def test_every_fit_passes_a_right_sized_picture_through_and_agrees_on_squares(tmp_path, fit):
    pixels = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    assert torch.equal(load_image(tmp_path / "a.png", fit=fit), torch.from_numpy(pixels).permute(2, 0, 1))
    big = np.random.default_rng(6).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "square.png")
    assert torch.equal(load_image(tmp_path / "square.png", 32, fit=fit), load_image(tmp_path / "square.png", 32))


@pytest.mark.parametrize("fit", images.FITS)
def test_every_fit_keeps_the_checks_and_conversions(tmp_path, fit):
    Image.new("RGBA", (40, 20), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent -> white
    t = load_image(tmp_path / "clear.png", 16, fit=fit)
    assert t.shape == (3, 16, 16) and (t == 255).all()
    with pytest.raises(ImageError, match="possible decompression bomb"):
        (tmp_path / "bomb.png").write_bytes(_png(100_000, 100_000, zlib.compress(b"\0" * 1024)))
        load_image(tmp_path / "bomb.png", fit=fit)
    assert load_images([tmp_path / "clear.png"] * 2, 16, fit=fit).shape == (2, 3, 16, 16)


def test_real_photos_in_every_fit():
    path = PHOTOS / "train" / "ants" / "ant photos.jpg"  # a name with a space
    gif = next((PHOTOS / "train").rglob("*.gif"))
    for p in (path, gif):
        out = {fit: load_image(p, 64, fit=fit) for fit in images.FITS}
        assert all(t.shape == (3, 64, 64) and t.dtype == torch.uint8 for t in out.values())
        with Image.open(p) as im:
            square = im.size[0] == im.size[1]
        assert square or len({t.numpy().tobytes() for t in out.values()}) == 3  # three different pictures


def test_fit_of_a_checkpoints_dataset_entry():
    assert images.fit_of(None) == images.fit_of({}) == "crop"
    assert images.fit_of({"spec": "cifar10", "identity": {"format": "binary"}}) == "crop"  # CIFAR, old runs
    assert images.fit_of({"identity": {"fit": "pad"}}) == "pad"
    assert images.fit_of({"identity": None}) == "crop"
    with pytest.raises(ImageError, match="fitted with 'warp'"):
        images.fit_of({"identity": {"fit": "warp"}})


def test_header_size_reads_no_pixels(tmp_path):
    (tmp_path / "claims.png").write_bytes(_png(300, 200, b"not even zlib"))  # the pixel data is garbage
    assert images.header_size(tmp_path / "claims.png") == (300, 200)
    with pytest.raises(ImageError, match="possible decompression bomb"):
        (tmp_path / "bomb.png").write_bytes(_png(100_000, 100_000, b""))
        images.header_size(tmp_path / "bomb.png")
