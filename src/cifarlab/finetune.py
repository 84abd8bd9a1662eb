"""Starting from weights learnt before (``--init-from``), and training them the way fine-tuning is done.

Sources, all read with the checkpoint rules (safetensors only, never a pickle; size and type checked
before reading; finite values; checksums where the file has them):

- **a cifarlab run or checkpoint folder** (or its ``.safetensors`` with cifarlab metadata): verified
  like any checkpoint. Its normalization comes along, because the weights were trained to expect it;
- **a plain ``.safetensors`` state dict**, e.g. torchvision's ResNet-18 saved with safetensors: its
  names ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``/``downsample.1`` are mapped onto
  cifarlab's ``resnet18`` (``layer1_1.conv1.weight``, ``layer2_1.down_conv``/``down_bn``); other names
  are taken as they are.

Every tensor of the new model whose name and shape match a source tensor is copied; the others keep their
fresh initialization: the head when the classes differ, torchvision's 7x7 ImageNet stem against
cifarlab's 3x3 CIFAR stem. :class:`InitReport` says which were loaded, which are new and why, and which
source tensors were not used. A source that fits nothing is refused.

Training a loaded net (fastai's ``fine_tune``): ``freeze_epochs`` epochs with only the head (and
BatchNorm, as fastai keeps it) learning, then everything, with **discriminative learning rates**: the
layers are split into :data:`LAYER_GROUPS` groups in declaration order and group i of n trains at
``lr / lr_mult ** ((n - 1 - i) / (n - 1))``, from ``lr / lr_mult`` for the first layers to ``lr`` for
the head (fastai's ``slice(lr / 100, lr)`` is ``lr_mult = 100``).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoints as ckpts
from .errors import CheckpointError

LAYER_GROUPS = 3
_TORCHVISION_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.")


@dataclass
class InitReport:
    source: str
    kind: str  # "cifarlab checkpoint" or "safetensors state dict"
    loaded: list[str] = field(default_factory=list)
    new: list[tuple[str, str]] = field(default_factory=list)  # (name, why it was not loaded)
    unused: list[str] = field(default_factory=list)
    normalization: dict | None = None
    classes: list[str] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "normalization"}

    def table(self) -> str:
        lines = [f"init from {self.source} ({self.kind}): {len(self.loaded)} tensors loaded, {len(self.new)} new, "
                 f"{len(self.unused)} of the source unused"]
        lines += [f"  new     {name}: {why}" for name, why in self.new]
        lines += [f"  loaded  {name}" for name in self.loaded[:6]]
        if len(self.loaded) > 6:
            lines.append(f"  loaded  ... and {len(self.loaded) - 6} more")
        lines += [f"  unused  {name}" for name in self.unused[:6]]
        if len(self.unused) > 6:
            lines.append(f"  unused  ... and {len(self.unused) - 6} more")
        return "\n".join(lines)


def read_source(spec: str | Path) -> tuple[dict[str, torch.Tensor], InitReport]:
    """The source's tensors (torchvision names mapped) and a report with its kind and normalization."""
    from .data.base import user_path

    path = user_path(spec, "--init-from ")
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin") or path.is_file() and path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: --init-from reads safetensors only (pickle files can run code when "
                              f"loaded); convert it: safetensors.torch.save_file(state_dict, 'weights.safetensors').")
    if path.is_dir() or not path.exists():
        ckpt = ckpts.load_checkpoint(path)  # verified; a clear error when nothing is there
        report = InitReport(str(path), "cifarlab checkpoint", normalization=ckpt.meta.get("normalization"),
                            classes=list(ckpt.meta.get("classes") or []))
        return dict(ckpt.model.state_dict()), report
    header = ckpts.read_safetensors_header(path)
    if "cifarlab" in header:
        ckpt = ckpts.load_checkpoint(path)
        return dict(ckpt.model.state_dict()), InitReport(str(path), "cifarlab checkpoint",
                                                         normalization=ckpt.meta.get("normalization"),
                                                         classes=list(ckpt.meta.get("classes") or []))
    tensors, _ = ckpts.read_safetensors(path)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: tensors hold NaN or infinite values ({', '.join(bad[:3])}); refusing them.")
    return {torchvision_to_cifarlab(k): v for k, v in tensors.items()}, InitReport(str(path), "safetensors state dict")


