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

Residual blocks are layers too, still data::

    {"type": "residual", "name": "block1",
     "body": [{"type": "conv", "name": "conv1", "filters": 64, "bias": false}, {"type": "batchnorm", "name": "bn1"},
              {"type": "relu", "name": "relu1"}, {"type": "conv", "name": "conv2", "filters": 64}],
     "shortcut": []}

outputs ``body(x) + shortcut(x)`` (``"shortcut": []``, the default, is the identity; a projection is a
list of layers such as a 1x1 conv and a batchnorm). Both must output the same shape, checked by
arithmetic with the rest. Names inside a block are local to it and unique within it (body and shortcut
together); the layer's full name is dotted, ``block1.conv1``, and is its module name in the built net
(``dict(net.named_modules())["block1.conv1"]``), so its state_dict keys read ``block1.conv1.weight``.
Blocks nest (a body may hold blocks) up to :data:`MAX_DEPTH` levels; :data:`MAX_LAYERS` counts every
layer at every level. An activation after the addition is the next layer of the enclosing list.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import tomllib
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .errors import DeclarationError, short_repr

INPUT_SHAPE = (3, 32, 32)
MAX_CHANNELS = 8192
MAX_UNITS = 1 << 16
MAX_KERNEL = 32
MAX_PARAMS = 500_000_000
MAX_LAYERS = 512   # every layer at every nesting level, blocks included
MAX_DEPTH = 8      # residual blocks inside residual blocks

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
    # body(x) + shortcut(x); validated by _validate_block, built as a Residual module
    "residual": {"body": ((list,), REQUIRED), "shortcut": ((list,), [])},
}
BLOCK_TYPES = {"residual"}
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


class Residual(nn.Module):
    """A declared residual block: ``body(x) + shortcut(x)``.

    The block's layers are its children under their declared (local) names, so a layer's module name is
    its dotted full name (``block1.conv1``); ``body_names`` and ``shortcut_names`` say which run in
    which branch, in order. An empty shortcut is the identity."""

    def __init__(self, body: list[tuple[str, nn.Module]], shortcut: list[tuple[str, nn.Module]]):
        super().__init__()
        for name, module in body + shortcut:
            self.add_module(name, module)
        self.body_names = tuple(name for name, _ in body)
        self.shortcut_names = tuple(name for name, _ in shortcut)

    def forward(self, x):
        y = x
        for name in self.body_names:
            y = self._modules[name](y)
        s = x
        for name in self.shortcut_names:
            s = self._modules[name](s)
        return y + s

    def extra_repr(self):
        return f"body={list(self.body_names)}, shortcut={list(self.shortcut_names) or 'identity'}"


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


def _layer_params(layer: dict, shape: tuple, full_name: str | None = None) -> tuple[tuple, int]:
    """Return (output shape, parameter count) for one validated layer on an input ``shape`` (a block's:
    all its layers'). ``full_name``: the dotted name for messages (default: the layer's own)."""
    t = layer["type"]
    full_name = full_name or layer["name"]
    where = f"layer {full_name!r} ({t}) on input {_fmt_shape(shape)}"
    if t == "residual":
        return _block_params(layer, shape, full_name)
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


def _branch_params(layers: list, shape: tuple, prefix: str) -> tuple[tuple, int]:
    total = 0
    for layer in layers:
        shape, params = _layer_params(layer, shape, prefix + layer["name"])
        total += params
    return shape, total


def _block_params(layer: dict, shape: tuple, full_name: str) -> tuple[tuple, int]:
    body, body_params = _branch_params(layer["body"], shape, full_name + ".")
    short, short_params = _branch_params(layer["shortcut"], shape, full_name + ".")
    if body != short:
        what = "its shortcut" if layer["shortcut"] else "its identity shortcut (the block's input)"
        hint = ""
        if not layer["shortcut"] and len(body) == 3 and len(shape) == 3:
            stride = shape[1] // body[1] if body[1] and shape[1] % body[1] == 0 else 1
            hint = (f"; a projection shortcut would be [{{\"type\": \"conv\", \"filters\": {body[0]}, "
                    f"\"kernel\": 1, \"stride\": {stride}, \"padding\": 0}}]")
        raise DeclarationError(f"residual block {full_name!r} on input {_fmt_shape(shape)}: its body outputs "
                               f"{_fmt_shape(body)} but {what} gives {_fmt_shape(short)}; the two must have "
                               f"the same shape to be added{hint}")
    return body, body_params + short_params


def _fmt_shape(shape) -> str:
    return str(tuple(shape))


