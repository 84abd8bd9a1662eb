"""What every dataset is made of: uint8 tensors in splits, the classes, where they came from.

A dataset module (``cifar10``, ``cifar100``, ``folder``...) turns files into a :class:`Dataset`; nothing
downstream knows which one it was: models, training, evaluation and visualization take the number of
classes, the class names and the image shape from here, and checkpoints store :meth:`Dataset.describe`.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataError
from ..fsutil import atomic_write_json
from ..validation import MAX_CLASS_NAME  # one bound for the loader and for every reader of a run's classes

MAX_CLASSES = 10_000
MAX_DIGEST_BYTES = 1024 ** 3  # a file checksummed before use: the largest official archive is 170 MB


@dataclass(repr=False)
class Split:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "Split":
        return Split(self.images[index], self.labels[index])

    def __repr__(self) -> str:
        return f"Split({len(self)} images {tuple(self.images.shape[1:])})"


@dataclass(repr=False)
class Dataset:
    """A training and a test split of one image shape, and the names of the classes (label i = classes[i]).

    ``name`` is the registry name it was loaded by (``cifar10``, ``cifar100``, ``folder``); ``spec`` the
    string that loads it again (``folder:/photos``); ``identity`` what makes this data this data (file
    checksums, split seed...), stored with every run so a resume can tell whether the data changed.
    """

    train: Split
    test: Split
    classes: list[str]
    root: Path | None = None
    name: str = "cifar10"
    spec: str = ""
    identity: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)      # things the user should hear (skipped files)
    eval_only: bool = False                             # a test set without training images (CIFAR-10.1)
    files: dict = field(default_factory=dict)           # per split, the source file of each image (folders)

    def __repr__(self) -> str:
        return (f"Dataset({self.spec or self.name!r}: {len(self.train)} train / {len(self.test)} test images "
                f"{tuple(self.image_shape)}, {self.num_classes} classes)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image."""
        return tuple(self.test.images.shape[1:])

    def describe(self) -> dict:
        """What a checkpoint stores about its data (JSON)."""
        return {"name": self.name, "spec": self.spec or self.name, "classes": list(self.classes),
                "image_shape": list(self.image_shape), "train_images": len(self.train),
                "test_images": len(self.test), "identity": dict(self.identity)}

    def with_train(self, train: Split, note: str) -> "Dataset":
        """The same dataset with another training split (a subset): the identity says which."""
        identity = dict(self.identity, train_subset=note)
        return Dataset(train=train, test=self.test, classes=list(self.classes), root=self.root, name=self.name,
                       spec=self.spec, identity=identity, notes=list(self.notes), files={})


def check_dataset(ds: Dataset, source: str) -> Dataset:
    """The invariants every loader promises (cheap; run on every load)."""
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        if split_name == "train" and ds.eval_only and len(split) == 0:
            continue
        x, y = split.images, split.labels
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"{source}: {split_name} images must be uint8 (N, 1 or 3, H, W), not {x.dtype} "
                            f"{tuple(x.shape)}")
        if len(x) != len(y) or len(y) == 0:
            raise DataError(f"{source}: {split_name} split has {len(x)} images and {len(y)} labels")
        if int(y.min()) < 0 or int(y.max()) >= len(ds.classes):
            raise DataError(f"{source}: {split_name} labels must be in 0..{len(ds.classes) - 1}")
    if len(ds.train) and ds.train.images.shape[1:] != ds.test.images.shape[1:]:
        raise DataError(f"{source}: train images are {tuple(ds.train.images.shape[1:])} but test images are "
                        f"{tuple(ds.test.images.shape[1:])}")
    if not 2 <= len(ds.classes) <= MAX_CLASSES or len(set(ds.classes)) != len(ds.classes):
        raise DataError(f"{source}: needs 2..{MAX_CLASSES} distinct class names, found {len(ds.classes)}")
    check_class_names(ds.classes, source)
    return ds


def check_class_names(classes: list[str], source: str) -> None:
    """Every class name is a non-empty string of at most MAX_CLASS_NAME characters: checked when data is
    loaded, before a run starts, with the bound checkpoints are read back with (a run that trained must
    stay readable)."""
    for i, name in enumerate(classes):
        if not isinstance(name, str) or not name:
            raise DataError(f"{source}: class {i} has an empty name; every class needs a name.")
        if len(name) > MAX_CLASS_NAME:
            raise DataError(f"{source}: class {i} is named with {len(name):,} characters ({name[:40]!r}...); a "
                            f"class name may have at most {MAX_CLASS_NAME:,}. Shorten it.")


def printable(name: str) -> str:
    """A file or class name as text that prints, goes into JSON and reads back the same on every system:
    bytes that are not UTF-8 (which the OS decoding keeps as surrogates) become ``\\xNN`` and control
    characters (newline, tab, escape) become ``\\n``, ``\\t``, ``\\x1b``, so a name stays one line.
    Every other name comes back unchanged."""
    text = name
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        try:
            text = os.fsencode(text).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that is not an undecodable byte
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if not any(unicodedata.category(ch) == "Cc" for ch in text):
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" else ch
                   for ch in text)