def torchvision_to_cifarlab(name: str) -> str:
    """torchvision's ResNet names -> cifarlab's resnet18 names (other names unchanged)."""
    found = _TORCHVISION_BLOCK.match(name)
    if not found:
        return name
    stage, block = found.groups()
    rest = name[found.end():].replace("downsample.0.", "down_conv.").replace("downsample.1.", "down_bn.")
    return f"layer{stage}_{int(block) + 1}.{rest}"


def init_model(model: torch.nn.Module, spec: str | Path, classes: list[str] | None = None) -> InitReport:
    """Copy every tensor of ``spec`` that fits ``model`` by name and shape (see the module docstring).
    ``classes``: this run's classes; when a cifarlab source was trained on other classes, its head is not
    loaded even if the shapes agree (output i would mean another class)."""
    source, report = read_source(spec)
    target = model.state_dict()
    other_classes = bool(classes and report.classes and list(report.classes) != list(classes))
    head = head_layer(model) + "." if other_classes else None
    for name, value in target.items():
        if head and name.startswith(head):
            report.new.append((name, f"the source's classes differ ({', '.join(report.classes[:4])}"
                                     f"{', ...' if len(report.classes) > 4 else ''})"))
        elif name not in source:
            report.new.append((name, "not in the source"))
        elif source[name].shape != value.shape:
            report.new.append((name, f"shape {tuple(source[name].shape)} in the source, {tuple(value.shape)} here"))
        elif source[name].dtype != value.dtype and not (source[name].is_floating_point() and value.is_floating_point()):
            report.new.append((name, f"dtype {source[name].dtype} in the source, {value.dtype} here"))
        else:
            report.loaded.append(name)
    report.unused = sorted(set(source) - set(target))
    if not any(target[name].is_floating_point() for name in report.loaded):
        raise CheckpointError(f"{spec}: no weight of the source fits this model by name and shape (the model has "
                              f"{', '.join(list(target)[:3])}, ...; the source {', '.join(list(source)[:3])}, ...); "
                              f"nothing was loaded. Train the same architecture, or declare it with the source's "
                              f"layer names.")
    with torch.no_grad():
        for name in report.loaded:
            target[name].copy_(source[name].to(target[name].dtype))
    return report


def head_layer(model) -> str:
    """The declared name of the last dense layer: the part a new task replaces."""
    from .models import head_name

    head = head_name(model.declaration)
    if head is None:
        raise ValueError(f"{model.declaration['name']} has no dense layer to use as the head")
    return head


def body_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters frozen during the first epochs: the trainable ones but the head's and BatchNorm's
    (fastai keeps BatchNorm training while frozen: its statistics must follow the new data)."""
    from .models import Whiten

    head = head_layer(model) + "."
    # BatchNorm keeps training; the whitening layer has its own schedule (whiten_bias_epochs).
    kept = {id(p) for m in model.modules() if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, Whiten))
            for p in m.parameters()}
    return [p for name, p in model.named_parameters()
            if not name.startswith(head) and id(p) not in kept and p.requires_grad]


def layer_group_scales(model, lr_mult: float, groups: int = LAYER_GROUPS) -> dict[int, float]:
    """id(parameter) -> its lr factor: top-level layers that hold parameters, in declaration order, split
    into ``groups`` contiguous groups (the head alone in the last), factors from 1 / lr_mult up to 1."""
    head = head_layer(model)
    named = dict(model.named_parameters())
    layers = [layer["name"] for layer in model.declaration["layers"]
              if layer["name"] != head and any(n.startswith(layer["name"] + ".") for n in named)]
    body_groups = max(1, groups - 1)
    scales = {}
    for i, layer in enumerate(layers):
        group = min(body_groups - 1, i * body_groups // max(1, len(layers)))
        factor = lr_mult ** (-(groups - 1 - group) / (groups - 1)) if groups > 1 else 1.0
        for name, p in named.items():
            if name.startswith(layer + "."):
                scales[id(p)] = factor
    for name, p in named.items():
        scales.setdefault(id(p), 1.0)  # the head (and anything outside the declared layers)
    return scales
