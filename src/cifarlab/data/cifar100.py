"""CIFAR-100 (the ``cifar100`` dataset): its official binary version -> uint8 tensors.

``cifar-100-binary.tar.gz`` holds ``cifar-100-binary/`` with ``train.bin`` (50,000 records),
``test.bin`` (10,000), ``fine_label_names.txt`` (100 names) and ``coarse_label_names.txt`` (20). A
record is the coarse label byte, the fine label byte and 3,072 pixel bytes (R, G, B planes, 32x32).
``cifar100`` uses the 100 fine labels; ``cifar100:coarse`` the 20 superclasses.

No per-file checksums are published for the binary version: the archive's md5 vouches for a download,
and every file's exact size and every label are checked on each load.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import Dataset, Split, check_class_names, check_dataset, read_records_file
from .cifar10 import locate, parse_records, read_class_names
from .download import ArchiveSpec

RECORD_BYTES = 2 + 3 * 32 * 32
TRAIN_FILE, TEST_FILE = "train.bin", "test.bin"
LABEL_FILES = {"fine": ("fine_label_names.txt", 100, 1), "coarse": ("coarse_label_names.txt", 20, 0)}
ARCHIVE = ArchiveSpec(
    title="CIFAR-100", url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    archive_name="cifar-100-binary.tar.gz", archive_md5="03b5dce01913d631647c71ecec9e9cb8",
    folder="cifar-100-binary",
    file_sizes={TRAIN_FILE: 50_000 * RECORD_BYTES, TEST_FILE: 10_000 * RECORD_BYTES})
HINT = ("Delete the folder to let cifarlab download a fresh copy, or point --data-dir / CIFARLAB_DATA at a good "
        "copy of CIFAR-100's official binary version (cifar-100-binary).")


def _looks_like(path: Path) -> bool:
    return (path / TRAIN_FILE).is_file() and (path / "fine_label_names.txt").is_file()


def read_split(path: Path, labels: str = "fine", max_records: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    names_file, count, index = LABEL_FILES[labels]
    raw = read_records_file(path, RECORD_BYTES, max_records, HINT)
    return parse_records(raw, str(path), label_bytes=2, label_index=index, num_classes=count, hint=HINT)


def load_cifar100(data_dir: str | Path | None = None, labels: str = "fine", download: bool = True,
                  verify: bool = True, url: str | None = None, progress: bool = True,
                  archive: ArchiveSpec = ARCHIVE) -> Dataset:
    """CIFAR-100 as uint8 tensors, with the fine (100) or coarse (20) labels.

    ``archive`` describes the official archive (tests pass a reduced copy of it, served on loopback)."""
    if labels not in LABEL_FILES:
        raise DataError(f"CIFAR-100 labels are 'fine' or 'coarse', not {labels!r}")
    root = locate(archive, _looks_like, data_dir, download, url, progress, hint=HINT)
    if verify:
        archive.verify_folder(root, HINT)
    names_file, count, _ = LABEL_FILES[labels]
    classes = read_class_names(root / names_file, expected=count, hint=HINT)
    check_class_names(classes, str(root / names_file))  # before 180 MB are read
    train_x, train_y = read_split(root / TRAIN_FILE, labels)
    test_x, test_y = read_split(root / TEST_FILE, labels, max_records=10_000)
    ds = Dataset(train=_split(train_x, train_y), test=_split(test_x, test_y), classes=classes, root=root,
                 name="cifar100", spec="cifar100" + (":coarse" if labels == "coarse" else ""),
                 identity={"format": "binary", "labels": labels, "sizes": archive.file_sizes,
                           "archive_md5": archive.archive_md5})
    return check_dataset(ds, str(root))


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def load(arg: str, data_dir=None, download: bool = True, progress: bool = True, image_size: int = 32,
         **options) -> Dataset:
    """The registry's entry: ``cifar100`` (fine labels) or ``cifar100:coarse``."""
    if image_size != 32:
        raise DataError(f"CIFAR images are 32x32; --image-size {image_size} applies to folder datasets only")
    return load_cifar100(data_dir, labels=arg or "fine", download=download, progress=progress)
