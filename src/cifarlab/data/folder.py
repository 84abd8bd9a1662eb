"""A folder of photos (the ``folder:PATH`` dataset), laid out as torchvision's ImageFolder.

One subfolder per class; class index = position in the sorted folder names. Either ``PATH/train/`` and
``PATH/test/`` (or ``PATH/val/``) each hold the class folders, or ``PATH`` itself holds them and a
seeded, stratified split sets ``test_fraction`` of each class aside (the split is part of the run's
dataset identity, and the run folder keeps the lists of files).

Every file goes through :func:`cifarlab.images.load_image` (checked before decoding, first frame, EXIF
orientation, RGB, made square by ``fit``, Lanczos to ``image_size``), in parallel worker processes, once:
the decoded uint8 tensors are cached under the cache folder, keyed by the sha256 of every file's
content, its class, the image size and the fit, so a second run starts in seconds and an edited photo is
decoded again.

``fit`` (:data:`cifarlab.images.FITS`) is how a non-square photo becomes a square: ``crop`` (the
centered square), ``squish`` (the whole photo, stretched) or ``pad`` (the whole photo, aspect kept,
reflection in the margins); default :data:`cifarlab.images.DEFAULT_FIT`.

``image_size=None`` (the default) chooses the size from the photos: the median shorter side of up to
``AUTO_SAMPLE`` training files, read from their headers only (an evenly spaced, so deterministic, sample
of the sorted file list). At least ``AUTO_LARGE_FROM`` px gives 64, else 32. Why: 32 px is CIFAR's size
and trains fast on a CPU, and smaller photos have little more to give; photos of 96 px or more keep
much more detail at 64 (4x the pixels: shapes a 32x32 thumbnail blurs away), and the fast and airbench
nets end in a global pool, so they take 64x64 with the same weights (the exercise net flattens: its
first dense layer grows 4x, 1.1 M -> 4.2 M parameters; each step costs about 4x at 64 px for every
net). The size chosen and the fit are part of the
dataset identity (stored with the run), so evaluate, predict and a resume prepare pictures the same way.

Hidden files and folders, and files that are not images by their extension
(``.DS_Store``, ``Thumbs.db``, notes), are ignored; a file that fails to decode is listed with the
reason and skipped (``strict=True`` refuses instead). So is a file that is not a regular file (a FIFO
named ``x.jpg``: never opened in a way that waits) or is larger than an image may be (a 200 GiB sparse
file: never read, not even to checksum it).

Names are data: a class is named by its folder, and a folder or file name that is not UTF-8 is used
as the OS gives it and shown (in class names, notes and the run's ``dataset.json``) in a printable form,
undecodable bytes as ``\\xNN`` (:func:`cifarlab.data.base.printable`). The dataset's ``spec`` holds the
resolved path, so a run's data is found again from any working folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, ImageError
from ..fsutil import atomic_write_bytes
from .base import Dataset, Split, cache_dir, check_dataset, printable, user_path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
                    ".pnm"}
TEST_NAMES = ("test", "val")
MAX_FILES = 2_000_000
MAX_IMAGE_SIZE = 512
AUTO_SAMPLE = 200        # files whose header sizes choose image_size=None ("auto")
AUTO_LARGE_FROM = 96     # median shorter side (px) from which auto picks AUTO_SIZES[1]
AUTO_SIZES = (32, 64)
CACHE_FORMAT = "cifarlab-folder-1"   # bump when decoding changes: old cache entries are then ignored


def load(arg: str, data_dir=None, download: bool = True, progress: bool = True, image_size: int | None = None,
         test_fraction: float = 0.2, split_seed: int = 0, strict: bool = False, workers: int | None = None,
         log=None, fit: str | None = None, **options) -> Dataset:
    """The registry's entry: ``folder:PATH``."""
    if not arg:
        raise DataError("the folder dataset needs a path: --dataset folder:PATH")
    return load_folder(arg, image_size=image_size, test_fraction=test_fraction, split_seed=split_seed,
                       strict=strict, workers=workers, log=log, fit=fit)