@functools.lru_cache(maxsize=1)
def _reserved_names() -> frozenset:
    """Names a layer cannot have: attributes of the modules it would be set on (``forward``, ``training``,
    ``declaration``, ...); torch would refuse them only when building."""
    return frozenset(set(dir(Net)) | set(dir(Residual)) | set(vars(nn.Module()))
                     | {"declaration", "body_names", "shortcut_names"})


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
    # The declaration's own shape is checked even when the caller overrides it: a broken field is refused,
    # not silently replaced.
    shape = _check_input_shape(declaration.get("input_shape", INPUT_SHAPE))
    if input_shape is not None:
        shape = _check_input_shape(input_shape)
    out = {"name": declaration.get("name", "custom"), "init": init, "input_shape": list(shape), "layers": []}
    if "description" in declaration:
        out["description"] = declaration["description"]
    state = _State(num_classes)
    out["layers"], shape = _validate_list(layers, shape, state, prefix="", where="", depth=0)
    expected = (num_classes,) if num_classes else None
    if (expected and shape != expected) or len(shape) != 1 or shape[0] < 2:
        n = num_classes or "N"
        raise DeclarationError(f"the last layer {out['layers'][-1]['name']!r} outputs {_fmt_shape(shape)}; "
                               f"expected ({n},) for {n} classes (end with a dense layer of {n} units, or "
                               f"\"units\": \"classes\")")
    return out


class _State:
    """What validation counts across all nesting levels."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.params = 0
        self.layers = 0


_BOUNDS = {"filters": (1, MAX_CHANNELS), "units": (1, MAX_UNITS), "kernel": (1, MAX_KERNEL),
           "stride": (1, MAX_KERNEL), "size": (1, MAX_KERNEL), "rate": (0, 0.99),
           "slope": (0, 10), "momentum": (0, 1), "eps": (0, 1), "factor": (-1e6, 1e6)}


def _validate_list(layers: list, shape: tuple, state: _State, prefix: str, where: str, depth: int,
                   names: set | None = None, counters: dict | None = None) -> tuple[list, tuple]:
    """Validate one list of layers (the net's, or a block's body or shortcut) on an input ``shape``.

    ``prefix``: the enclosing block's dotted name plus "." ("" at the top); ``where``: how messages refer
    to this list ("" at the top: "layer 3"; inside a block: "layer block1.body[3]"). ``names`` and
    ``counters`` are shared by a block's body and shortcut (one namespace)."""
    names = set() if names is None else names
    counters = {} if counters is None else counters
    if len(layers) > MAX_LAYERS - state.layers:
        raise DeclarationError(f"{where or 'the net'}: more than the {MAX_LAYERS} layers allowed (counting the "
                               f"layers inside blocks)")
    out = []
    for i, raw in enumerate(layers):
        at = f"layer {where}[{i}]" if where else f"layer {i}"
        state.layers += 1
        if state.layers > MAX_LAYERS:
            raise DeclarationError(f"{at}: more than the {MAX_LAYERS} layers allowed (counting the layers inside "
                                   f"blocks)")
        if not isinstance(raw, dict):
            raise DeclarationError(f"{at}: must be an object like {{'type': 'conv', ...}}, not {_short(raw)}")
        if not all(isinstance(k, str) for k in raw):
            raise DeclarationError(f"{at}: keys must be strings")
        t = raw.get("type")
        if not isinstance(t, str) or t not in LAYER_KEYS:
            raise DeclarationError(f"{at}: unknown type {_short(t)}; known types: {', '.join(LAYER_KEYS)}")
        counters[t] = counters.get(t, 0) + 1
        name = raw.get("name", f"{t}_{counters[t]}")
        if not isinstance(name, str) or not name.isidentifier() or len(name) > 64 or name in names:
            scope = " within its block" if prefix else ""
            raise DeclarationError(f"{at}: name {_short(name)} must be a unique identifier{scope} (letters, "
                                   f"digits, _)")
        if name in _reserved_names():
            raise DeclarationError(f"{at}: name {name!r} is reserved (an attribute of the built module); "
                                   f"choose another")
        names.add(name)
        full = prefix + name
        at = f"{at} {full!r} ({t})"
        spec = LAYER_KEYS[t]
        extra = set(raw) - set(spec) - {"type", "name"}
        if extra:
            raise DeclarationError(f"{at}: unknown key(s) {sorted(extra)}; allowed: {sorted(spec) or 'none'}")
        if t in BLOCK_TYPES:
            layer, new_shape = _validate_block(raw, name, shape, state, full, at, depth)
            out.append(layer)
            shape = new_shape
            continue
        layer = {"type": t, "name": name}
        for key, (types, default) in spec.items():
            if key in raw:
                value = raw[key]
                if key == "units" and value == CLASSES:
                    value = state.num_classes or 10
            elif default is REQUIRED:
                raise DeclarationError(f"{at}: missing required key '{key}'")
            else:
                value = default
            if value is not None or default is not None:  # an explicit null is a wrong type, not a default
                if key != "padding":
                    _check_value(at, key, value, types, *_BOUNDS.get(key, (None, None)))
                elif not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise DeclarationError(f"{at}: 'padding' must be 'same', 'valid' or an int")
            layer[key] = value
        new_shape, params = _layer_params(layer, shape, full)
        state.params += params
        if state.params > MAX_PARAMS:
            raise DeclarationError(f"{at}: the model would exceed {MAX_PARAMS:,} parameters")
        shape = new_shape
        out.append(layer)
    return out, shape


