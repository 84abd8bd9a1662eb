"""CIFAR-10's *python version* through a restricted unpickler.

Keras (``~/.keras/datasets``) and torchvision cache CIFAR-10 as pickled dicts of numpy arrays. A pickle
can run arbitrary code, so the unpickler here resolves only the handful of globals that format uses
(numpy's array reconstruction and dtype) and refuses everything else before it is called.

Even those few are never numpy's real functions: each is a guard that accepts only numeric dtypes and
arrays whose bytes are present in the file, so a tiny file cannot ask for gigabytes, build an object
array (which ``ndarray.__setstate__`` can crash on), or call a constructor with arbitrary arguments.
"""
from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, short_repr

MAX_BATCH_FILE_BYTES = 200 << 20
MAX_NDIM = 8
# numpy dtype kinds a CIFAR-10 batch can hold: bool, signed and unsigned integers, floats.
_SAFE_KINDS = "biuf"


def _refuse(what: str) -> DataError:
    return _Refused(f"refusing {what}: CIFAR-10's python version only holds plain containers and numeric "
                    f"numpy arrays")


class _Refused(DataError):
    """Raised inside the unpickler; :func:`safe_load` adds the file name."""


# Resolving a global is not enough to be safe: numpy's own constructors will happily allocate any
# shape (a 100-byte pickle asking for (10**7, 3072) takes 30 GB) and ``ndarray.__setstate__`` with an
# object dtype and a short list reads past the end of it (numpy 2.x segfaults). So the unpickler never
# hands out a real numpy callable. Each allowed global is a guard that accepts only what numpy's
# pickles of numeric arrays contain; sizes always come from bytes present in the file.


class _NDArrayMarker:
    """Stands for ``numpy.ndarray`` as the first argument of ``_reconstruct``; cannot be called."""

    __slots__ = ()

    def __repr__(self):
        return "numpy.ndarray"

    def __call__(self, *args, **kwargs):
        raise _refuse("calling numpy.ndarray directly")

    def __setstate__(self, state):
        raise _refuse("setting state on numpy.ndarray")


_NDARRAY = _NDArrayMarker()


class _DTypeSpec:
    """A dtype as pickled: ``numpy.dtype(spec, align, copy)`` then BUILD with its state (byte order)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags): only the byte order
        # matters for the simple dtypes accepted here; anything else must be the defaults.
        if not isinstance(state, tuple) or not 2 <= len(state) <= 9:
            raise _refuse(f"a dtype state {short_repr(state)}")
        order = state[1]
        if isinstance(order, bytes):
            order = order.decode("latin1")
        if order not in ("<", ">", "|", "="):
            raise _refuse(f"a dtype byte order {short_repr(order)}")
        if any(v is not None for v in state[2:5]):
            raise _refuse("a structured or sub-array dtype")
        if order in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(order)


def _as_dtype(value) -> np.dtype:
    if isinstance(value, _DTypeSpec):
        return value.dtype
    return _dtype(value).dtype


def _dtype(spec, align=False, copy=True) -> _DTypeSpec:
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if not isinstance(spec, str) or len(spec) > 8:
        raise _refuse(f"the dtype {short_repr(spec)}")
    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError):
        raise _refuse(f"the dtype {spec!r}") from None
    if dtype.kind not in _SAFE_KINDS or dtype.fields is not None or dtype.subdtype is not None \
            or dtype.itemsize > 16:
        raise _refuse(f"the dtype {spec!r} (object, structured, string or sub-array dtypes)")
    return _DTypeSpec(dtype)


def _check_shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM or \
            not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 40 for s in shape):
        raise _refuse(f"the array shape {short_repr(shape)}")
    return shape


class _PickledArray(np.ndarray):
    """What the guarded ``_reconstruct`` returns: an empty array whose ``__setstate__`` checks that
    the dtype is numeric and that the raw bytes in the file fill exactly the declared shape."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _refuse(f"an array state {short_repr(state)}")
        version = state[0] if len(state) == 5 else 0
        shape, dtype, fortran, raw = state[-4:]
        shape, dtype = _check_shape(shape), _as_dtype(dtype)
        if not isinstance(raw, (bytes, bytearray)):
            raise _refuse(f"array data of type {type(raw).__name__} (only raw bytes)")
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise _refuse(f"array data of {len(raw):,} bytes for shape {shape} of {dtype}")
        if not isinstance(fortran, bool):
            raise _refuse("a non-boolean array order flag")
        super().__setstate__((version, shape, dtype, fortran, raw) if len(state) == 5
                             else (shape, dtype, fortran, raw))


