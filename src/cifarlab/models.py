"""Architectures declared as data, built into PyTorch modules, summarized like Keras.

A declaration is a small dict (JSON or TOML on disk)::

    {"name": "tiny", "layers": [
        {"type": "conv", "filters": 32}, {"type": "relu"}, {"type": "maxpool"},
        {"type": "flatten"}, {"type": "dense", "units": 10}]}

Shapes are checked by arithmetic before any weight is allocated, against the dataset's image shape
(``input_shape``, default 3x32x32) and number of classes, so a declaration that does not fit (a hostile
size, an unknown key, a last layer of the wrong width) fails with a message naming the layer. A dense
layer's ``"units": "classes"`` means the dataset's number of classes (the built-in models' heads use it,
so they adapt to CIFAR-100 or a photo folder). Checkpoints store the declaration, so a model rebuilds without running anyone's code.
The network outputs logits; the softmax of the exercise's last layer is applied at prediction time.
"""
from __future__ import annotations

import copy
import json
import math
import tomllib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .errors import DeclarationError, short_repr

INPUT_SHAPE = (3, 32, 32)
MAX_CHANNELS = 8192
MAX_UNITS = 1 << 16
MAX_KERNEL = 32
MAX_PARAMS = 500_000_000
MAX_LAYERS = 512

# type -> {key: (python types, default or REQUIRED)}
REQUIRED = object()
_INT = (int,)
_NUM = (int, float)
LAYER_KEYS: dict[str, dict[str, tuple]] = {
    "conv": {"filters": (_INT, REQUIRED), "kernel": (_INT, 3), "stride": (_INT, 1),
             "padding": ((str, int), "same"), "bias": ((bool,), True)},
    "whiten": {"kernel": (_INT, 2), "eps": (_NUM, 5e-4)},
    "dense": {"units": (_INT, REQUIRED), "bias": ((bool,), True)},
    "relu": {}, "gelu": {}, "tanh": {},
    "leaky_relu": {"slope": (_NUM, 0.01)},
    "maxpool": {"size": (_INT, 2), "stride": (_INT, None)},
    "avgpool": {"size": (_INT, 2), "stride": (_INT, None)},
    "global_maxpool": {}, "global_avgpool": {},
    "dropout": {"rate": (_NUM, 0.5)},
    "batchnorm": {"momentum": (_NUM, 0.1), "eps": (_NUM, 1e-5), "scale": ((bool,), True)},
    "flatten": {},
    "scale": {"factor": (_NUM, REQUIRED)},
}
TOP_KEYS = {"name", "layers", "init", "output", "description", "input_shape"}
MAX_IMAGE_SIDE = 1024
CLASSES = "classes"  # a dense layer of as many units as the dataset has classes
INITS = {
    "glorot": "Keras: Glorot-uniform kernels, zero biases",
    "torch": "PyTorch's defaults",
    "identity": "PyTorch's defaults, and each conv's first C_in filters start as the identity (airbench)",
}


# ---------------------------------------------------------------------------------------------------
# Layers that torch does not have


class Whiten(nn.Conv2d):
    """Frozen patch-whitening conv (airbench): filters are the eigenvectors of the covariance of
    kernel x kernel patches of the training images, scaled by 1/sqrt(eigenvalue), in +/- pairs.
    Set from data by :meth:`init_from_data` before training; not trained."""

    def __init__(self, in_channels: int, kernel: int, eps: float):
        super().__init__(in_channels, 2 * in_channels * kernel * kernel, kernel, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """``images``: normalized float (N, C, H, W); a few thousand are plenty."""
        k = self.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N C H' W' k k
        patches = patches.transpose(1, 3).reshape(-1, images.shape[1] * k * k).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + self.eps)[:, None]).float()
        filters = filters.reshape(-1, images.shape[1], k, k)
        self.weight.copy_(torch.cat([filters, -filters]))
        self.bias.zero_()


