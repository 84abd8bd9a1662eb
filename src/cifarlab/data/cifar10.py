"""CIFAR-10 (the ``cifar10`` dataset): its official binary version -> uint8 tensors.

Reads ``cifar-10-batches-bin`` with numpy: each record is one label byte and 3,072 pixel bytes (R, G, B
planes, row-major 32x32). No pickle is involved. The *python version* (as cached by Keras and
torchvision) is accepted too, through a restricted unpickler that only rebuilds plain containers and
numpy arrays (see :mod:`cifarlab.data.safe_pickle`), and its files are checked against their md5s too.

Where the files are: ``--data-dir``, ``$CIFARLAB_DATA``, the cache, else a verified download into the
cache (:func:`locate`, shared with CIFAR-100).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import Dataset, Split, cache_dir, check_dataset, md5_of, read_records_file, read_small_text, \
    user_path, verify_files
from .download import ArchiveSpec, extract_archive_into_cache, fetch

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
# The python version's md5s, as torchvision lists them.
PY_FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
RECORD_BYTES = 1 + 3 * 32 * 32
NUM_CLASSES = 10
# Mean and std of the training set per channel, in 0..1 units (computed from the real data; the
# tests check these against the files).
CIFAR10_MEAN = (0.4913997, 0.4821584, 0.4465309)
CIFAR10_STD = (0.2470322, 0.2434851, 0.2615878)

ARCHIVE = ArchiveSpec(title="CIFAR-10", url=ARCHIVE_URL, archive_name=ARCHIVE_NAME, archive_md5=ARCHIVE_MD5,
                      folder=BIN_DIRNAME, file_md5=FILE_MD5)

DOWNLOAD_HINT = (
    "Delete the folder to let cifarlab download a fresh copy, or point --data-dir / CIFARLAB_DATA at a "
    "good copy of the official binary version."
)


# ---------------------------------------------------------------------------------------------------
# Reading records


def parse_records(raw: bytes | np.ndarray, source: str = "<bytes>", label_bytes: int = 1, label_index: int = 0,
                  num_classes: int = NUM_CLASSES, hint: str = DOWNLOAD_HINT) -> tuple[np.ndarray, np.ndarray]:
    """Parse binary-version records into (images uint8 N,3,32,32; labels uint8 N).

    A record is ``label_bytes`` label bytes (CIFAR-10: 1; CIFAR-100: coarse, fine) and 3,072 pixel bytes;
    ``label_index`` picks the label. Raises :class:`DataError` naming ``source`` for a length that is not a
    whole number of records or a label outside 0..num_classes-1.
    """
    record = label_bytes + 3 * 32 * 32
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    if buf.size == 0 or buf.size % record:
        raise DataError(
            f"{source}: {buf.size:,} bytes is not a whole number of {record}-byte records "
            f"(the file is truncated or not the official binary version). {hint}"
        )
    records = buf.reshape(-1, record)
    labels = records[:, label_index].copy()
    if labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(f"{source}: record {bad} has label {labels[bad]}, expected 0..{num_classes - 1}. {hint}")
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return parse_records(read_records_file(path, RECORD_BYTES, 50_000, DOWNLOAD_HINT), str(path))


def read_class_names(path: Path, expected: int = NUM_CLASSES, hint: str = DOWNLOAD_HINT) -> list[str]:
    names = [line.strip() for line in read_small_text(path, 64 * 1024, hint).splitlines()]
    names = [n for n in names if n]
    if len(names) != expected:
        raise DataError(f"{path}: expected {expected} class names, found {len(names)}.")
    return names


def verify_folder(root: Path, files: dict[str, str] = FILE_MD5, remember: bool = True) -> None:
    """Check every file's md5 against the official value (remembered once it passed)."""
    verify_files(root, files, DOWNLOAD_HINT, remember=remember)


# ---------------------------------------------------------------------------------------------------
# Finding the folder (shared with CIFAR-100)


