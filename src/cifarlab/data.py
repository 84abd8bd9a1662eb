"""CIFAR-10 on disk -> uint8 tensors.

Reads the official *binary version* (``cifar-10-batches-bin``) with numpy: each record is one label
byte and 3,072 pixel bytes (R, G, B planes, row-major 32x32). No pickle is involved. The *python
version* (as cached by Keras and torchvision) is accepted too, through a restricted unpickler that
only rebuilds plain containers and numpy arrays (see :mod:`cifarlab.safe_pickle`).

Resolution order for the data folder: explicit argument, ``$CIFARLAB_DATA``, the cache folder,
else a verified download into the cache (see :mod:`cifarlab.download`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .fsutil import atomic_write_json

BIN_DIRNAME = "cifar-10-batches-bin"
PY_DIRNAME = "cifar-10-batches-py"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILES = ["test_batch.bin"]
META_FILE = "batches.meta.txt"
# The official per-file md5s (the same the public loaders check).
FILE_MD5 = {
    "batches.meta.txt": "728051cd483f366e254dddb25bead8b3",
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
RECORD_BYTES = 1 + 3 * 32 * 32
NUM_CLASSES = 10
# Mean and std of the training set per channel, in 0..1 units (computed from the real data; the
# tests check these against the files).
CIFAR10_MEAN = (0.4913997, 0.4821584, 0.4465309)
CIFAR10_STD = (0.2470322, 0.2434851, 0.2615878)

DOWNLOAD_HINT = (
    "Delete the folder to let cifarlab download a fresh copy, or point --data-dir / CIFARLAB_DATA at a "
    "good copy of the official binary version."
)


@dataclass
class Split:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass
class CIFAR10:
    train: Split
    test: Split
    classes: list[str]
    root: Path | None = None


def cache_dir() -> Path:
    """Where downloads and verification stamps live (``$CIFARLAB_CACHE`` overrides)."""
    env = os.environ.get("CIFARLAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifarlab"


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Reading records


def parse_records(raw: bytes | np.ndarray, source: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """Parse binary-version records into (images uint8 N,3,32,32; labels uint8 N).

    Raises :class:`DataError` naming ``source`` for a length that is not a whole number of records
    or a label outside 0..9.
    """
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    if buf.size == 0 or buf.size % RECORD_BYTES:
        raise DataError(
            f"{source}: {buf.size:,} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 records "
            f"(the file is truncated or not CIFAR-10's binary version). {DOWNLOAD_HINT}"
        )
    records = buf.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].copy()
    if labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(
            f"{source}: record {bad} has label {labels[bad]}, expected 0..9. {DOWNLOAD_HINT}"
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing. {DOWNLOAD_HINT}") from None
    return parse_records(raw, str(path))


def read_class_names(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing. {DOWNLOAD_HINT}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected one class name per line.") from None
    names = [n for n in names if n]
    if len(names) != NUM_CLASSES:
        raise DataError(f"{path}: expected {NUM_CLASSES} class names, found {len(names)}.")
    return names


# ---------------------------------------------------------------------------------------------------
# Verification (once per file version, remembered in the cache)


def _stamp_path() -> Path:
    return cache_dir() / "verified.json"


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def verify_folder(root: Path, files: dict[str, str] = FILE_MD5, remember: bool = True) -> None:
    """Check every file's md5 against the official value; remember files that passed.

    A file is re-hashed only when its path, size or modification time changed since it last passed,
    so the 177 MB are hashed once per machine rather than on every run.
    """
    root = Path(root)
    stamp_file = _stamp_path()
    try:
        stamps = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
        if not isinstance(stamps, dict):
            stamps = {}
    except (OSError, ValueError):
        stamps = {}  # a damaged stamp file only costs a re-hash
    changed = False
    for name, expected in files.items():
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: file is missing from the CIFAR-10 folder. {DOWNLOAD_HINT}")
        key = _file_key(path)
        if stamps.get(key) == expected:
            continue
        actual = md5_of(path)
        if actual != expected:
            raise DataError(
                f"{path}: md5 is {actual}, expected {expected} (the file is damaged or altered). "
                f"{DOWNLOAD_HINT}"
            )
        stamps[key] = expected
        changed = True
    if changed and remember:
        try:
            atomic_write_json(stamp_file, stamps)
        except OSError:
            pass  # an unwritable cache only costs a re-hash next time


# ---------------------------------------------------------------------------------------------------
# Finding the folder


def _find_in(candidate: Path) -> Path | None:
    """Accept a ``cifar-10-batches-bin`` (or ``-py``) folder, or a folder holding one."""
    if (candidate / "data_batch_1.bin").is_file() or (candidate / "data_batch_1").is_file():
        return candidate
    for sub in (BIN_DIRNAME, PY_DIRNAME):
        if (candidate / sub).is_dir():
            return candidate / sub
    return None


def resolve_data_dir(data_dir: str | Path | None = None, download: bool = True, url: str | None = None,
                     progress: bool = True) -> Path:
    """Find the CIFAR-10 folder: argument, ``$CIFARLAB_DATA``, cache, else download into the cache."""
    for origin, value in (("--data-dir", data_dir), ("CIFARLAB_DATA", os.environ.get("CIFARLAB_DATA"))):
        if not value:
            continue
        path = Path(value).expanduser()
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            from .download import extract_archive_into_cache

            return extract_archive_into_cache(path, cache_dir(), expected_md5=None)
        if not path.exists():
            raise DataError(f"{origin}={path}: no such file or folder. Expected a {BIN_DIRNAME} folder, "
                            f"its parent, or {ARCHIVE_NAME}.")
        found = _find_in(path)
        if found is None:
            raise DataError(f"{origin}={path}: no CIFAR-10 files there. Expected a {BIN_DIRNAME} folder "
                            f"(data_batch_1.bin .. test_batch.bin), its parent, or {ARCHIVE_NAME}.")
        return found
    found = _find_in(cache_dir())
    if found is not None:
        return found
    if not download:
        raise DataError(f"CIFAR-10 not found: pass --data-dir, set CIFARLAB_DATA, or allow the download "
                        f"into {cache_dir()}.")
    from .download import fetch_cifar10

    return fetch_cifar10(cache_dir(), url=url or os.environ.get("CIFARLAB_URL") or ARCHIVE_URL,
                         progress=progress)


def load_cifar10(data_dir: str | Path | None = None, download: bool = True, verify: bool = True,
                 url: str | None = None, progress: bool = True) -> CIFAR10:
    """Load the whole dataset as uint8 tensors (about 184 MB in memory)."""
    root = resolve_data_dir(data_dir, download=download, url=url, progress=progress)
    if root.name == PY_DIRNAME or (root / "data_batch_1").is_file():
        from .safe_pickle import load_python_version

        return load_python_version(root)
    if verify:
        verify_folder(root)
    train = [read_bin(root / name) for name in TRAIN_FILES]
    test = read_bin(root / TEST_FILES[0])
    return CIFAR10(
        train=_to_split(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        test=_to_split(*test),
        classes=read_class_names(root / META_FILE),
        root=root,
    )


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def holdout_split(train: Split, n_val: int, seed: int = 0) -> tuple[Split, Split]:
    """Hold out ``n_val`` training images as a validation set (a seeded random choice)."""
    if not 0 < n_val < len(train):
        raise ValueError(f"--val-split must be between 1 and {len(train) - 1}, got {n_val}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[n_val:]), train.subset(order[:n_val])