class Dropout(nn.Dropout):
    """Inverted dropout whose CPU masks come from random bytes, eight per 64-bit draw.

    On CPU, PyTorch's per-element Bernoulli draw was 18% of the exercise net's training step
    (bench/profile_epoch.py); one random byte per element compared with a threshold is about 2.5x
    cheaper. The rate is applied in steps of 1/256 (0.25 and 0.5 exactly; others to within 0.002) and the
    survivors are scaled by 1 / (1 - that rate), so the expected activation is unchanged. Other devices
    use torch's own fused dropout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        threshold = round(self.p * 256)
        info = torch.iinfo(torch.int64)
        words = torch.randint(info.min, info.max, ((x.numel() + 7) // 8,), dtype=torch.int64)
        # Lay the bytes out in x's own memory order (channels_last or not): no layout conversion follows.
        rand = torch.empty_like(x, dtype=torch.uint8)
        rand.as_strided((x.numel(),), (1,)).copy_(words.view(torch.uint8)[: x.numel()])
        return x * (rand >= threshold) * (256.0 / (256 - threshold))


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * self.factor

    def extra_repr(self):
        return f"factor={self.factor}"


class GlobalMaxPool(nn.Module):
    def forward(self, x):
        return torch.amax(x, dim=(2, 3))


class GlobalAvgPool(nn.Module):
    def forward(self, x):
        return torch.mean(x, dim=(2, 3))


# ---------------------------------------------------------------------------------------------------
# Validation and shape arithmetic


def _short(value) -> str:
    return short_repr(value, 60)


def _check_value(where: str, key: str, value, types, minimum=None, maximum=None):
    if isinstance(value, bool) and bool not in types:
        raise DeclarationError(f"{where}: '{key}' must be a number, not {value!r}")
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise DeclarationError(f"{where}: '{key}' must be {names}, not {type(value).__name__} {_short(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # Only floats can be inf/nan; huge ints compare exactly with the bounds below.
        if isinstance(value, float) and not math.isfinite(value):
            raise DeclarationError(f"{where}: '{key}' must be finite, not {value!r}")
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            raise DeclarationError(f"{where}: '{key}' = {value} is outside {minimum}..{maximum}")


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _layer_params(layer: dict, shape: tuple) -> tuple[tuple, int]:
    """Return (output shape, parameter count) for one validated layer on an input ``shape``."""
    t = layer["type"]
    where = f"layer {layer['name']!r} ({t}) on input {_fmt_shape(shape)}"
    spatial = len(shape) == 3
    if t in ("conv", "whiten", "maxpool", "avgpool", "global_maxpool", "global_avgpool", "batchnorm") \
            and not spatial and t != "batchnorm":
        raise DeclarationError(f"{where}: needs an image-shaped input (C, H, W); put it before 'flatten'")
    if t == "conv":
        c, h, w = shape
        k, s = layer["kernel"], layer["stride"]
        pad = layer["padding"]
        if pad == "same":
            if s != 1:
                raise DeclarationError(f"{where}: padding 'same' needs stride 1")
            if k % 2 == 0:
                raise DeclarationError(f"{where}: padding 'same' needs an odd kernel, got {k}")
            pad = k // 2
        elif pad == "valid":
            pad = 0
        elif not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad <= MAX_KERNEL:
            raise DeclarationError(f"{where}: 'padding' must be 'same', 'valid' or 0..{MAX_KERNEL}")
        layer["_pad"] = pad
        oh, ow = _conv_out(h, k, s, pad), _conv_out(w, k, s, pad)
        if oh < 1 or ow < 1:
            raise DeclarationError(f"{where}: kernel {k} with stride {s} leaves no output")
        f = layer["filters"]
        return (f, oh, ow), f * c * k * k + (f if layer["bias"] else 0)
    if t == "whiten":
        c, h, w = shape
        k = layer["kernel"]
        if k > h or k > w:
            raise DeclarationError(f"{where}: kernel {k} is larger than the input")
        f = 2 * c * k * k
        return (f, h - k + 1, w - k + 1), f * c * k * k + f
    if t == "dense":
        if spatial:
            raise DeclarationError(f"{where}: needs a flat input; add a 'flatten' layer before it")
        u = layer["units"]
        return (u,), shape[0] * u + (u if layer["bias"] else 0)
    if t in ("maxpool", "avgpool"):
        c, h, w = shape
        size = layer["size"]
        stride = layer["stride"] or size
        oh, ow = _conv_out(h, size, stride, 0), _conv_out(w, size, stride, 0)
        if oh < 1 or ow < 1:
            raise DeclarationError(f"{where}: pool size {size} is larger than the input")
        return (c, oh, ow), 0
    if t in ("global_maxpool", "global_avgpool"):
        return (shape[0],), 0
    if t == "flatten":
        return (math.prod(shape),), 0
    if t == "batchnorm":
        return shape, 2 * shape[0]
    return shape, 0  # activations, dropout, scale


def _fmt_shape(shape) -> str:
    return str(tuple(shape))


def _check_input_shape(value) -> tuple[int, int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 1 <= value[0] <= 4 or not all(1 <= v <= MAX_IMAGE_SIDE for v in value[1:]):
        raise DeclarationError(f"'input_shape' must be [channels 1..4, height, width 1..{MAX_IMAGE_SIDE}], not "
                               f"{_short(value)}")
    return tuple(value)


def validate(declaration: dict, num_classes: int | None = None, input_shape=None) -> dict:
    """Check a declaration completely and return a normalized copy (defaults filled in, names set).

    ``input_shape`` (C, H, W) overrides the declaration's own (default 3x32x32); ``num_classes``, when
    given, is what the last layer must output and what ``"units": "classes"`` stands for (10 when not
    given)."""
    if not isinstance(declaration, dict):
        raise DeclarationError(f"a declaration must be an object with 'layers', not {type(declaration).__name__}")
    if not all(isinstance(k, str) for k in declaration):
        raise DeclarationError("the declaration's keys must be strings")
    unknown = set(declaration) - TOP_KEYS
    if unknown:
        raise DeclarationError(f"unknown top-level key(s) {sorted(unknown)}; expected some of {sorted(TOP_KEYS)}")
    layers = declaration.get("layers")
    if not isinstance(layers, list) or not layers:
        raise DeclarationError("'layers' must be a non-empty list of layer objects")
    if len(layers) > MAX_LAYERS:
        raise DeclarationError(f"{len(layers)} layers is more than the {MAX_LAYERS} allowed")
    init = declaration.get("init", "glorot")
    if init not in INITS:
        raise DeclarationError(f"'init' must be one of {', '.join(INITS)}, not {_short(init)}")
    for key in ("name", "description"):
        value = declaration.get(key, "")
        if not isinstance(value, str) or len(value) > 1000:
            raise DeclarationError(f"'{key}' must be a string of at most 1000 characters, not {_short(value)}")
    shape = _check_input_shape(input_shape if input_shape is not None else
                               declaration.get("input_shape", INPUT_SHAPE))
    out = {"name": declaration.get("name", "custom"), "init": init, "input_shape": list(shape), "layers": []}
    if "description" in declaration:
        out["description"] = declaration["description"]
    total, counters, names = 0, {}, set()
    for i, raw in enumerate(layers):
        if not isinstance(raw, dict):
            raise DeclarationError(f"layer {i}: must be an object like {{'type': 'conv', ...}}, not {_short(raw)}")
        if not all(isinstance(k, str) for k in raw):
            raise DeclarationError(f"layer {i}: keys must be strings")
        t = raw.get("type")
        if not isinstance(t, str) or t not in LAYER_KEYS:
            raise DeclarationError(f"layer {i}: unknown type {_short(t)}; known types: {', '.join(LAYER_KEYS)}")
        counters[t] = counters.get(t, 0) + 1
        name = raw.get("name", f"{t}_{counters[t]}")
        if not isinstance(name, str) or not name.isidentifier() or len(name) > 64 or name in names:
            raise DeclarationError(f"layer {i}: name {_short(name)} must be a unique identifier (letters, digits, _)")
        names.add(name)
        spec = LAYER_KEYS[t]
        extra = set(raw) - set(spec) - {"type", "name"}
        if extra:
            raise DeclarationError(f"layer {i} {name!r} ({t}): unknown key(s) {sorted(extra)}; "
                                   f"allowed: {sorted(spec) or 'none'}")
        layer = {"type": t, "name": name}
        for key, (types, default) in spec.items():
            if key in raw:
                value = raw[key]
                if key == "units" and value == CLASSES:
                    value = num_classes or 10
            elif default is REQUIRED:
                raise DeclarationError(f"layer {i} {name!r} ({t}): missing required key '{key}'")
            else:
                value = default
            if value is not None or default is not None:  # an explicit null is a wrong type, not a default
                bounds = {"filters": (1, MAX_CHANNELS), "units": (1, MAX_UNITS), "kernel": (1, MAX_KERNEL),
                          "stride": (1, MAX_KERNEL), "size": (1, MAX_KERNEL), "rate": (0, 0.99),
                          "slope": (0, 10), "momentum": (0, 1), "eps": (0, 1), "factor": (-1e6, 1e6)}
                if key != "padding":
                    _check_value(f"layer {i} {name!r} ({t})", key, value, types, *bounds.get(key, (None, None)))
                elif not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise DeclarationError(f"layer {i} {name!r} (conv): 'padding' must be 'same', 'valid' or an int")
            layer[key] = value
        new_shape, params = _layer_params(layer, shape)
        layer.pop("_pad", None)
        total += params
        if total > MAX_PARAMS:
            raise DeclarationError(f"layer {i} {name!r}: the model would exceed {MAX_PARAMS:,} parameters")
        shape = new_shape
        out["layers"].append(layer)
    expected = (num_classes,) if num_classes else None
    if (expected and shape != expected) or len(shape) != 1 or shape[0] < 2:
        n = num_classes or "N"
        raise DeclarationError(f"the last layer {out['layers'][-1]['name']!r} outputs {_fmt_shape(shape)}; "
                               f"expected ({n},) for {n} classes (end with a dense layer of {n} units, or "
                               f"\"units\": \"classes\")")
    return out


# ---------------------------------------------------------------------------------------------------
# Building


class Net(nn.Sequential):
    """A sequential network built from a declaration; returns logits."""

    def __init__(self, declaration: dict):
        decl = validate(declaration)
        super().__init__(OrderedDict((layer["name"], _build_layer(layer, shape))
                                     for layer, shape in zip(decl["layers"], _input_shapes(decl))))
        self.declaration = decl
        if decl["init"] == "glorot":
            keras_init_(self)
        elif decl["init"] == "identity":
            identity_init_(self)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialization (the patch-whitening layer), given normalized images."""
        x = images
        with torch.no_grad():
            for layer in self:
                if isinstance(layer, Whiten):
                    layer.init_from_data(x)
                x = layer(x)


