"""``cifarlab import-keras WEIGHTS.h5``: the exercise's trained Keras weights as a cifarlab checkpoint.

Reads, with h5py only (no TensorFlow):

* Keras 2 ``model.save_weights("weights.h5")``: root attribute ``layer_names``, one group per layer
  whose attribute ``weight_names`` lists datasets such as ``conv1/kernel:0``, ``conv1/bias:0``
  (also a full ``model.save("model.h5")``, which holds the same under ``model_weights``);
* Keras 3 ``model.save_weights("x.weights.h5")``: ``layers/<name>/vars/0`` (kernel), ``vars/1`` (bias)
  (also tf.keras 2.13+'s ``_layer_checkpoint_dependencies/<name>/vars/...``), and a Keras 3 ``.keras``
  archive, whose ``model.weights.h5`` is read from the zip.

Which Keras layer is which: by weight shapes, not names. Keras names layers itself when the code did
not (``conv2d_1``..., and Keras 3 files name them by class, ``conv2d``, ``conv2d_1``...), but the six
weighted layers of the exercise have six different kernel shapes, so the match is unambiguous; any
missing, extra or differently shaped layer is refused with a :class:`CheckpointError` listing what the
file holds. Ties (not in the exercise) fall back to the file's layer order.

Layout conversions: Conv2D kernels are (kh, kw, in, out) -> torch (out, in, kh, kw) (both frameworks
cross-correlate, nothing is flipped); Dense kernels are (in, out) -> torch (out, in); and a Dense layer
after ``Flatten`` gets its input rows reordered, because Keras flattens (H, W, C) while cifarlab
flattens channels first (C, H, W).

The architecture: the exercise's reference Keras model has **no activation after fc1** (Dense 256 ->
Dropout -> Dense 10), unlike cifarlab's built-in ``exercise`` declaration (LeakyReLU 0.1 there; same
parameters). An h5 file holds weights only, so it cannot tell which one was trained; the import builds
``keras-exercise`` (the built-in declaration minus that LeakyReLU) unless ``--fc1-activation
leaky_relu`` says the student's model had one, which gives exactly the built-in ``exercise``.
"""
from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoints import save_checkpoint
from .errors import CheckpointError
from .models import Net, get_declaration, summary
from .transforms import Normalization

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FC1_ACTIVATIONS = ("none", "leaky_relu")
MAX_ARCHIVE_MEMBER = 1 << 30  # a .keras zip member larger than 1 GiB is not this exercise's model


# ---------------------------------------------------------------------------------------------------
# The architecture


def keras_exercise_declaration(fc1_activation: str = "none") -> dict:
    """The exercise net as the Keras reference builds it (``none``) or with LeakyReLU after fc1."""
    if fc1_activation not in FC1_ACTIVATIONS:
        raise ValueError(f"fc1 activation must be one of {FC1_ACTIVATIONS}, not {fc1_activation!r}")
    decl = get_declaration("exercise")
    if fc1_activation == "leaky_relu":
        return decl
    layers = decl["layers"]
    fc1 = next(i for i, layer in enumerate(layers) if layer["name"] == "fc1")
    if layers[fc1 + 1]["type"] != "leaky_relu":
        raise AssertionError("the built-in exercise declaration changed: no activation after fc1 to remove")
    return get_declaration({
        "name": "keras-exercise", "init": decl["init"],
        "description": "The exercise's Keras reference model: like 'exercise' but no activation after fc1.",
        "layers": layers[:fc1 + 1] + layers[fc1 + 2:]})


# ---------------------------------------------------------------------------------------------------
# Reading the h5 file (never following links out of it)


class KerasLayer:
    """One weighted Keras layer: its name in the file and its (kernel, bias) datasets."""

    def __init__(self, name: str, datasets: list):
        self.name = name
        self.datasets = datasets

    @property
    def shapes(self) -> list[tuple]:
        return [tuple(d.shape) for d in self.datasets]

    def describe(self) -> str:
        return f"{self.name} " + " ".join(str(s) for s in self.shapes)


def _safe_child(group, key: str, where: str):
    """``group[key]`` only if it is stored in this file (no external/soft links, no virtual datasets)."""
    import h5py

    link = group.get(key, getlink=True)
    if link is None:
        raise CheckpointError(f"{where}: '{key}' is listed but missing from the file.")
    if not isinstance(link, h5py.HardLink):
        raise CheckpointError(f"{where}: '{key}' is a {type(link).__name__} to elsewhere; refusing to follow it.")
    obj = group[key]
    if isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.external):
        raise CheckpointError(f"{where}: dataset '{key}' keeps its data outside this file; refusing to read it.")
    return obj


def _text(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.atleast_1d(values)]