def load_folder(path: str | Path, image_size: int | None = None, test_fraction: float = 0.2, split_seed: int = 0,
                strict: bool = False, workers: int | None = None, log=None, fit: str | None = None) -> Dataset:
    """The photos under ``path`` as a :class:`Dataset` (module docstring). ``image_size=None``: chosen from
    the photos; ``fit=None``: :data:`cifarlab.images.DEFAULT_FIT`."""
    from ..images import DEFAULT_FIT, FITS

    root = user_path(path, "folder:")
    log = log or (lambda *a, **k: None)
    fit = DEFAULT_FIT if fit is None else fit
    if fit not in FITS:
        raise DataError(f"unknown fit {fit!r}: use one of {', '.join(FITS)}")
    if not root.is_dir():
        raise DataError(f"folder:{printable(str(root))}: no such folder. Expected one subfolder per class (or "
                        f"train/ and test/); for a run whose photos moved, pass --dataset folder:NEW_PATH.")
    root = root.resolve()  # stored with the run: the data is found again from another working folder
    if image_size is not None and not (isinstance(image_size, int) and 8 <= image_size <= MAX_IMAGE_SIZE):
        raise DataError(f"image size {image_size} is outside 8..{MAX_IMAGE_SIZE}")
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction {test_fraction} must be between 0 and 1")
    train_dir, test_dir = _layout(root)
    folders = _class_folders(train_dir)
    classes = [printable(name) for name in folders]  # the folder names as the OS gives them, shown printably
    train_files = _list_files(train_dir, folders)
    if test_dir is not None:
        unknown = sorted(set(_class_folders(test_dir, allow_empty=True)) - set(folders))
        if unknown:
            raise DataError(f"{test_dir}: class folder(s) {[printable(n) for n in unknown]} are not in {train_dir}; "
                            f"both need the same classes.")
        test_files = _list_files(test_dir, folders, require_all=False)
        split = {"layout": f"{train_dir.name}/ and {test_dir.name}/"}
    else:
        train_files, test_files = stratified_split(train_files, test_fraction, split_seed)
        split = {"layout": "one tree, split", "test_fraction": test_fraction, "seed": split_seed}
    if image_size is None:
        image_size, median, sampled = auto_image_size([p for p, _ in train_files])
        size_from = f"auto: median shorter side {median} px of {sampled} training files" if sampled else \
            "auto: no readable training file header"
        log(f"image size {image_size} ({size_from}; >= {AUTO_LARGE_FROM} px gives {AUTO_SIZES[1]}, else "
            f"{AUTO_SIZES[0]}; --image-size to choose)")
    else:
        size_from = "given"
    content = _content_key(root, train_files, test_files, image_size, fit)
    decoded = _cached(content) or _decode_and_cache(root, train_files, test_files, image_size, fit, content,
                                                  workers, log)
    skipped = decoded["skipped"]
    if skipped and strict:
        raise DataError(f"folder:{printable(str(root))}: {len(skipped)} file(s) could not be read (--strict): "
                        + "; ".join(f"{p}: {why}" for p, why in skipped[:5]))
    ds = Dataset(train=decoded["train"], test=decoded["test"], classes=classes, root=root, name="folder",
                 spec=f"folder:{root}",
                 identity=dict(split, content_sha256=content, image_size=image_size, image_size_from=size_from,
                               fit=fit, skipped=len(skipped)),
                 notes=[f"skipped {p}: {why}" for p, why in skipped],
                 files={"train": decoded["train_files"], "test": decoded["test_files"]})
    for c, name in enumerate(classes):
        if not (ds.train.labels == c).any():
            raise DataError(f"folder:{printable(str(root))}: class {name!r} has no readable training image.")
    return check_dataset(ds, f"folder:{printable(str(root))}")


