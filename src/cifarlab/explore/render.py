"""Tensors -> what the explorer's page shows: PNG data: URIs, attribution overlays, activation bytes.

Everything here is a pure function of tensors (no model, no web): images travel as ``data:image/png``
URIs inside the JSON answers, so the page never asks for another URL. Pictures stay at the net's own
resolution (32x32 for CIFAR); the page enlarges them with ``image-rendering: pixelated``, which shows
the pixels the net really gets instead of a smoothed guess.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

PNG_PREFIX = "data:image/png;base64,"


def png_uri(hwc: np.ndarray) -> str:
    """uint8 (H, W, 3) -> a PNG data: URI."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(hwc, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return PNG_PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")


def image_uri(image: torch.Tensor) -> str:
    """uint8 (C, H, W) (1 or 3 channels) -> a PNG data: URI."""
    hwc = image.detach().cpu().permute(1, 2, 0).numpy()
    if hwc.shape[2] == 1:
        hwc = np.repeat(hwc, 3, axis=2)
    return png_uri(hwc)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def overlay_uri(image: torch.Tensor, attribution: torch.Tensor) -> str:
    """One attribution map over the picture, drawn as ``predict --explain`` draws it: a signed map
    (Integrated Gradients, occlusion) on a symmetric red/blue scale over a grey copy of the picture, a
    non-negative one (saliency, Grad-CAM) as a heat overlay; both scaled to the map's 99.5th percentile
    of |value| (:func:`cifarlab.explain.overview.method_scale`) so one hot pixel does not wash it out."""
    from ..explain.overview import method_scale

    m = attribution.detach().float().cpu()
    vmin, vmax, _ = method_scale(m)
    rgb = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.float64)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    if vmin < 0:
        grey = np.repeat(rgb.mean(2, keepdims=True), 3, axis=2)
        colour = _colormap("RdBu_r")(np.clip((m.numpy() - vmin) / (vmax - vmin), 0, 1))[..., :3] * 255
        mixed, alpha = grey, 0.7
    else:
        colour = _colormap("jet")(np.clip(m.numpy() / (vmax or 1.0), 0, 1))[..., :3] * 255
        mixed, alpha = rgb, 0.5
    return png_uri(np.rint((1 - alpha) * mixed + alpha * colour))


def activation_layer(name: str, maps: torch.Tensor) -> dict:
    """One layer's activation maps (C, H, W) for the page: the non-negative part scaled to 0..255 on one
    scale for the whole layer (so the channels' strengths compare, as in ``visualize``'s activation
    plot), as base64 bytes in (C, H, W) order; plus each channel's mean over space, the objective its
    maximum stimulus maximizes."""
    maps = maps.detach().float().cpu()
    top = float(maps.clamp_min(0).max())
    scaled = (maps.clamp_min(0) / (top or 1.0) * 255).round().to(torch.uint8)
    return {"name": name, "channels": int(maps.shape[0]), "height": int(maps.shape[1]), "width": int(maps.shape[2]),
            "max": top, "means": [round(float(v), 5) for v in maps.flatten(1).mean(1)],
            "data": base64.b64encode(scaled.numpy().tobytes()).decode("ascii")}


def colormap_bytes(name: str = "viridis") -> str:
    """A 256-entry RGB lookup table (768 bytes, base64) the page colours activation maps with."""
    rgb = _colormap(name)(np.arange(256) / 255.0)[:, :3]
    return base64.b64encode(np.rint(rgb * 255).astype(np.uint8).tobytes()).decode("ascii")
