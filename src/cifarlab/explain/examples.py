"""Dataset examples: the real images that excite each channel (or class) most, beside its maximum stimulus.

A channel's activation on an image is its mean over space — the same objective the stimulus search
maximizes — and a class's is its logit. One batched pass over the image set with a forward hook per
layer keeps, per channel, a running top-k (values and image indices); nothing per image is stored, so
50,000 training images cost one forward pass and O(channels x k) memory.

``"classes"`` (``CLASSES``) names the model's output (the logits) instead of a module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import methods as attr

CLASSES = "classes"


@dataclass
class TopExamples:
    layer: str
    indices: torch.Tensor   # int64 (channels, k): image indices, most activating first
    values: torch.Tensor    # float32 (channels, k): their activation (spatial mean, or logit)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "indices": self.indices.tolist(), "values": self.values.tolist()}


def channel_objective(output: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) mean over space; (B, C) outputs (dense layers, logits) are taken as they are."""
    return output.flatten(2).mean(2) if output.ndim > 2 else output


def _update(best_v, best_i, values, start, k):
    """Merge a batch's (B, C) values into the running (C, k) top-k. Earlier images come first in the
    concatenation and the sort is stable, so ties go to the lower index (what a brute-force stable
    argsort gives)."""
    idx = torch.arange(start, start + len(values)).expand(values.shape[1], -1)
    all_v = torch.cat([best_v, values.t()], 1)
    all_i = torch.cat([best_i, idx], 1)
    order = torch.sort(all_v, dim=1, descending=True, stable=True).indices[:, :k]
    return all_v.gather(1, order), all_i.gather(1, order)


def top_activating(model: nn.Module, images: torch.Tensor, normalization, layers=(CLASSES,), k: int = 9,
                   batch_size: int = 256) -> dict[str, TopExamples]:
    """For each layer named (module names from ``model.named_modules()``, or ``"classes"``): per channel,
    the ``k`` images of uint8 ``images`` with the highest activation, in one pass, eval mode."""
    modules = dict(model.named_modules())
    for name in layers:
        if name != CLASSES and name not in modules:
            raise ValueError(f"no layer named {name!r}")
    device = attr._device(model)
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(_capture(captured, n)) for n in layers if n != CLASSES]
    best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with attr.evaluating(model), torch.no_grad():
            for start in range(0, len(images), batch_size):
                logits = model(_input(normalization, images[start:start + batch_size].to(device)))
                captured[CLASSES] = logits
                for name in layers:
                    values = channel_objective(captured[name]).float().cpu()
                    if name not in best:
                        c = values.shape[1]
                        best[name] = (torch.full((c, 0), -torch.inf), torch.zeros(c, 0, dtype=torch.long))
                    best[name] = _update(*best[name], values, start, k)
    finally:
        for h in hooks:
            h.remove()
    return {name: TopExamples(name, best[name][1], best[name][0]) for name in layers if name in best}


def _input(normalization, images: torch.Tensor) -> torch.Tensor:
    """Normalized, channels-last: the layout CPU convs run fastest in."""
    return normalization(images).contiguous(memory_format=torch.channels_last)


def _capture(store: dict, name: str):
    def hook(module, inputs, output):
        store[name] = output
    return hook


def activations(model: nn.Module, images: torch.Tensor, normalization, layer: str,
                batch_size: int = 256) -> torch.Tensor:
    """(N, C) channel objectives of ``images`` (uint8, or 0..255 float such as stimuli) at ``layer``."""
    values = []
    device = attr._device(model)
    modules = dict(model.named_modules())
    if layer != CLASSES and layer not in modules:
        raise ValueError(f"no layer named {layer!r}")
    captured: dict[str, torch.Tensor] = {}
    hook = modules[layer].register_forward_hook(_capture(captured, layer)) if layer != CLASSES else None
    try:
        with attr.evaluating(model), torch.no_grad():
            for start in range(0, len(images), batch_size):
                captured[CLASSES] = model(_input(normalization, images[start:start + batch_size].to(device)))
                values.append(channel_objective(captured[layer]).float().cpu())
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(values)


def stimulus_ratio(model: nn.Module, stimuli: torch.Tensor, normalization, top: TopExamples,
                   channels=None) -> np.ndarray:
    """Per channel c: the activation of channel c on ``stimuli[i]`` (the stimulus made for channels[i],
    default 0..C-1) divided by the best real image's activation of c (``top.values[c, 0]``).

    Above 1: the stimulus excites the channel more than any image in the set. NaN where the best real
    activation is not positive (a ratio to zero or a negative value has no meaning)."""
    channels = torch.arange(len(stimuli)) if channels is None else torch.as_tensor(channels).long()
    acts = activations(model, stimuli, normalization, top.layer)
    own = acts[torch.arange(len(stimuli)), channels].double()
    best = top.values[channels, 0].double()
    ratio = torch.where(best > 0, own / best.clamp_min(1e-300), torch.full_like(own, float("nan")))
    return ratio.numpy()