def locate(spec: ArchiveSpec, looks_like, data_dir: str | Path | None, download: bool, url: str | None,
           progress: bool, alt_folders: tuple[str, ...] = (), hint: str = DOWNLOAD_HINT) -> Path:
    """Find a dataset's folder: ``data_dir``, ``$CIFARLAB_DATA``, the cache, else download into the cache.

    ``looks_like(path)`` says whether a folder holds the dataset's files. An explicit ``data_dir`` must
    hold the data (or be the official archive): it is used or refused, never silently replaced.
    ``$CIFARLAB_DATA`` may hold several datasets side by side; one it does not hold is looked for further.
    """
    def find_in(candidate: Path) -> Path | None:
        if looks_like(candidate):
            return candidate
        for sub in (spec.folder, *alt_folders):
            if looks_like(candidate / sub):
                return candidate / sub
        return None

    if data_dir:
        path = user_path(data_dir, "--data-dir=")
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            # Only the official archive: the cache may already hold its folder, and a different archive
            # must not be answered with that cached copy.
            return extract_archive_into_cache(path, cache_dir(), spec, check_md5=True, hint=hint)
        if not path.exists():
            raise DataError(f"--data-dir={path}: no such file or folder. Expected a {spec.folder} folder, its "
                            f"parent, or {spec.archive_name}.")
        found = find_in(path)
        if found is None:
            raise DataError(f"--data-dir={path}: no {spec.title} files there. Expected a {spec.folder} folder, "
                            f"its parent, or {spec.archive_name}.")
        return found
    env = os.environ.get("CIFARLAB_DATA")
    if env:
        path = user_path(env, "CIFARLAB_DATA=")
        if not path.exists():
            raise DataError(f"CIFARLAB_DATA={path}: no such file or folder. Expected a {spec.folder} folder or "
                            f"a folder holding it.")
        found = find_in(path) or find_in(path.parent)  # also a sibling: CIFARLAB_DATA=.../cifar-10-batches-bin
        if found is not None:
            return found
    found = find_in(cache_dir())
    if found is not None:
        return found
    if not download:
        raise DataError(f"{spec.title} not found: pass --data-dir, set CIFARLAB_DATA, or allow the download "
                        f"into {cache_dir()}.")
    return fetch(spec, cache_dir(), url=url, progress=progress, hint=hint)


def _looks_like_cifar10(path: Path) -> bool:
    return (path / "data_batch_1.bin").is_file() or (path / "data_batch_1").is_file()


def resolve_data_dir(data_dir: str | Path | None = None, download: bool = True, url: str | None = None,
                     progress: bool = True) -> Path:
    """Find the CIFAR-10 folder (binary or python version)."""
    return locate(ARCHIVE, _looks_like_cifar10, data_dir, download, url, progress, alt_folders=(PY_DIRNAME,))


def fetch_cifar10(cache: Path, url: str, progress: bool = True, expected_md5: str = ARCHIVE_MD5,
                  file_md5: dict[str, str] = FILE_MD5) -> Path:
    """Download the official archive into ``cache`` (verified), unpack it, return the data folder."""
    from dataclasses import replace

    return fetch(replace(ARCHIVE, archive_md5=expected_md5, file_md5=file_md5), cache, url=url, progress=progress,
                 hint=DOWNLOAD_HINT)


def load_cifar10(data_dir: str | Path | None = None, download: bool = True, verify: bool = True,
                 url: str | None = None, progress: bool = True) -> Dataset:
    """Load the whole dataset as uint8 tensors (about 184 MB in memory)."""
    root = resolve_data_dir(data_dir, download=download, url=url, progress=progress)
    if root.name == PY_DIRNAME or (root / "data_batch_1").is_file():
        from .safe_pickle import load_python_version

        if verify:
            verify_files(root, PY_FILE_MD5, DOWNLOAD_HINT)
        ds = load_python_version(root)
        ds.identity = {"format": "python", "md5": PY_FILE_MD5 if verify else "not verified"}
        return check_dataset(ds, str(root))
    if verify:
        verify_folder(root)
    train = [read_bin(root / name) for name in TRAIN_FILES]
    test = read_bin(root / TEST_FILES[0])
    ds = Dataset(
        train=_to_split(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        test=_to_split(*test), classes=read_class_names(root / META_FILE), root=root, name="cifar10",
        spec="cifar10", identity={"format": "binary", "md5": FILE_MD5 if verify else "not verified"})
    return check_dataset(ds, str(root))


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def load(arg: str, data_dir=None, download: bool = True, progress: bool = True, image_size: int = 32,
         **options) -> Dataset:
    """The registry's entry: ``cifar10`` takes no argument."""
    if arg:
        raise DataError(f"dataset 'cifar10' takes no ':{arg}' argument")
    if image_size != 32:
        raise DataError(f"CIFAR images are 32x32; --image-size {image_size} applies to folder datasets only")
    return load_cifar10(data_dir, download=download, progress=progress)