def _keras2_layers(root, source: str) -> list[KerasLayer]:
    """Keras 2 ``save_weights``: ordered ``layer_names``; each group lists its ``weight_names``."""
    import h5py

    layers = []
    for name in _text(root.attrs["layer_names"]):
        group = _safe_child(root, name, source)
        if not isinstance(group, h5py.Group):
            raise CheckpointError(f"{source}: layer '{name}' is not a group; not a Keras weights file.")
        weight_names = _text(group.attrs.get("weight_names", []))
        if weight_names:
            layers.append(KerasLayer(name, [_dataset(group, w, f"{source}: layer '{name}'") for w in weight_names]))
    return layers


def _dataset(group, path: str, where: str):
    import h5py

    obj = group
    for part in path.split("/"):  # weight names look like 'conv1/kernel:0': a nested path
        obj = _safe_child(obj, part, where)
    if not isinstance(obj, h5py.Dataset):
        raise CheckpointError(f"{where}: '{path}' is not a dataset.")
    return obj


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _keras3_layers(root, source: str) -> list[KerasLayer]:
    """Keras 3 ``.weights.h5``: every ``.../vars`` group with datasets 0, 1, ... is a weighted layer."""
    import h5py

    found = []

    def walk(group, path: str, depth: int):
        if depth > 8:  # the exercise is flat; deep nesting means another kind of file
            raise CheckpointError(f"{source}: groups nested deeper than 8 levels; not the exercise's weights.")
        for key in sorted(group.keys(), key=_natural_key):
            child = _safe_child(group, key, source)
            if not isinstance(child, h5py.Group) or (depth == 0 and key == "optimizer"):
                continue
            if key == "vars":
                keys = sorted(child.keys(), key=_natural_key)
                if keys and path:
                    found.append(KerasLayer(path, [_dataset(child, k, f"{source}: layer '{path}'") for k in keys]))
            else:
                walk(child, f"{path}/{key}" if path else key, depth + 1)

    walk(root, "", 0)
    return found


def read_keras_layers(path: Path) -> tuple[list[KerasLayer], str, object]:
    """(weighted layers in file order, layout name, open h5py.File to close) from a Keras weights file."""
    try:
        import h5py
    except ImportError:
        raise CheckpointError("importing Keras weights needs h5py: pip install 'cifarlab[keras]'") from None
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file.")
    handle = _open_h5(path, h5py)
    try:
        root = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" in root.attrs:
            return _keras2_layers(root, source), "Keras 2 h5", handle
        if any(k in handle for k in ("layers", "_layer_checkpoint_dependencies")):
            return _keras3_layers(handle, source), "Keras 3 .weights.h5", handle
    except CheckpointError:
        handle.close()
        raise
    except Exception as e:  # a damaged HDF5 object table raises OSError, KeyError, ValueError...
        handle.close()
        raise CheckpointError(f"{path}: damaged HDF5 file ({type(e).__name__}: {e}).") from None
    handle.close()
    raise CheckpointError(f"{path}: an HDF5 file, but not Keras weights (no 'layer_names' attribute as Keras 2 "
                          f"writes, no 'layers' group as Keras 3 writes).")


def _open_h5(path: Path, h5py):
    if zipfile.is_zipfile(path):  # a Keras 3 .keras archive: the weights are its model.weights.h5
        try:
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo("model.weights.h5")
                if info.file_size > MAX_ARCHIVE_MEMBER:
                    raise CheckpointError(f"{path}: model.weights.h5 in the archive is implausibly large.")
                data = archive.read(info)
        except KeyError:
            raise CheckpointError(f"{path}: a zip archive without model.weights.h5; not a .keras model.") from None
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: damaged zip archive ({e}).") from None
        return _h5_file(io.BytesIO(data), path, h5py)
    return _h5_file(path, path, h5py)


def _h5_file(target, path: Path, h5py):
    try:
        return h5py.File(target, "r")
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file; expected Keras weights saved with "
                              f"model.save_weights ({e}).") from None


# ---------------------------------------------------------------------------------------------------
# Matching and converting


def _weighted_modules(model: Net) -> list[tuple[str, nn.Module, tuple | None]]:
    """(name, module, flatten_from) for each conv/dense layer; ``flatten_from`` is the (C, H, W) shape a
    Flatten turned into this Dense layer's input (None otherwise). Shapes come from running zeros through."""
    out, x, flatten_from = [], torch.zeros(1, 3, 32, 32), None
    with torch.no_grad():
        for name, module in model.named_children():
            if isinstance(module, nn.Flatten):
                flatten_from = tuple(x.shape[1:])
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                out.append((name, module, flatten_from if isinstance(module, nn.Linear) else None))
                flatten_from = None
            x = module(x)
    return out