def user_path(text: str | os.PathLike, what: str) -> Path:
    """A path the user gave (``what``: how it was given, "--data-dir=", "CIFARLAB_CACHE=", "folder:"), with
    ``~`` and ``~user`` expanded; an unknown user is a one-line DataError, not a traceback."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        head = str(text).split("/", 1)[0]
        raise DataError(f"{what}{printable(str(text))}: cannot expand {printable(head)!r} (no such user, or no "
                        f"home folder known); write the path out in full.") from None


def empty_split(image_shape: tuple[int, int, int]) -> Split:
    return Split(torch.empty(0, *image_shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))


def holdout_split(train: Split, n_val: int, seed: int = 0) -> tuple[Split, Split]:
    """Hold out ``n_val`` training images as a validation set (a seeded random choice)."""
    if not 0 < n_val < len(train):
        raise ValueError(f"--val-split must be between 1 and {len(train) - 1}, got {n_val}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[n_val:]), train.subset(order[:n_val])


# ---------------------------------------------------------------------------------------------------
# The cache and file verification (shared by every dataset that has official checksums)


def cache_dir() -> Path:
    """Where downloads, decoded image folders and verification stamps live (``$CIFARLAB_CACHE`` overrides)."""
    env = os.environ.get("CIFARLAB_CACHE")
    if env:
        path = user_path(env, "CIFARLAB_CACHE=")
        blocking = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
        if blocking is not None and not blocking.is_dir():
            where = "is not a folder" if blocking == path else f"is inside {blocking}, which is not a folder"
            raise DataError(f"CIFARLAB_CACHE={path} {where}; point it at a folder (or unset it).")
        return path
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifarlab"


def md5_of(path: Path, chunk: int = 1 << 20, max_bytes: int = MAX_DIGEST_BYTES) -> str:
    return _digest(path, hashlib.md5(), chunk, max_bytes)


def sha256_of(path: Path, chunk: int = 1 << 20, max_bytes: int = MAX_DIGEST_BYTES) -> str:
    return _digest(path, hashlib.sha256(), chunk, max_bytes)


def _digest(path: Path, digest, chunk: int, max_bytes: int = MAX_DIGEST_BYTES) -> str:
    """The digest of a regular file of at most ``max_bytes``, checked on the open descriptor before reading:
    a FIFO named like a data file never blocks, and a 200 GiB sparse file is refused, not read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot open it ({e.strerror or e}).") from None
    with os.fdopen(fd, "rb") as f:
        check_regular(os.fstat(fd), path, max_bytes)
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_regular(st: os.stat_result, path, max_bytes: int) -> None:
    """A stat result of a regular file of at most ``max_bytes``; else a one-line DataError naming ``path``."""
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device or socket"
        raise DataError(f"{path}: not a regular file (it is {kind}); refusing to read it.")
    if st.st_size > max_bytes:
        raise DataError(f"{path}: {st.st_size:,} bytes is more than the {max_bytes:,} a data file here may have "
                        f"(a sparse or wrong file); refusing to read it.")


def _stamp_path() -> Path:
    return cache_dir() / "verified.json"


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def verify_files(root: Path, files: dict[str, str], hint: str, remember: bool = True, what: str = "md5",
                 hasher=None) -> None:
    """Check every file's digest against the official value; remember files that passed.

    A file is re-hashed only when its path, size or modification time changed since it last passed,
    so a dataset's hundreds of MB are hashed once per machine rather than on every run.
    """
    root = Path(root)
    stamp_file = _stamp_path()
    try:
        stamps = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
        if not isinstance(stamps, dict):
            stamps = {}
    except (OSError, ValueError):
        stamps = {}  # a damaged stamp file only costs a re-hash
    changed = False
    for name, expected in files.items():
        path = root / name
        try:
            check_regular(path.stat(), path, MAX_DIGEST_BYTES)
        except FileNotFoundError:
            raise DataError(f"{path}: file is missing. {hint}") from None
        except DataError as e:
            raise DataError(f"{e} {hint}") from None
        key = _file_key(path)
        if stamps.get(key) == expected:
            continue
        actual = (hasher or md5_of)(path)
        if actual != expected:
            raise DataError(f"{path}: {what} is {actual}, expected {expected} (the file is damaged or altered). "
                            f"{hint}")
        stamps[key] = expected
        changed = True
    if changed and remember:
        try:
            atomic_write_json(stamp_file, stamps)
        except OSError:
            pass  # an unwritable cache only costs a re-hash next time


def read_small_text(path: Path, max_bytes: int, hint: str) -> str:
    """A small text file (class names): regular file, bounded size, UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file is missing. {hint}")
    if path.stat().st_size > max_bytes:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes; expected a short list of class names. {hint}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected one class name per line.") from None


def read_records_file(path: Path, record_bytes: int, max_records: int, hint: str):
    """The bytes of a fixed-record file, after checking it is a regular file of a plausible size."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file is missing. {hint}")
    size = path.stat().st_size
    if size > record_bytes * max_records:
        raise DataError(f"{path}: {size:,} bytes is more than {max_records:,} records. {hint}")
    return np.fromfile(path, dtype=np.uint8)
