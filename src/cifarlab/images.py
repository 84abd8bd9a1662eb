"""Image files -> the uint8 (3, S, S) tensors a model takes (for ``predict``, folder datasets and visualizations).

How a file becomes S x S RGB (S = 32 for CIFAR models), in order:

1. **Checks before decoding.** The file must exist, be a regular file and be at most ``MAX_FILE_BYTES``,
   checked again on the open descriptor (opened without blocking, so a FIFO named ``x.jpg`` is refused
   and never waited on, and the file checked is the file read). Pillow reads only the header first; an
   image over ``MAX_PIXELS`` (width x height) is refused before any pixel is decoded, so a decompression
   bomb (a tiny file claiming gigapixels) costs nothing.
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
5. **Fit to a square**, one of :data:`FITS` (``fit=``; ``load_image`` defaults to ``"crop"``, folder
   datasets to :data:`DEFAULT_FIT`), then **Lanczos** (Pillow's Lanczos widens its kernel when
   shrinking, so it anti-aliases):

   * ``"crop"``: the largest centered square (when the cut-off margin is odd, the right/bottom side
     loses one pixel more), resized to ``size`` x ``size``. A wide picture loses its sides.
   * ``"squish"``: the whole picture resized to ``size`` x ``size``, ignoring its aspect ratio
     (Keras's ``image_dataset_from_directory`` default). Nothing is lost; shapes are stretched.
   * ``"pad"``: resized so that its longer side is ``size`` (aspect kept; the shorter side becomes
     ``max(1, round(short x size / long))``), then the shorter side is padded symmetrically to
     ``size`` with a **reflection** of the picture (numpy ``mode="reflect"``, fastai's default pad
     mode; the bottom/right side gets one row more when the margin is odd; a 1-pixel-thin result is
     padded by repeating its edge). Nothing is lost or stretched; the margins are mirrored content.

   A ``size`` x ``size`` input passes through unchanged with every fit, and a square picture comes out
   the same with every fit.

Every failure raises :class:`cifarlab.errors.ImageError` with the file name (printable: bytes that are not
UTF-8 shown as ``\\xNN``, see :func:`shown`) and the reason.
"""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, short_repr

SIZE = 32
MAX_PIXELS = 50_000_000          # 50 megapixels: any real photo; a bomb claims far more
MAX_FILE_BYTES = 256 * 1024 ** 2  # no plausible photo for a 32x32 classifier is bigger
BACKGROUND = (255, 255, 255)      # transparent pixels are shown on white, as a browser would
RESAMPLE = Image.Resampling.LANCZOS
FITS = ("crop", "squish", "pad")  # how a non-square picture becomes a square (module docstring, step 5)
# The fit a folder dataset uses unless told (--fit). One constant: change it here after measuring
# (bench/make_odd_folder.py writes CIFAR-10 at random non-square sizes to compare the fits on).
DEFAULT_FIT = "crop"
DEFAULT_FIT_WHY = ("measured within noise of pad and squish on real photos (README), and what earlier runs and "
                   "caches used")
LEGACY_FIT = "crop"  # what a run recorded before fits existed used (and CIFAR runs: their images are square)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def load_image(path: str | Path, size: int = SIZE, max_pixels: int = MAX_PIXELS, fit: str = "crop") -> torch.Tensor:
    """Read one image file as a uint8 tensor (3, size, size), converted as the module docstring says."""
    check_fit(fit)
    path = Path(path)
    with _checked_file(path) as f, _open(f, path, max_pixels) as im:
        frame = _decode(im, path)
    rgb = _to_rgb(_upright(frame, path), path)
    square = fit_square(rgb, size, fit)
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def load_images(paths, size: int = SIZE, fit: str = "crop") -> torch.Tensor:
    """Several files -> uint8 (N, 3, size, size); the first bad file raises its ImageError."""
    return torch.stack([load_image(p, size, fit=fit) for p in paths]) if paths else \
        torch.empty(0, 3, size, size, dtype=torch.uint8)


def check_fit(fit: str) -> str:
    if fit not in FITS:
        raise ImageError(f"unknown fit {short_repr(fit)}: use one of {', '.join(FITS)}")
    return fit


def fit_square(im: Image.Image, size: int, fit: str = "crop") -> Image.Image:
    """An RGB picture as ``size`` x ``size``, by ``fit`` (module docstring, step 5)."""
    check_fit(fit)
    w, h = im.size
    if fit == "crop":
        square = center_crop_square(im)
        return square if square.size == (size, size) else square.resize((size, size), RESAMPLE)
    if fit == "squish" or w == h:
        return im if im.size == (size, size) else im.resize((size, size), RESAMPLE)
    return pad_square(im, size)