def _validate_block(raw: dict, name: str, shape: tuple, state: _State, full: str, at: str,
                    depth: int) -> tuple[dict, tuple]:
    """A residual block: body and shortcut validated as lists on the block's input, shapes compared."""
    if depth + 1 > MAX_DEPTH:
        raise DeclarationError(f"{at}: residual blocks nested more than {MAX_DEPTH} deep")
    branches = {}
    for key in ("body", "shortcut"):
        value = raw.get(key, [])
        if key == "body" and "body" not in raw:
            raise DeclarationError(f"{at}: missing required key 'body' (a list of layers)")
        if not isinstance(value, list):
            raise DeclarationError(f"{at}: '{key}' must be a list of layers, not {type(value).__name__} "
                                   f"{_short(value)}")
        branches[key] = value
    if not branches["body"]:
        raise DeclarationError(f"{at}: 'body' must be a non-empty list of layers")
    names, counters = set(), {}
    body, body_shape = _validate_list(branches["body"], shape, state, full + ".", full + ".body", depth + 1,
                                      names, counters)
    shortcut, short_shape = _validate_list(branches["shortcut"], shape, state, full + ".", full + ".shortcut",
                                           depth + 1, names, counters)
    layer = {"type": "residual", "name": name, "body": body, "shortcut": shortcut}
    out_shape, _ = _block_params(layer, shape, full)  # the shape check, with its message
    return layer, out_shape


# ---------------------------------------------------------------------------------------------------
# Building