def input_shape(decl: dict) -> tuple[int, int, int]:
    """(C, H, W) a validated declaration takes (declarations stored before this key: 3x32x32)."""
    return tuple(decl.get("input_shape", INPUT_SHAPE))


def _input_shapes(decl: dict) -> list[tuple]:
    shapes, shape = [], input_shape(decl)
    for layer in decl["layers"]:
        shapes.append(shape)
        shape, _ = _layer_params(dict(layer), shape)
    return shapes


def _build_layer(layer: dict, shape: tuple) -> nn.Module:
    t = layer["type"]
    if t == "conv":
        pad = layer["padding"]
        pad = {"same": layer["kernel"] // 2, "valid": 0}.get(pad, pad)
        return nn.Conv2d(shape[0], layer["filters"], layer["kernel"], layer["stride"], pad, bias=layer["bias"])
    if t == "whiten":
        return Whiten(shape[0], layer["kernel"], layer["eps"])
    if t == "dense":
        return nn.Linear(shape[0], layer["units"], bias=layer["bias"])
    if t == "leaky_relu":
        return nn.LeakyReLU(layer["slope"])
    if t in ("maxpool", "avgpool"):
        cls = nn.MaxPool2d if t == "maxpool" else nn.AvgPool2d
        return cls(layer["size"], layer["stride"] or layer["size"])
    if t == "dropout":
        return Dropout(layer["rate"])
    if t == "batchnorm":
        cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
        bn = cls(shape[0], eps=layer["eps"], momentum=layer["momentum"])
        bn.weight.requires_grad_(layer["scale"])  # airbench keeps the scale at 1 and learns only the shift
        return bn
    if t == "scale":
        return Scale(layer["factor"])
    simple = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "flatten": nn.Flatten,
              "global_maxpool": GlobalMaxPool, "global_avgpool": GlobalAvgPool}
    return simple[t]()