# ---------------------------------------------------------------------------------------------------
# Listing


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _layout(root: Path) -> tuple[Path, Path | None]:
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and _visible(p)}
    test = next((root / n for n in TEST_NAMES if n in subdirs), None)
    if "train" in subdirs and test is not None:
        return root / "train", test
    return root, None


def _class_folders(folder: Path, allow_empty: bool = False) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p))
    if not names and allow_empty:
        return names
    if len(names) < 2:
        raise DataError(f"{folder}: found {len(names)} class folder(s) {[printable(n) for n in names]}; a "
                        f"classifier needs at least two (one subfolder of images per class).")
    shown = [printable(n) for n in names]
    if len(set(shown)) != len(shown):
        twice = next(n for n in shown if shown.count(n) > 1)
        raise DataError(f"{folder}: two class folders are both shown as {twice!r} (one of them is not UTF-8 or "
                        f"holds control characters); rename one.")
    return names


def _list_files(folder: Path, classes: list[str], require_all: bool = True) -> list[tuple[str, int]]:
    """(path relative to the dataset root's parent folder of ``folder``, label), sorted; images only."""
    out = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        found = []
        if class_dir.is_dir():
            for dirpath, dirnames, filenames in os.walk(class_dir):  # links to folders are not followed
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [Path(dirpath, f) for f in filenames
                          if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not found and require_all:
            raise DataError(f"{printable(str(class_dir))}: class {printable(name)!r} has no image files "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        out += [(str(p), label) for p in sorted(found)]
        if len(out) > MAX_FILES:
            raise DataError(f"{folder}: more than {MAX_FILES:,} images")
    return out


def stratified_split(files: list[tuple[str, int]], test_fraction: float, seed: int):
    """A seeded split of each class: round(n x fraction) test files (at least one of a class of two or more)."""
    train, test = [], []
    gen = torch.Generator().manual_seed(seed)
    for label in sorted({lbl for _, lbl in files}):
        members = [f for f in files if f[1] == label]
        order = torch.randperm(len(members), generator=gen).tolist()
        n_test = min(len(members) - 1, max(1 if len(members) >= 2 else 0, round(len(members) * test_fraction)))
        test += [members[i] for i in sorted(order[:n_test])]
        train += [members[i] for i in sorted(order[n_test:])]
    return train, test


# ---------------------------------------------------------------------------------------------------
# The automatic image size


def auto_image_size(paths: list[str], sample: int = AUTO_SAMPLE) -> tuple[int, int | None, int]:
    """(size, median shorter side in px, files measured) for ``image_size=None``: the header sizes of up to
    ``sample`` evenly spaced files of ``paths`` (no pixel decoded); unreadable files are left out, and
    with none readable the size is the small one."""
    from ..images import header_size

    picked = paths if len(paths) <= sample else [paths[i * len(paths) // sample] for i in range(sample)]
    shorter = []
    for path in picked:
        try:
            shorter.append(min(header_size(path)))
        except (ImageError, OSError):
            continue  # decoding will list it with its reason
    if not shorter:
        return AUTO_SIZES[0], None, 0
    median = int(np.median(shorter))
    return AUTO_SIZES[1] if median >= AUTO_LARGE_FROM else AUTO_SIZES[0], median, len(shorter)


# ---------------------------------------------------------------------------------------------------
# Decoding, once, cached by content


def _content_key(root: Path, train_files, test_files, image_size: int, fit: str = "crop") -> str:
    # "crop" (the only fit before fits existed) keeps the key it had, so earlier runs resume and earlier
    # cache entries stay valid; another fit is part of the key ("fit=..." never reads as a split name).
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{image_size}|{'' if fit == 'crop' else f'fit={fit}|'}".encode())
    for split, files in (("train", train_files), ("test", test_files)):
        for path, label in files:
            digest.update(f"{split}|{label}|".encode() + os.fsencode(os.path.relpath(path, root)) + b"|")
            digest.update(_file_sha256(path).encode())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    """The file's sha256, or what stands for it when the file is not read: a FIFO or device (opened without
    blocking, never read) or a file larger than an image may be (a sparse 200 GiB file is not hashed);
    decoding then skips it with the reason."""
    from ..images import MAX_FILE_BYTES

    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        return f"unreadable:{e.errno}"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not-a-file"
        if st.st_size > MAX_FILE_BYTES:
            return f"too-large:{st.st_size}"
        try:
            while block := f.read(1 << 20):
                digest.update(block)
        except OSError as e:
            return f"unreadable:{e.errno}"
    return digest.hexdigest()


def _cache_file(key: str) -> Path:
    return cache_dir() / "folders" / f"{key}.safetensors"


def _cached(key: str) -> dict | None:
    """The decoded tensors of this exact content, validated; None when absent or not trustworthy."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _cache_file(key)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["cifarlab"])
        tensors = load_file(str(path))
        out = {"skipped": [tuple(s) for s in meta["skipped"]], "train_files": meta["train_files"],
               "test_files": meta["test_files"]}
        for split in ("train", "test"):
            x, y = tensors[f"{split}_images"], tensors[f"{split}_labels"]
            if x.dtype != torch.uint8 or y.dtype != torch.int64 or not len(x) == len(y) == len(out[f"{split}_files"]):
                return None
            out[split] = Split(x, y)
        return out if meta.get("key") == key else None
    except (OSError, SafetensorError, KeyError, ValueError, TypeError):
        return None  # a damaged cache entry only costs decoding again


def _decode_one(job: tuple[str, int, str]) -> tuple[np.ndarray | None, str]:
    from ..images import load_image, shown

    path, size, fit = job
    try:
        return load_image(path, size, fit=fit).numpy(), ""
    except ImageError as e:
        return None, str(e).removeprefix(f"{shown(path)}: ")


def _decode_all(paths: list[str], size: int, workers: int | None, fit: str = "crop") \
        -> list[tuple[np.ndarray | None, str]]:
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(p, size, fit) for p in paths]
    if workers <= 1 or len(jobs) < 64:
        return [_decode_one(j) for j in jobs]
    import multiprocessing

    # fork: the workers inherit the imported modules (no second torch import); they only use Pillow/numpy.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_decode_one, jobs, chunksize=max(16, len(jobs) // (workers * 16))))


def _decode_and_cache(root: Path, train_files, test_files, size: int, fit: str, key: str, workers, log) -> dict:
    import time

    start = time.perf_counter()
    everything = train_files + test_files
    results = _decode_all([p for p, _ in everything], size, workers, fit)
    out, skipped = {}, []
    for split, files, offset in (("train", train_files, 0), ("test", test_files, len(train_files))):
        images, labels, kept = [], [], []
        for (path, label), (array, why) in zip(files, results[offset:offset + len(files)]):
            name = printable(os.path.relpath(path, root))  # for notes and dataset.json: one printable line
            if array is None:
                skipped.append((name, why))
                continue
            images.append(array)
            labels.append(label)
            kept.append(name)
        x = torch.from_numpy(np.stack(images)) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
        out[split] = Split(x, torch.tensor(labels, dtype=torch.int64))
        out[f"{split}_files"] = kept
    out["skipped"] = skipped
    log(f"decoded {len(everything):,} images from {printable(str(root))} ({size}x{size}, fit {fit}) in "
        f"{time.perf_counter() - start:.1f} s "
        f"({len(skipped)} skipped); cached for the next run")
    _write_cache(key, out)
    return out


def _write_cache(key: str, out: dict) -> None:
    from safetensors.torch import save

    meta = {"key": key, "skipped": out["skipped"], "train_files": out["train_files"],
            "test_files": out["test_files"]}
    tensors = {f"{s}_{k}": getattr(out[s], k).contiguous() for s in ("train", "test") for k in ("images", "labels")}
    try:
        path = _cache_file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(tensors, metadata={"cifarlab": json.dumps(meta)}))
    except OSError:
        pass  # an unwritable cache only costs decoding again next time