class Net(nn.Sequential):
    """A sequential network built from a declaration; returns logits."""

    def __init__(self, declaration: dict):
        decl = validate(declaration)
        super().__init__(OrderedDict(_build_list(decl["layers"], input_shape(decl))))
        self.declaration = decl
        if decl["init"] == "glorot":
            keras_init_(self)
        elif decl["init"] == "identity":
            identity_init_(self)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialization (the patch-whitening layers, wherever they are), given normalized
        images: one forward pass in the current mode, each whitening layer set from its own input."""
        whitens = [m for m in self.modules() if isinstance(m, Whiten)]
        if not whitens:
            return
        handles = [w.register_forward_pre_hook(lambda module, args: module.init_from_data(args[0]))
                   for w in whitens]
        try:
            with torch.no_grad():
                self(images)
        finally:
            for handle in handles:
                handle.remove()


def input_shape(decl: dict) -> tuple[int, int, int]:
    """(C, H, W) a validated declaration takes (declarations stored before this key: 3x32x32)."""
    return tuple(decl.get("input_shape", INPUT_SHAPE))


def _build_list(layers: list, shape: tuple) -> list[tuple[str, nn.Module]]:
    out = []
    for layer in layers:
        out.append((layer["name"], _build_layer(layer, shape)))
        shape, _ = _layer_params(layer, shape)
    return out


def _build_layer(layer: dict, shape: tuple) -> nn.Module:
    t = layer["type"]
    if t == "residual":
        return Residual(_build_list(layer["body"], shape), _build_list(layer["shortcut"], shape))
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


class LayerInfo(NamedTuple):
    """One declared layer with its place in the net: what :func:`layers` yields."""

    name: str            # full dotted name, the module's name in the built net ("block1.conv1")
    type: str
    layer: dict          # the validated declaration of the layer (a block's includes its layers)
    input_shape: tuple   # (C, H, W) or (features,), without the batch dimension
    output_shape: tuple
    params: int          # a block's: all of its layers'
    depth: int           # 0 at the top, 1 inside a block, ...
    branch: str          # "" at the top, else "body" or "shortcut" of the enclosing block
    parent: str          # the enclosing block's full name ("" at the top)


def head_name(declaration: dict) -> str | None:
    """The (dotted) name of the declaration's last dense layer, the head (None when it has none): what
    fine-tuning replaces and what OOD features are read in front of."""
    dense = [info.name for info in layers(declaration) if info.type == "dense"]
    return dense[-1] if dense else None


def layers(decl: dict) -> list[LayerInfo]:
    """Every layer of a validated declaration in execution order, blocks before their layers (body, then
    shortcut), with dotted names, shapes and parameter counts."""
    out: list[LayerInfo] = []

    def walk(items, shape, prefix, depth, branch, parent):
        for layer in items:
            full = prefix + layer["name"]
            new_shape, params = _layer_params(layer, shape, full)
            out.append(LayerInfo(full, layer["type"], layer, tuple(shape), tuple(new_shape), params, depth, branch,
                                 parent))
            if layer["type"] == "residual":
                walk(layer["body"], shape, full + ".", depth + 1, "body", full)
                walk(layer["shortcut"], shape, full + ".", depth + 1, "shortcut", full)
            shape = new_shape
        return shape

    walk(decl["layers"], input_shape(decl), "", 0, "", "")
    return out


def has_layer_type(decl: dict, layer_type: str) -> bool:
    """Whether a validated declaration has a layer of ``layer_type`` anywhere, blocks included."""
    return any(info.type == layer_type for info in layers(decl))


def _frozen_params(info: LayerInfo) -> int:
    if info.type == "whiten":
        return info.params
    if info.type == "batchnorm" and not info.layer["scale"]:
        return info.params // 2
    return 0


def summary(model_or_decl, num_classes: int | None = None) -> str:
    """A Keras-style table: layer (type), output shape (N, C, H, W), parameter count, totals. Layers inside
    a residual block are indented under it, with dotted names; the block's row counts them."""
    if isinstance(model_or_decl, Net):
        decl = model_or_decl.declaration
        trainable = model_or_decl.num_parameters(trainable_only=True)
    else:
        decl = validate(model_or_decl, num_classes)
        trainable = None
    infos = layers(decl)
    total = sum(info.params for info in infos if info.depth == 0)
    frozen = sum(_frozen_params(info) for info in infos)
    rows = []
    for info in infos:
        kind = info.type
        if kind == "residual":
            kind += ", identity shortcut" if not info.layer["shortcut"] else ""
        elif info.branch == "shortcut":
            kind += ", shortcut"
        label = "  " * info.depth + f"{info.name} ({kind})"
        rows.append((label, "(None, " + ", ".join(map(str, info.output_shape)) + ")", info.params))
    shape = infos[-1].output_shape if infos else (0,)
    rows.append(("softmax (at prediction)", f"(None, {shape[0]})", 0))
    if trainable is None:
        trainable = total - frozen
    width = (max(34, max(len(r[0]) for r in rows) + 2), 24, 12)
    line = "_" * sum(width)
    out = [f'Model: "{decl["name"]}"  (input {"x".join(map(str, input_shape(decl)))}; shapes are N, C, H, W)', line,
           f"{'Layer (type)':<{width[0]}}{'Output Shape':<{width[1]}}{'Param #':>{width[2]}}", "=" * sum(width)]
    for i, (name, shp, params) in enumerate(rows):
        out.append(f"{name:<{width[0]}}{shp:<{width[1]}}{params:>{width[2]},}")
        out.append("=" * sum(width) if i == len(rows) - 1 else line)
    out += [f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line]
    if any(info.depth for info in infos):
        out.insert(-1, "Indented rows are the layers of the residual block above them (output = body + "
                       "shortcut); the block's row counts their parameters.")
    return "\n".join(out)


def count_parameters(decl: dict) -> int:
    decl = validate(decl)
    return sum(info.params for info in layers(decl) if info.depth == 0)


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