@torch.no_grad()
def keras_init_(model: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels and zero biases for conv and dense layers.

    PyTorch's default (Kaiming-uniform with a=sqrt(5)) draws smaller weights; the exercise's recipe
    (Adamax at 5e-3) was tuned with Keras's init, so we match it.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, Whiten):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def identity_init_(model: nn.Module) -> None:
    """airbench's conv init: PyTorch's default, then the first C_in filters of each conv set to the
    identity (Dirac), so at the start every block passes its input through as well as new features."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, Whiten) and m.out_channels >= m.in_channels:
            nn.init.dirac_(m.weight[:m.in_channels])


# ---------------------------------------------------------------------------------------------------
# Summary


def summary(model_or_decl, num_classes: int | None = None) -> str:
    """A Keras-style table: layer (type), output shape (N, C, H, W), parameter count, totals."""
    if isinstance(model_or_decl, Net):
        decl = model_or_decl.declaration
        trainable = model_or_decl.num_parameters(trainable_only=True)
    else:
        decl = validate(model_or_decl, num_classes)
        trainable = None
    rows, shape, total, frozen = [], input_shape(decl), 0, 0
    for layer in decl["layers"]:
        shape, params = _layer_params(dict(layer), shape)
        total += params
        if layer["type"] == "whiten":
            frozen += params
        elif layer["type"] == "batchnorm" and not layer["scale"]:
            frozen += params // 2
        rows.append((f"{layer['name']} ({layer['type']})", "(None, " + ", ".join(map(str, shape)) + ")", params))
    rows.append(("softmax (at prediction)", f"(None, {shape[0]})", 0))
    if trainable is None:
        trainable = total - frozen
    width = (34, 24, 12)
    line = "_" * sum(width)
    out = [f'Model: "{decl["name"]}"  (input {"x".join(map(str, input_shape(decl)))}; shapes are N, C, H, W)', line,
           f"{'Layer (type)':<{width[0]}}{'Output Shape':<{width[1]}}{'Param #':>{width[2]}}", "=" * sum(width)]
    for i, (name, shp, params) in enumerate(rows):
        out.append(f"{name:<{width[0]}}{shp:<{width[1]}}{params:>{width[2]},}")
        out.append("=" * sum(width) if i == len(rows) - 1 else line)
    out += [f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line]
    return "\n".join(out)


def count_parameters(decl: dict) -> int:
    decl = validate(decl)
    shape, total = input_shape(decl), 0
    for layer in decl["layers"]:
        shape, params = _layer_params(dict(layer), shape)
        total += params
    return total


# ---------------------------------------------------------------------------------------------------
# Registry


def _exercise() -> dict:
    def conv(name, f):
        return [{"type": "conv", "name": name, "filters": f, "kernel": 3, "padding": "same"},
                {"type": "leaky_relu", "name": f"leaky_re_lu_{name[-1]}", "slope": 0.1}]

    return {
        "name": "exercise",
        "description": "The exercise's CNN: conv 16-32, pool, dropout, conv 32-64, pool, dropout, dense 256, dense 10.",
        "init": "glorot",
        "layers": conv("conv1", 16) + conv("conv2", 32) + [
            {"type": "maxpool", "name": "max_pool_1", "size": 2},
            {"type": "dropout", "name": "dropout_1", "rate": 0.25}] + conv("conv3", 32) + conv("conv4", 64) + [
            {"type": "maxpool", "name": "max_pool_2", "size": 2},
            {"type": "dropout", "name": "dropout_2", "rate": 0.25},
            {"type": "flatten", "name": "flatten_1"},
            {"type": "dense", "name": "fc1", "units": 256},
            {"type": "leaky_relu", "name": "leaky_re_lu_5", "slope": 0.1},
            {"type": "dropout", "name": "dropout_3", "rate": 0.5},
            {"type": "dense", "name": "dense_1", "units": CLASSES},
        ],
    }


def airbench_like(widths=(64, 256, 256), name="airbench94", scale=1 / 9, init="torch", bn_scale=True) -> dict:
    """An airbench-style net: frozen 2x2 patch whitening, then three conv groups
    (conv, maxpool, batchnorm, gelu, conv, batchnorm, gelu), global max-pool, dense, logit scale.
    ``init="identity"`` and ``bn_scale=False`` are airbench94's own choices."""
    layers = [{"type": "whiten", "name": "whiten", "kernel": 2}, {"type": "gelu", "name": "gelu_0"}]
    for g, w in enumerate(widths, start=1):
        layers += [
            {"type": "conv", "name": f"g{g}_conv1", "filters": w, "bias": False},
            {"type": "maxpool", "name": f"g{g}_pool", "size": 2},
            {"type": "batchnorm", "name": f"g{g}_bn1", "momentum": 0.4, "eps": 1e-12, "scale": bn_scale},
            {"type": "gelu", "name": f"g{g}_gelu1"},
            {"type": "conv", "name": f"g{g}_conv2", "filters": w, "bias": False},
            {"type": "batchnorm", "name": f"g{g}_bn2", "momentum": 0.4, "eps": 1e-12, "scale": bn_scale},
            {"type": "gelu", "name": f"g{g}_gelu2"},
        ]
    layers += [{"type": "global_maxpool", "name": "pool"},
               {"type": "dense", "name": "head", "units": CLASSES, "bias": False},
               {"type": "scale", "name": "logit_scale", "factor": scale}]
    return {"name": name, "init": init, "layers": layers,
            "description": f"airbench-style net, conv groups of widths {list(widths)}"}


MODELS: dict[str, dict] = {
    "exercise": _exercise(),
    "fast": airbench_like((32, 64, 128), name="fast"),
    "airbench94": airbench_like((64, 256, 256), name="airbench94", init="identity", bn_scale=False),
}


def register_model(name: str, declaration: dict) -> None:
    """Add a declaration to the registry (validated now, so errors surface at registration; stored as
    given, so ``"units": "classes"`` still adapts to each dataset)."""
    validate(declaration)
    MODELS[name] = copy.deepcopy(declaration)


def load_declaration_file(path: str | Path, num_classes: int | None = None, input_shape=None) -> dict:
    path = Path(path)
    try:
        if not path.is_file():  # also keeps a FIFO named x.json from hanging the read
            raise DeclarationError(f"{path}: no such declaration file")
        if path.stat().st_size > 1 << 20:
            raise DeclarationError(f"{path}: a declaration over 1 MiB is not plausible")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DeclarationError(f"{path}: cannot read the declaration ({e.strerror})") from None
    except UnicodeDecodeError:
        raise DeclarationError(f"{path}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise DeclarationError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    except RecursionError:
        raise DeclarationError(f"{path}: nested too deeply to be a declaration") from None
    try:
        return validate(data, num_classes, input_shape)
    except DeclarationError as e:
        raise DeclarationError(f"{path}: {e}") from None


def get_declaration(name_or_path: str | dict, num_classes: int | None = None, input_shape=None) -> dict:
    """A registered name, a .json/.toml file, or a declaration dict -> a validated declaration for
    ``num_classes`` classes and images of ``input_shape`` (C, H, W); defaults: 10 and 3x32x32."""
    if isinstance(name_or_path, dict):
        return validate(name_or_path, num_classes, input_shape)
    if name_or_path in MODELS:
        return validate(copy.deepcopy(MODELS[name_or_path]), num_classes, input_shape)
    if str(name_or_path).endswith((".json", ".toml")):
        return load_declaration_file(name_or_path, num_classes, input_shape)
    raise DeclarationError(f"unknown model {name_or_path!r}: use one of {', '.join(MODELS)} or a .json/.toml "
                           f"declaration file")


def build_model(name_or_decl: str | dict, num_classes: int | None = None, input_shape=None) -> Net:
    return Net(get_declaration(name_or_decl, num_classes, input_shape))