def _reconstruct(subtype, shape, dtype):
    # numpy pickles every array as _reconstruct(ndarray, (0,), b'b') and then sets its state.
    if subtype is not _NDARRAY or shape != (0,):
        raise _refuse(f"numpy _reconstruct({short_repr(subtype)}, {short_repr(shape)}, ...)")
    _as_dtype(dtype)
    return np.ndarray.__new__(_PickledArray, (0,), np.uint8)


def _frombuffer(buf, dtype, shape, order):
    # protocol 5: numeric arrays as _frombuffer(bytes, dtype, shape, order)
    if isinstance(buf, pickle.PickleBuffer):
        buf = bytes(buf)
    if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
        raise _refuse("numpy _frombuffer with anything but bytes")
    shape, dtype = _check_shape(shape), _as_dtype(dtype)
    if len(buf) != math.prod(shape) * dtype.itemsize:
        raise _refuse(f"array data of {len(buf):,} bytes for shape {shape} of {dtype}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy(order="K")


def _scalar(dtype, data=None):
    dtype = _as_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _refuse("a numpy scalar without exactly its bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Python 3 writes bytes as _codecs.encode(str, 'latin1') in protocols 0-2.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _refuse(f"_codecs.encode with {short_repr(encoding)}")
    return text.encode("latin1")


def _bytes(*args):
    # Protocols 0-2 write b'' as bytes(); nothing else (bytes(10**12) would allocate a terabyte).
    if args:
        raise _refuse("bytes() with arguments")
    return b""


_ALLOWED = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module, name):
        guard = _ALLOWED.get((module, name))
        if guard is not None:
            return guard
        raise DataError(f"{self.source}: refusing to unpickle {str(module)[:100]}.{str(name)[:100]}: CIFAR-10's "
                        f"python version only holds plain containers and numpy arrays. The file is not a "
                        f"CIFAR-10 batch (or has been tampered with); use the official binary version instead.")

    def persistent_load(self, pid):
        raise DataError(f"{self.source}: refusing a persistent id: not a CIFAR-10 batch.")


def safe_load(path: Path):
    path = Path(path)
    try:
        if not path.is_file():
            raise DataError(f"{path}: not a regular file.")
        size = path.stat().st_size
        if size > MAX_BATCH_FILE_BYTES:
            raise DataError(f"{path}: {size:,} bytes is too large for a CIFAR-10 batch file.")
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e}).") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except _Refused as e:
        raise DataError(f"{path}: {e}. The file is not a CIFAR-10 batch (or has been tampered with); use "
                        f"the official binary version instead.") from None
    except DataError:
        raise
    except Exception as e:  # any malformed pickle: one clear message, never a stack from pickle
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: "
                        f"{short_repr(str(e), 200)}).") from None


def _get(d, key: str, path: Path):
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}; not a CIFAR-10 python batch.")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: missing the {key!r} entry of a CIFAR-10 python batch.")


def _labels(value, n: int, path: Path) -> np.ndarray:
    if isinstance(value, (list, tuple)):
        ok = len(value) == n and all(type(v) is int and 0 <= v <= 9 for v in value)
        labels = np.array(value, dtype=np.uint8) if ok else None
    elif isinstance(value, np.ndarray):
        labels = np.asarray(value)
        ok = labels.shape == (n,) and labels.dtype.kind in "iu" and n > 0 and labels.min() >= 0 \
            and labels.max() <= 9
        labels = labels.astype(np.uint8) if ok else None
    else:
        ok = False
    if not ok:
        raise DataError(f"{path}: 'labels' must be a list of {n} integers in 0..9, found "
                        f"{type(value).__name__} of length {len(value) if hasattr(value, '__len__') else '?'}.")
    return labels


def read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load(path)
    data = _get(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or data.shape[0] == 0:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072) with N >= 1, found "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}.")
    labels = _labels(_get(batch, "labels", path), data.shape[0], path)
    return np.asarray(data).reshape(-1, 3, 32, 32).copy(), labels


def _class_names(names, path: Path) -> list[str]:
    if not isinstance(names, (list, tuple)) or len(names) != 10 or \
            not all(isinstance(n, (bytes, str)) and 0 < len(n) <= 64 for n in names):
        raise DataError(f"{path}: 'label_names' must be a list of 10 short names, found {short_repr(names)}.")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError:
        raise DataError(f"{path}: a label name is not UTF-8 text.") from None


def load_python_version(root: Path):
    from .base import Dataset, Split

    root = Path(root)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        if not (root / name).is_file():
            raise DataError(f"{root / name}: file is missing from the CIFAR-10 python-version folder.")
    train = [read_python_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read_python_batch(root / "test_batch")
    classes = _class_names(_get(safe_load(root / "batches.meta"), "label_names", root / "batches.meta"),
                           root / "batches.meta")

    def split(x, y):
        return Split(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    return Dataset(name="cifar10", spec="cifar10", train=split(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
                   test=split(test_x, test_y), classes=classes, root=root)