def resnet18() -> dict:
    """ResNet-18, CIFAR variant (He et al. 2016, as commonly adapted to 32x32 images): a 3x3 stem conv of 64
    filters with BatchNorm and ReLU and no max-pool, four stages of two basic blocks (two 3x3 convs with
    BatchNorm) of widths 64/128/256/512, the first conv of stages 2-4 with stride 2, a 1x1-conv + BatchNorm
    projection shortcut where the stride or width changes (identity elsewhere), ReLU after each addition,
    global average pool and a dense head. Convs have no bias (BatchNorm follows). 11,173,962 parameters for
    10 classes. Blocks are ``layer{stage}_{block}``; inside, ``conv1 bn1 relu1 conv2 bn2`` and the shortcut's
    ``down_conv down_bn``; the ReLU after the addition is ``layer{stage}_{block}_relu``."""
    layers = [{"type": "conv", "name": "conv1", "filters": 64, "bias": False},
              {"type": "batchnorm", "name": "bn1"}, {"type": "relu", "name": "relu1"}]
    width_in = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in (1, 2):
            stride = 2 if stage > 1 and block == 1 else 1
            body = [{"type": "conv", "name": "conv1", "filters": width, "stride": stride, "padding": 1, "bias": False},
                    {"type": "batchnorm", "name": "bn1"}, {"type": "relu", "name": "relu1"},
                    {"type": "conv", "name": "conv2", "filters": width, "bias": False},
                    {"type": "batchnorm", "name": "bn2"}]
            shortcut = []
            if stride != 1 or width != width_in:
                shortcut = [{"type": "conv", "name": "down_conv", "filters": width, "kernel": 1, "stride": stride,
                             "padding": 0, "bias": False}, {"type": "batchnorm", "name": "down_bn"}]
            name = f"layer{stage}_{block}"
            layers += [{"type": "residual", "name": name, "body": body, "shortcut": shortcut},
                       {"type": "relu", "name": f"{name}_relu"}]
            width_in = width
    layers += [{"type": "global_avgpool", "name": "pool"}, {"type": "dense", "name": "fc", "units": CLASSES}]
    return {"name": "resnet18", "init": "torch", "layers": layers,
            "description": "ResNet-18, CIFAR variant: 3x3 stem, no max-pool, basic blocks 64/128/256/512."}


def airbench96(widths=(128, 512, 512), name="airbench96") -> dict:
    """airbench96's net (Keller Jordan's cifar10-airbench, ``airbench96.py`` as revised 2024-06-13): frozen
    2x2 patch whitening and GELU, then three groups of widths 128/512/512, each conv -> maxpool ->
    batchnorm -> GELU followed by a residual block over two more convs (conv, batchnorm, GELU, conv,
    batchnorm; identity shortcut) and a GELU after the addition; global max-pool (its MaxPool2d(3) on the
    3x3 map), a bias-free dense head and logits x 1/9. Convs have no bias and start as the identity on
    their first C_in filters; BatchNorm has eps 1e-12, PyTorch's momentum (0.1) and a frozen scale of 1.

    Not reproduced: its fp16 weights (cifarlab trains fp32 weights under bf16 autocast). The repository's
    library version (airbench/lib_airbench96.py, the 40-epoch one with the paper's 96.05%) puts the GELU
    before the addition and uses BatchNorm momentum 0.4; this follows the revised standalone file."""
    layers = [{"type": "whiten", "name": "whiten", "kernel": 2}, {"type": "gelu", "name": "gelu_0"}]
    bn = {"type": "batchnorm", "eps": 1e-12, "scale": False}
    for g, w in enumerate(widths, start=1):
        layers += [
            {"type": "conv", "name": f"g{g}_conv1", "filters": w, "bias": False},
            {"type": "maxpool", "name": f"g{g}_pool", "size": 2},
            {**bn, "name": f"g{g}_bn1"},
            {"type": "gelu", "name": f"g{g}_gelu1"},
            {"type": "residual", "name": f"g{g}_res", "shortcut": [], "body": [
                {"type": "conv", "name": "conv2", "filters": w, "bias": False}, {**bn, "name": "bn2"},
                {"type": "gelu", "name": "gelu2"},
                {"type": "conv", "name": "conv3", "filters": w, "bias": False}, {**bn, "name": "bn3"}]},
            {"type": "gelu", "name": f"g{g}_gelu3"},
        ]
    layers += [{"type": "global_maxpool", "name": "pool"},
               {"type": "dense", "name": "head", "units": CLASSES, "bias": False},
               {"type": "scale", "name": "logit_scale", "factor": 1 / 9}]
    return {"name": name, "init": "identity", "layers": layers,
            "description": f"airbench96's net: whitening, 3 conv groups of widths {list(widths)} with residual "
                           f"two-conv blocks"}


MODELS: dict[str, dict] = {
    "exercise": _exercise(),
    "fast": airbench_like((32, 64, 128), name="fast"),
    "airbench94": airbench_like((64, 256, 256), name="airbench94", init="identity", bn_scale=False),
    "resnet18": resnet18(),
    "airbench96": airbench96(),
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
