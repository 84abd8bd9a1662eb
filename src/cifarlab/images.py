"""Image files -> the uint8 (3, 32, 32) tensors a CIFAR-10 model takes (for ``predict`` and visualizations).

How a file becomes 32x32 RGB, in order:

1. **Checks before decoding.** The file must exist, be a regular file and be at most ``MAX_FILE_BYTES``.
   Pillow reads only the header first; an image over ``MAX_PIXELS`` (width x height) is refused before
   any pixel is decoded, so a decompression bomb (a tiny file claiming gigapixels) costs nothing.
2. **Decode** the first frame (animated GIF/WebP/multi-page TIFF: frame 0). Truncated or damaged data
   is refused rather than padded with grey (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off).
3. **EXIF orientation** is applied (``ImageOps.exif_transpose``), so a phone photo is upright.
4. **Color mode -> 8-bit RGB.**
   grayscale (``L``, ``1``) is copied to R, G and B; palette (``P``) is expanded;
   16-bit grayscale (``I;16*``) is scaled linearly 0..65535 -> 0..255 (Pillow's own conversion would
   clip everything above 255 to white); 32-bit integer ``I`` (e.g. a 16-bit PGM) is scaled the same
   way when any value exceeds 255, else taken as 0..255; 16-bit RGB(A) PNGs are already reduced to
   8 bits by Pillow (high byte); CMYK and YCbCr use Pillow's conversion;
   **transparency** (RGBA, LA, PA, or a palette/colour-key ``transparency`` entry) is composited onto
   an opaque **white** background (``BACKGROUND``); floating-point (``F``) and CIELab images are refused.
   Embedded ICC profiles are not applied: values are taken as sRGB.
5. **Center crop to a square** (the largest centered square; when the cut-off margin is odd, the
   right/bottom side loses one pixel more), then **resize to 32x32 with Lanczos** (Pillow's Lanczos
   widens its kernel when shrinking, so it anti-aliases). A 32x32 input passes through unchanged.

Every failure raises :class:`cifarlab.errors.ImageError` with the file name and the reason.
"""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

SIZE = 32
MAX_PIXELS = 50_000_000          # 50 megapixels: any real photo; a bomb claims far more
MAX_FILE_BYTES = 256 * 1024 ** 2  # no plausible photo for a 32x32 classifier is bigger
BACKGROUND = (255, 255, 255)      # transparent pixels are shown on white, as a browser would
RESAMPLE = Image.Resampling.LANCZOS
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def load_image(path: str | Path, size: int = SIZE, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read one image file as a uint8 tensor (3, size, size), converted as the module docstring says."""
    path = Path(path)
    _check_file(path)
    with _open(path, max_pixels) as im:
        frame = _decode(im, path)
    rgb = _to_rgb(_upright(frame, path), path)
    square = center_crop_square(rgb)
    if square.size != (size, size):
        square = square.resize((size, size), RESAMPLE)
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def load_images(paths, size: int = SIZE) -> torch.Tensor:
    """Several files -> uint8 (N, 3, size, size); the first bad file raises its ImageError."""
    return torch.stack([load_image(p, size) for p in paths]) if paths else torch.empty(0, 3, size, size,
                                                                                         dtype=torch.uint8)


def center_crop_square(im: Image.Image) -> Image.Image:
    """The largest centered square of ``im``."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im if w == h else im.crop((left, top, left + side, top + side))


# ---------------------------------------------------------------------------------------------------
# Steps


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file.") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read it ({e.strerror}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a folder, not an image file.")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file (a device, pipe or socket); give an image file.")
    if st.st_size == 0:
        raise ImageError(f"{path}: the file is empty, not an image.")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(f"{path}: {st.st_size / 1024 ** 2:,.0f} MiB is more than the "
                         f"{MAX_FILE_BYTES // 1024 ** 2} MiB an input image may have.")
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path}: no permission to read it.")


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse oversized images before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours is lower and checked just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: the image is larger than the {max_pixels:,} pixels allowed; refusing to "
                         f"decode it (possible decompression bomb). Pillow says: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read (PNG, JPEG, GIF, BMP, WebP, TIFF, ...).") \
            from None
    except Exception as e:  # plugins raise many types (SyntaxError, struct.error, ...) for broken headers
        raise ImageError(f"{path}: cannot read the image header ({type(e).__name__}: {e}).") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageError(f"{path}: {w}x{h} = {w * h:,} pixels is more than the {max_pixels:,} allowed; refusing "
                         f"to decode it (possible decompression bomb).")
    if w < 1 or h < 1:
        im.close()
        raise ImageError(f"{path}: the image has no pixels ({w}x{h}).")
    return im


def _decode(im: Image.Image, path: Path) -> Image.Image:
    """Decode frame 0 fully into memory (the file closes after this)."""
    try:
        im.seek(0)
        im.load()
        return im.copy()  # copy() keeps im.info (the transparency entry _to_rgb looks for)
    except Exception as e:  # truncation raises OSError; other damage raises assorted plugin errors
        raise ImageError(f"{path}: cannot decode the {im.format or 'image'} data; it is truncated or damaged "
                         f"({type(e).__name__}: {e}).") from None


def _upright(im: Image.Image, path: Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # a malformed EXIF block should not make a usable image unusable
        warnings.warn(f"{path}: ignoring unreadable EXIF orientation ({type(e).__name__}: {e})", stacklevel=3)
        return im


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    mode = im.mode
    if mode == "F":
        raise ImageError(f"{path}: a 32-bit floating-point image (mode F) has no agreed 0..255 range; save it "
                         f"as an 8- or 16-bit image.")
    if mode == "LAB":
        raise ImageError(f"{path}: CIELab images are not supported (Pillow cannot convert them to RGB "
                         f"correctly); save it as RGB.")
    if mode in _SIXTEEN_BIT or mode == "I":
        return _wide_gray_to_rgb(im)
    try:
        if mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", im.size, BACKGROUND + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return im if mode == "RGB" else im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{path}: cannot convert color mode {mode} to RGB ({e}).") from None


def _wide_gray_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale -> 8-bit RGB by linear scaling, not clipping."""
    values = np.asarray(im).astype(np.float64)
    wide = im.mode in _SIXTEEN_BIT or values.max(initial=0) > 255
    if wide:
        values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
