"""Datasets: files on disk -> uint8 tensors (:class:`Dataset`), one module per dataset, and the registry.

``load_dataset("cifar10")``, ``load_dataset("cifar100:coarse")``, ``load_dataset("folder:/photos",
image_size=64)``. To add a dataset: write a module with a ``load(arg, data_dir, download, progress,
**options) -> Dataset`` function and add one entry to :data:`DATASETS` (or call
:func:`register_dataset` from your own code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import DataError
from . import cifar10, cifar10_1, cifar100, folder
from .base import Dataset, Split, cache_dir, holdout_split, md5_of
from .cifar10 import load_cifar10
from .cifar100 import load_cifar100
from .folder import load_folder

CIFAR10 = Dataset  # the name this type had when CIFAR-10 was the only dataset


@dataclass(frozen=True)
class DatasetEntry:
    load: Callable[..., Dataset]
    usage: str          # how to name it on the command line
    description: str


DATASETS: dict[str, DatasetEntry] = {
    "cifar10": DatasetEntry(cifar10.load, "cifar10", "CIFAR-10: 50,000 + 10,000 32x32 images, 10 classes"),
    "cifar100": DatasetEntry(cifar100.load, "cifar100[:coarse]",
                             "CIFAR-100: 50,000 + 10,000 32x32 images, 100 fine (or 20 coarse) classes"),
    "cifar10.1": DatasetEntry(cifar10_1.load, "cifar10.1",
                              "CIFAR-10.1 v6: 2,000 new CIFAR-10-style test images (evaluation only: --on)"),
    "folder": DatasetEntry(folder.load, "folder:PATH",
                           "your photos: one subfolder per class (train/ and test/ or val/, or split for you)"),
}


def register_dataset(name: str, load: Callable[..., Dataset], usage: str = "", description: str = "") -> None:
    """Add a dataset: ``load(arg, data_dir=None, download=True, progress=True, **options) -> Dataset``."""
    if not name or not all(c.isalnum() or c in "._-" for c in name):
        raise ValueError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-'")
    DATASETS[name] = DatasetEntry(load, usage or name, description)


def parse_spec(spec: str) -> tuple[str, str]:
    """``"folder:/photos"`` -> ("folder", "/photos"); ``"cifar10"`` -> ("cifar10", "")."""
    name, _, arg = (spec or "cifar10").partition(":")
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: use one of " + ", ".join(e.usage for e in DATASETS.values()))
    return name, arg


def load_dataset(spec: str = "cifar10", data_dir=None, download: bool = True, progress: bool = True,
                 **options) -> Dataset:
    """Load a registered dataset by its spec (``name`` or ``name:argument``) as uint8 tensors."""
    name, arg = parse_spec(spec)
    return DATASETS[name].load(arg, data_dir=data_dir, download=download, progress=progress, **options)


def stored_options(entry: dict) -> dict:
    """The loading options a checkpoint's "dataset" entry was made with (image size, fit, split), so the
    same pictures come back: a folder is fitted to the size and in the way the model was trained on.
    Raises DataError for an entry that cannot be used."""
    from ..errors import DataError, ImageError
    from ..images import fit_of

    identity = entry.get("identity") or {}
    try:
        return {"image_size": int((entry.get("image_shape") or [32])[-1]), "fit": fit_of(entry),
                "test_fraction": identity.get("test_fraction", 0.2), "split_seed": identity.get("seed", 0)}
    except (ImageError, TypeError, ValueError) as e:
        raise DataError(f"the checkpoint's dataset entry cannot be used: {e}") from None


def load_stored(entry: dict, data_dir=None, download: bool = False, progress: bool = False, **kwargs) -> Dataset:
    """The dataset a checkpoint was trained on (its meta's "dataset" entry), loaded as it was."""
    return load_dataset(entry.get("spec") or "cifar10", data_dir=data_dir, download=download, progress=progress,
                        **stored_options(entry), **kwargs)


__all__ = ["Dataset", "Split", "CIFAR10", "DATASETS", "DatasetEntry", "register_dataset", "load_dataset",
           "parse_spec", "stored_options", "load_stored", "load_cifar10", "load_cifar100", "load_folder", "holdout_split", "cache_dir", "md5_of"]
