"""CIFAR-10's *python version* through a restricted unpickler.

Keras (``~/.keras/datasets``) and torchvision cache CIFAR-10 as pickled dicts of numpy arrays. A pickle
can run arbitrary code, so the unpickler here resolves only the handful of globals that format uses
(numpy's array reconstruction and dtype) and refuses everything else before it is called.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

# (module, name) pairs that CIFAR-10's python batches need, under numpy 1.x and 2.x module names.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}
MAX_BATCH_FILE_BYTES = 200 << 20


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"{self.source}: refusing to unpickle {module}.{name}: CIFAR-10's python version "
                        f"only holds plain containers and numpy arrays. The file is not a CIFAR-10 batch "
                        f"(or has been tampered with); use the official binary version instead.")


def safe_load(path: Path):
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BATCH_FILE_BYTES:
        raise DataError(f"{path}: {size:,} bytes is too large for a CIFAR-10 batch file.")
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except DataError:
        raise
    except Exception as e:  # any malformed pickle: one clear message, never a stack from pickle
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}).") from None


def _get(d, key: str, path: Path):
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}.")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: missing the {key!r} entry of a CIFAR-10 python batch.")


def read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load(path)
    data = _get(batch, "data", path)
    labels = np.asarray(_get(batch, "labels", path))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}.")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: 'labels' must be {data.shape[0]} integers in 0..9.")
    return data.reshape(-1, 3, 32, 32).copy(), labels.astype(np.uint8)


def load_python_version(root: Path):
    from .data import CIFAR10, Split

    root = Path(root)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        if not (root / name).is_file():
            raise DataError(f"{root / name}: file is missing from the CIFAR-10 python-version folder.")
    train = [read_python_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read_python_batch(root / "test_batch")
    names = _get(safe_load(root / "batches.meta"), "label_names", root / "batches.meta")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if len(classes) != 10:
        raise DataError(f"{root / 'batches.meta'}: expected 10 label names, found {len(classes)}.")

    def split(x, y):
        return Split(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    return CIFAR10(train=split(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
                   test=split(test_x, test_y), classes=classes, root=root)