def pad_square(im: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is ``size`` (aspect kept), then reflect-pad the shorter side to ``size``."""
    w, h = im.size
    long_side, short_side = max(w, h), min(w, h)
    short = min(size, max(1, int(short_side * size / long_side + 0.5)))
    target = (size, short) if w > h else (short, size)
    if im.size != target:
        im = im.resize(target, RESAMPLE)
    margin = size - short
    if not margin:
        return im
    before = margin // 2
    pad = (before, margin - before)
    widths = (pad, (0, 0), (0, 0)) if w > h else ((0, 0), pad, (0, 0))
    mode = "reflect" if short > 1 else "edge"  # reflecting needs 2 rows; one row can only be repeated
    return Image.fromarray(np.pad(np.asarray(im, dtype=np.uint8), widths, mode=mode), "RGB")


def fit_of(dataset: dict | None) -> str:
    """The fit a run's data was prepared with, from a checkpoint's "dataset" entry (``Dataset.describe()``):
    its identity's ``fit``; runs recorded before fits existed, and CIFAR runs, used ``"crop"``."""
    identity = (dataset or {}).get("identity") if isinstance(dataset, dict) else None
    fit = identity.get("fit", LEGACY_FIT) if isinstance(identity, dict) else LEGACY_FIT
    if fit not in FITS:
        raise ImageError(f"the run's data was fitted with {short_repr(fit)}, which this version does not know "
                         f"({', '.join(FITS)})")
    return fit


def header_size(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the file's header, after the same checks as :func:`load_image`; no pixel is
    decoded. Raises ImageError. (EXIF orientation may swap them; the shorter side is the same.)"""
    path = Path(path)
    with _checked_file(path) as f, _open(f, path, max_pixels) as im:
        return im.size


def center_crop_square(im: Image.Image) -> Image.Image:
    """The largest centered square of ``im``."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im if w == h else im.crop((left, top, left + side, top + side))


# ---------------------------------------------------------------------------------------------------
# Steps


def shown(path) -> str:
    """A file name as messages show it: one printable line (``cifarlab.data.base.printable``)."""
    from .data.base import printable

    return printable(str(path))


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{shown(path)}: no such file.") from None
    except OSError as e:
        raise ImageError(f"{shown(path)}: cannot read it ({e.strerror}).") from None
    _check_stat(st, path)
    if not os.access(path, os.R_OK):
        raise ImageError(f"{shown(path)}: no permission to read it.")


def _check_stat(st: os.stat_result, path: Path) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{shown(path)}: is a folder, not an image file.")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{shown(path)}: not a regular file (a device, pipe or socket); give an image file.")
    if st.st_size == 0:
        raise ImageError(f"{shown(path)}: the file is empty, not an image.")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(f"{shown(path)}: {st.st_size / 1024 ** 2:,.0f} MiB is more than the "
                         f"{MAX_FILE_BYTES // 1024 ** 2} MiB an input image may have.")


def _checked_file(path: Path):
    """The file, checked by name (the messages) and then opened without blocking and checked again on the
    descriptor: a file swapped for a FIFO or a huge file in between is refused, never waited on or read."""
    _check_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageError(f"{shown(path)}: cannot read it ({e.strerror}).") from None
    try:
        _check_stat(os.fstat(fd), path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open(f, path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse oversized images before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours is lower and checked just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(f)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{shown(path)}: the image is larger than the {max_pixels:,} pixels allowed; refusing to "
                         f"decode it (possible decompression bomb). Pillow says: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{shown(path)}: not an image file Pillow can read (PNG, JPEG, GIF, BMP, WebP, TIFF, "
                         f"...).") from None
    except Exception as e:  # plugins raise many types (SyntaxError, struct.error, ...) for broken headers
        raise ImageError(f"{shown(path)}: cannot read the image header ({type(e).__name__}: {e}).") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageError(f"{shown(path)}: {w}x{h} = {w * h:,} pixels is more than the {max_pixels:,} allowed; "
                         f"refusing to decode it (possible decompression bomb).")
    if w < 1 or h < 1:
        im.close()
        raise ImageError(f"{shown(path)}: the image has no pixels ({w}x{h}).")
    return im


def _decode(im: Image.Image, path: Path) -> Image.Image:
    """Decode frame 0 fully into memory (the file closes after this)."""
    try:
        im.seek(0)
        im.load()
        return im.copy()  # copy() keeps im.info (the transparency entry _to_rgb looks for)
    except Exception as e:  # truncation raises OSError; other damage raises assorted plugin errors
        raise ImageError(f"{shown(path)}: cannot decode the {im.format or 'image'} data; it is truncated or damaged "
                         f"({type(e).__name__}: {e}).") from None


def _upright(im: Image.Image, path: Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # a malformed EXIF block should not make a usable image unusable
        warnings.warn(f"{shown(path)}: ignoring unreadable EXIF orientation ({type(e).__name__}: {e})", stacklevel=3)
        return im


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    mode = im.mode
    if mode == "F":
        raise ImageError(f"{shown(path)}: a 32-bit floating-point image (mode F) has no agreed 0..255 range; save it "
                         f"as an 8- or 16-bit image.")
    if mode == "LAB":
        raise ImageError(f"{shown(path)}: CIELab images are not supported (Pillow cannot convert them to RGB "
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
        raise ImageError(f"{shown(path)}: cannot convert color mode {mode} to RGB ({e}).") from None


def _wide_gray_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale -> 8-bit RGB by linear scaling, not clipping."""
    values = np.asarray(im).astype(np.float64)
    wide = im.mode in _SIXTEEN_BIT or values.max(initial=0) > 255
    if wide:
        values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