def _keras_kernel_shape(module: nn.Module) -> tuple:
    w = module.weight
    return tuple(w.shape[2:]) + (w.shape[1], w.shape[0]) if isinstance(module, nn.Conv2d) else (w.shape[1], w.shape[0])


def _match(layers: list[KerasLayer], model: Net, source: str) -> list[tuple[str, nn.Module, tuple, KerasLayer]]:
    wanted = _weighted_modules(model)
    expected = ", ".join(f"{n} {_keras_kernel_shape(m)}" for n, m, _ in wanted)
    found = "; ".join(layer.describe() for layer in layers) or "none"
    if len(layers) != len(wanted):
        raise CheckpointError(f"{source}: holds {len(layers)} layers with weights, the exercise's Keras model has "
                              f"{len(wanted)} (kernels {expected}). Found: {found}.")
    unused, pairs = list(layers), []
    for name, module, flatten_from in wanted:
        kernel = _keras_kernel_shape(module)
        bias = (module.weight.shape[0],)
        hit = next((k for k in unused if sorted(k.shapes, key=len, reverse=True) == [kernel, bias]), None)
        if hit is None:
            raise CheckpointError(f"{source}: no layer with a kernel {kernel} and bias {bias} for '{name}'; this is "
                                  f"not the exercise's architecture. Expected kernels {expected}. Found: {found}.")
        unused.remove(hit)
        pairs.append((name, module, flatten_from, hit))
    return pairs


def _read(dataset, source: str, layer: KerasLayer) -> np.ndarray:
    if dataset.dtype.kind != "f":
        raise CheckpointError(f"{source}: layer '{layer.name}' has {dataset.dtype} weights; expected floats.")
    try:
        values = np.asarray(dataset[()], dtype=np.float32)
    except (OSError, ValueError, TypeError) as e:  # HDF5 read errors of a damaged file
        raise CheckpointError(f"{source}: cannot read the weights of layer '{layer.name}'; the file is "
                              f"damaged ({e}).") from None
    if not np.isfinite(values).all():
        raise CheckpointError(f"{source}: layer '{layer.name}' holds NaN or infinite weights.")
    return values


def torch_weights(kernel: np.ndarray, module: nn.Module, flatten_from: tuple | None = None) -> np.ndarray:
    """A Keras kernel in torch's layout for ``module``; ``flatten_from``: see :func:`_weighted_modules`."""
    if isinstance(module, nn.Conv2d):
        return kernel.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    if flatten_from is not None and len(flatten_from) == 3:
        c, h, w = flatten_from
        # Keras input row (h, w, c) carries the value that cifarlab feeds in at row (c, h, w).
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
    return kernel.T  # (in, out) -> (out, in)


def import_keras(weights: str | Path, fc1_activation: str = "none",
                 declaration: dict | None = None) -> tuple[Net, dict]:
    """Build the cifarlab model holding the Keras file's weights; returns (model, checkpoint meta)."""
    path = Path(weights)
    decl = declaration or keras_exercise_declaration(fc1_activation)
    model = Net(decl)
    layers, layout, handle = read_keras_layers(path)
    try:
        pairs = _match(layers, model, str(path))
        with torch.no_grad():
            for name, module, flatten_from, layer in pairs:
                kernel_ds, bias_ds = sorted(layer.datasets, key=lambda d: len(d.shape), reverse=True)
                kernel, bias = _read(kernel_ds, str(path), layer), _read(bias_ds, str(path), layer)
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(torch_weights(kernel, module, flatten_from))))
                module.bias.copy_(torch.from_numpy(bias))
        keras_version = _text(handle.attrs.get("keras_version", b"unknown"))[0]
    finally:
        handle.close()
    model.eval()
    meta = _meta(model, path, layout, keras_version, {name: layer.name for name, _, _, layer in pairs})
    return model, meta


def _meta(model: Net, path: Path, layout: str, keras_version: str, layer_map: dict) -> dict:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        "architecture": model.declaration, "classes": list(CIFAR10_CLASSES),
        "dataset": {"name": "cifar10", "spec": "cifar10", "classes": list(CIFAR10_CLASSES), "image_shape": [3, 32, 32]},
        "normalization": Normalization.named("exercise").to_dict(),  # the exercise's x / 255 - 0.5
        "recipe": {"note": "imported from Keras weights; trained outside cifarlab (the exercise's recipe: "
                           "Adamax 5e-3 x 0.9 per epoch, batch 32, 10 epochs)", "tta": False, "seed": 0},
        "epoch": None, "step_in_epoch": 0, "global_step": 0, "history": [], "metrics": {},
        "seed": 0, "val_source": "not recorded (trained in Keras)", "world_size": 1,
        "source": {"file": str(path), "sha256": digest, "layout": layout, "keras_version": keras_version,
                   "layers": layer_map},
    }


# ---------------------------------------------------------------------------------------------------
# CLI
