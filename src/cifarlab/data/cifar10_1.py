"""CIFAR-10.1 v6 (the ``cifar10.1`` dataset): 2,000 new test images for CIFAR-10 classifiers.

Recht, Roelofs, Schmidt, Shankar (2018), "Do CIFAR-10 Classifiers Generalize to CIFAR-10?": images
collected and labelled the way CIFAR-10's were, 200 per class, to measure how much accuracy survives a
small distribution shift. Evaluation only: ``cifarlab evaluate RUN --on cifar10.1``.

Two numpy files from the authors' repository, each checked against its published sha256 before use and
read with ``allow_pickle=False`` after checking the header (dtype, shape) and the file size, so neither
code nor a huge allocation can come out of them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import Dataset, Split, cache_dir, check_dataset, empty_split, sha256_of, user_path
from .download import download_file

FOLDER = "cifar10.1"
BASE_URL = "https://raw.githubusercontent.com/modestyachts/CIFAR-10.1/master/datasets/"
URL_ENV = "CIFARLAB_CIFAR10_1_URL"  # a mirror: the folder URL that holds the two files
FILES = {  # name -> sha256 published with the issue that asked for this set
    "cifar10.1_v6_data.npy": "2997188e5816f5bd545dc77771b6227828c28146049fcecf3fa10775474cacc6",
    "cifar10.1_v6_labels.npy": "ae40beda001693674edc94d925ee8268cfe68905f8f9aff800c8dcdfcd6c9448",
}
DATA_FILE, LABELS_FILE = sorted(FILES)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MAX_IMAGES = 100_000
MAX_NPY_BYTES = MAX_IMAGES * 3072 + 4096  # the images file at most; checked before a file is hashed or read
HINT = (f"Delete the folder to let cifarlab download a fresh copy, or point --data-dir at a folder holding "
        f"{DATA_FILE} and {LABELS_FILE}.")


def load(arg: str, data_dir=None, download: bool = True, progress: bool = True, image_size: int = 32,
         files: dict[str, str] = FILES, url: str | None = None, **options) -> Dataset:
    """The registry's entry: ``cifar10.1`` (version 6, the authors' recommended one)."""
    if arg not in ("", "v6"):
        raise DataError(f"cifar10.1 has version v6 only, not {arg!r}")
    if image_size != 32:
        raise DataError(f"CIFAR-10.1 images are 32x32; --image-size {image_size} applies to folder datasets only")
    root = _locate(data_dir, download, url, progress, files)
    for name, expected in files.items():
        actual = sha256_of(root / name, max_bytes=MAX_NPY_BYTES)  # a FIFO or a sparse file: refused, not read
        if actual != expected:
            raise DataError(f"{root / name}: sha256 is {actual}, expected {expected} (damaged or not CIFAR-10.1 "
                            f"v6). {HINT}")
    images = _read_npy(root / DATA_FILE, np.uint8, lambda s: len(s) == 4 and s[1:] == (32, 32, 3))
    labels = _read_npy(root / LABELS_FILE, None, lambda s: len(s) == 1)
    if len(images) != len(labels) or not 0 < len(images) <= MAX_IMAGES:
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{root / LABELS_FILE}: labels must be integers 0..9")
    test = Split(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                 torch.from_numpy(labels.astype(np.int64)))
    ds = Dataset(train=empty_split((3, 32, 32)), test=test, classes=list(CLASSES), root=root, name="cifar10.1",
                 spec="cifar10.1", identity={"version": "v6", "sha256": dict(files)}, eval_only=True)
    return check_dataset(ds, str(root))


def _read_npy(path: Path, dtype, shape_ok) -> np.ndarray:
    """An .npy file: regular, bounded in size, header checked before the data is read, no pickle."""
    if not path.is_file() or path.stat().st_size > MAX_NPY_BYTES:
        raise DataError(f"{path}: missing, not a regular file, or too large for CIFAR-10.1. {HINT}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, file_dtype = read_header(f)
    except (ValueError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: not a numpy .npy file ({e}). {HINT}") from None
    if file_dtype.hasobject or (dtype is not None and file_dtype != dtype) or not shape_ok(shape):
        raise DataError(f"{path}: holds {file_dtype} {shape}, not what CIFAR-10.1 stores. {HINT}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read it ({e}). {HINT}") from None


def _has_files(folder: Path, files) -> bool:
    return all((folder / name).is_file() for name in files)


def _locate(data_dir, download: bool, url: str | None, progress: bool, files) -> Path:
    """``data_dir`` (must hold the files), ``$CIFARLAB_DATA`` (or its cifar10.1/ subfolder), the cache, else
    a download into the cache."""
    if data_dir:
        path = user_path(data_dir, "--data-dir=")
        for candidate in (path, path / FOLDER):
            if _has_files(candidate, files):
                return candidate
        raise DataError(f"--data-dir={path}: no {DATA_FILE} and {LABELS_FILE} there.")
    env = os.environ.get("CIFARLAB_DATA")
    if env:
        env = user_path(env, "CIFARLAB_DATA=")
        for candidate in (env, env / FOLDER, env.parent / FOLDER):
            if _has_files(candidate, files):
                return candidate
    target = cache_dir() / FOLDER
    if _has_files(target, files):
        return target
    if not download:
        raise DataError(f"CIFAR-10.1 not found: pass --data-dir, or allow the download into {target}.")
    base = (url or os.environ.get(URL_ENV) or BASE_URL).rstrip("/") + "/"
    target.mkdir(parents=True, exist_ok=True)
    for name, expected in files.items():
        _fetch_verified(base + name, target / name, expected, progress)
    return target


def _fetch_verified(url: str, dest: Path, sha256: str, progress: bool) -> None:
    """Download into a temporary name, check the sha256, then rename: a bad file never lands in the cache."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".unverified", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        download_file(url, tmp, expected_md5=None, progress=progress)
        actual = sha256_of(tmp)
        if actual != sha256:
            raise DataError(f"{url}: sha256 of the download is {actual}, expected {sha256} (corrupt or not "
                            f"CIFAR-10.1 v6); nothing was kept. Check {URL_ENV} or the network.")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
