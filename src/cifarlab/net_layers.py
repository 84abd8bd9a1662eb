"""A cifarlab Net's layers, found by their declared names: what ``visualize`` maximizes (stimulus
targets), the layer Grad-CAM reads by default, and name lookups with errors that list the names.

Kept apart from ``visualize`` so that ``explain`` (attribution methods) and ``visualize`` share one rule for
"Grad-CAM's layer" without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import VisualizationError


@dataclass(frozen=True)
class Target:
    """One layer whose channels (or the classes) get a stimulus each, found by its name.

    ``name`` is the layer (its dotted module name) whose output is maximized, "classes" for the net's
    output. ``position`` is that layer's index among all declared layers in execution order (blocks
    before their layers); it only seeds the layer's noise. For a net without blocks it is the layer's
    index in the net, as it always was, so the same seed gives the same stimuli as before.
    """

    name: str        # e.g. "leaky_re_lu_1", "layer2_1_relu", or "classes"
    conv: str        # the conv layer or residual block it belongs to ("" for classes)
    kind: str        # "conv", "block" or "class"
    position: int
    channels: int
    image_shape: tuple = (3, 32, 32)  # (C, H, W) of the network's input

    @property
    def spatial(self) -> bool:
        """A feature map (C, H, W): a conv's or a block's output."""
        return self.kind != "class"


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes: its declaration says (3x32x32 for models declared before that key)."""
    declaration = getattr(model, "declaration", None) or {}
    return tuple(declaration.get("input_shape", (3, 32, 32)))


# Declared layer types: the activations a stimulus target moves to, and what ends the search for one.
ACTIVATION_TYPES = ("relu", "leaky_relu", "gelu", "tanh")
_TARGET_BARRIERS = ("conv", "whiten", "dense", "flatten", "residual")


def layer_infos(model: nn.Module) -> list:
    from .models import layers

    declaration = getattr(model, "declaration", None)
    if declaration is None:
        raise VisualizationError("visualizing needs a cifarlab Net (a model built from a declaration)")
    return layers(declaration)


def stimulus_targets(model: nn.Module) -> list[Target]:
    """For each conv layer and each residual block of the net's main path, its output after the
    activation that follows it (the conv's or block's own output if none follows before the next conv,
    block, dense or flatten), then the class logits. Layers inside blocks are not targets: a residual
    net gets one stimulus set per block output."""
    infos = layer_infos(model)
    index = {info.name: i for i, info in enumerate(infos)}
    top = [info for info in infos if info.depth == 0]
    shape = image_shape(model)
    targets = []
    for j, info in enumerate(top):
        if info.type not in ("conv", "residual") or len(info.output_shape) != 3:
            continue  # the frozen whitening conv is not a learned feature; nor is a block that flattens
        chosen = info
        for other in top[j + 1:]:
            if other.type in _TARGET_BARRIERS:
                break
            if other.type in ACTIVATION_TYPES:
                chosen = other
                break
        kind = "conv" if info.type == "conv" else "block"
        targets.append(Target(chosen.name, info.name, kind, index[chosen.name], chosen.output_shape[0], shape))
    targets.append(Target("classes", "", "class", index[top[-1].name], top[-1].output_shape[0], shape))
    return targets


def num_outputs(model: nn.Module) -> int:
    return int([info for info in layer_infos(model) if info.depth == 0][-1].output_shape[0])


def layer_names(model: nn.Module, spatial: bool = False) -> list[str]:
    """Every declared layer's (dotted) name; with ``spatial``, only those that output a (C, H, W) map."""
    return [info.name for info in layer_infos(model) if not spatial or len(info.output_shape) == 3]


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name`` (a declared layer's dotted name), or a clear error listing the names."""
    module = dict(model.named_modules()).get(name) if name else None
    if module is None:
        names = layer_names(model)
        shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
        raise VisualizationError(f"the model has no layer named {name!r}; its layers: {shown}")
    return module



def default_cam_layer(model: nn.Module) -> str:
    """Grad-CAM's default layer: the last conv layer's or residual block's output (after its activation),
    i.e. the last spatial stimulus target."""
    spatial = [t for t in stimulus_targets(model) if t.spatial]
    if not spatial:
        raise VisualizationError("the model has no conv layer; Grad-CAM needs one")
    return spatial[-1].name


def check_cam_layer(model: nn.Module, layer: str | None) -> str:
    """``layer`` (default: :func:`default_cam_layer`) if it names a layer with a (C, H, W) output."""
    if layer is None:
        return default_cam_layer(model)
    find_layer(model, layer)  # an unknown name: the error lists the names
    shapes = {info.name: info.output_shape for info in layer_infos(model)}
    if len(shapes[layer]) != 3:
        spatial = layer_names(model, spatial=True)
        raise VisualizationError(f"Grad-CAM needs a layer with a (C, H, W) output; {layer!r} outputs "
                                 f"{tuple(shapes[layer])}. Layers with one: {', '.join(spatial[-12:])}")
    return layer
