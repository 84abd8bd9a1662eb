"""See what the network learned: maximum stimuli, filters, activation maps, saliency and Grad-CAM overlays.

Maximum stimuli are found by gradient ascent in input space, for the output of the activation that
follows each conv layer (one stimulus per channel, objective: the channel's mean activation) and for
the class outputs (one per class, objective: the class logit). All channels of a layer are optimized
as one batch: every image's objective depends on that image alone, so the gradient of the summed
objective is each image's own gradient, and the random draws (initial noise for all channels, one
shared transform per step) do not depend on which channels are asked for.

Two methods:

``exercise``
    The exercise's method as it was: start from gray plus small noise ((rand - 0.5) * 0.1 for conv
    channels, * 0.001 for classes) in normalized input space, 20 steps of ``x += g / ||g||`` (the
    gradient divided by its L2 norm, per image), then decode as the exercise did: standardize by the
    training set's mean and std (in normalized units), treat the result as a normalized image and map it
    back to 0..255, clipped. One deliberate difference: the exercise's grader fed that raw 0..255 image
    straight into a net trained on ``x / 255 - 0.5``; here the decoded uint8 image is re-normalized with
    the checkpoint's normalization before it goes back into the net (see :func:`grader_check`).

``default`` (better for 32x32 nets)
    Maximize the class logit (or channel mean) of an image kept in 0..1 by a sigmoid, parameterized in a
    decorrelated color space computed from CIFAR-10's own training pixels (:data:`CIFAR10_COLOR_COV`,
    not ImageNet's), optionally in Fourier space with a 1/f spectrum. Each step sees the image through a
    random jitter / small scale / small rotation (robustness: a stimulus that only works at one exact
    pixel alignment is noise, not a picture) and pays total-variation and L2 penalties. Adam, seeded:
    the same seed gives the same images.

Layers are found by their declared names (dotted inside residual blocks: ``layer2_1.conv1``) and read
with forward hooks; nothing slices the net by position. Stimulus targets are each conv layer and each
residual block of the net's main path (after the activation that follows it), see :func:`stimulus_targets`.

Also here: first-layer filters as images, activation maps of each target (or any named layer) for an
image, saliency and Grad-CAM overlays (computed by :mod:`cifarlab.explain`, the one registry of attribution
methods; Grad-CAM on a named layer, default the last conv layer or block), their PNG plots, and
``cifarlab visualize``. Layers and stimulus targets are found in :mod:`cifarlab.net_layers`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import explain, plots
from .data.cifar10 import CIFAR10_MEAN
from .errors import VisualizationError
from .evaluate import predict_logits
from .explain.methods import evaluating as _evaluating  # eval mode for the block, then the caller's mode
from .fsutil import atomic_write_json
from .net_layers import (ACTIVATION_TYPES, Target, check_cam_layer, default_cam_layer, find_layer, image_shape,  # noqa: F401
                         layer_infos, layer_names, num_outputs, stimulus_targets)
from .transforms import Normalization

# Training-set pixel statistics in 0..1 units, computed from the official binary files (50,000 images;
# tests/test_visualize.py recomputes them). The covariance is what the decorrelated color space whitens.
CIFAR10_PIXEL_MEAN = CIFAR10_MEAN
CIFAR10_COLOR_COV = ((0.06102493, 0.05482238, 0.05069996),
                     (0.05482238, 0.05928501, 0.05780385),
                     (0.05069996, 0.05780385, 0.06842820))

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh)
METHODS = ("default", "exercise")



# ---------------------------------------------------------------------------------------------------
# What to maximize



class _Stop(Exception):
    """Raised by a forward hook once the wanted output exists, so the rest of the net is not run."""


# Stop the stimulus search's forward pass at the target (an exception from a forward hook) rather than
# running the whole net. Measured on the exercise net's 154 default stimuli (96 steps, 1 thread, CPU time
# on a busy shared 2-core machine): about 11-15 s stopping early, the same as the positional prefix copies
# used before, and about 13.5 s running the whole net each step (its dense head is not free). Both give
# the same images (tests/test_residual.py).
STOP_EARLY = True


class _Probe:
    """``probe(x)``: the output of the layer ``name`` of ``model`` for the input x (the net's output when
    ``name`` is None). With ``stop``, the forward pass ends at that layer. ``close()`` removes the hook."""

    def __init__(self, model: nn.Module, name: str | None, stop: bool = True):
        self.model, self.stop, self.out = model, stop, None
        self.handle = None if name is None else find_layer(model, name).register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.out = output
        if self.stop:
            raise _Stop

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.handle is None:
            return self.model(x)
        try:
            self.model(x)
        except _Stop:
            pass
        out, self.out = self.out, None
        return out

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _prepare(model: nn.Module) -> nn.Module:
    """A copy of the model, frozen, in eval mode (dropout off, BatchNorm uses its averages) and
    channels-last (measured faster for these convs on CPU); the model itself is left untouched."""
    copy_ = copy.deepcopy(model).cpu().eval()
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_.to(memory_format=torch.channels_last)


def _run(part: _Probe, x: torch.Tensor) -> torch.Tensor:
    return part(x.contiguous(memory_format=torch.channels_last))


def _objective(out: torch.Tensor, target: Target, channels: torch.Tensor) -> torch.Tensor:
    """Per image b: the mean activation of channel channels[b], or the logit of class channels[b]."""
    picked = out[torch.arange(len(channels)), channels]
    return picked.flatten(1).mean(1) if target.spatial else picked


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class StimulusSettings:
    """How stimuli are made. ``StimulusSettings()`` is the default method; see :meth:`exercise`."""

    method: str = "default"
    steps: int = 96           # gradient steps per layer
    lr: float = 0.05          # Adam step size on the parameterization
    jitter: int = 2           # random shift of up to this many pixels per step
    scale: float = 0.05       # random zoom by up to +-5 % per step
    rotate: float = 5.0       # random rotation by up to +-5 degrees per step
    tv: float = 0.5           # total-variation penalty (per image, on 0..1 pixels)
    l2: float = 0.05          # L2 penalty on the distance from the mean color
    decorrelate: bool = True  # CIFAR-10 decorrelated color space
    fft: bool = False         # Fourier parameterization with a 1/f spectrum
    init_std: float = 0.01
    # the exercise method: plain normalized-gradient ascent
    step: float = 1.0
    noise_conv: float = 0.1
    noise_class: float = 0.001

    @classmethod
    def exercise(cls, **overrides) -> "StimulusSettings":
        return replace(cls(method="exercise", steps=20), **overrides)

    @classmethod
    def for_method(cls, method: str, **overrides) -> "StimulusSettings":
        if method not in METHODS:
            raise VisualizationError(f"unknown stimulus method {method!r}: use one of {', '.join(METHODS)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return cls.exercise(**overrides) if method == "exercise" else replace(cls(), **overrides)

    def validate(self) -> "StimulusSettings":
        if self.method not in METHODS:
            raise VisualizationError(f"unknown stimulus method {self.method!r}: use one of {', '.join(METHODS)}")
        if not 0 <= self.steps <= 100_000:
            raise VisualizationError(f"steps must be 0..100000, got {self.steps}")
        if not 0 <= self.jitter <= 16:
            raise VisualizationError(f"jitter must be 0..16 pixels, got {self.jitter}")
        return self


@dataclass
class Stimuli:
    """The result for one target: uint8 images (N, C, H, W), the float images they were rounded from
    (0..255), and the final objective value of each."""

    target: Target
    channels: list[int]
    images: torch.Tensor
    float_images: torch.Tensor
    objective: np.ndarray
    seconds: float


def _generator(seed: int, target: Target, purpose: int) -> torch.Generator:
    """Independent seeded streams per (seed, layer, purpose), so layers do not share noise."""
    state = np.random.SeedSequence([int(seed), target.position, purpose]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


# ---------------------------------------------------------------------------------------------------
# The exercise's method


def _dataset_stats(normalization: Normalization) -> tuple[float, float]:
    """Mean and std of all training pixels in normalized units (np.mean/np.std of the exercise's x_train2),
    exact from the per-channel moments."""
    m = np.array(CIFAR10_PIXEL_MEAN)
    var = np.diag(np.array(CIFAR10_COLOR_COV))
    nm, ns = np.array(normalization.mean), np.array(normalization.std)
    mean_c = (m - nm) / ns
    second = var / ns ** 2 + mean_c ** 2
    mean = mean_c.mean()
    return float(mean), float(math.sqrt(second.mean() - mean ** 2))


def exercise_decode(x: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """The exercise's image_values_to_rgb: (x - mean) / std, then back to 0..255 as a normalized image."""
    mean, std = _dataset_stats(normalization)
    return normalization.invert((x - mean) / std).clamp(0, 255)


def _exercise_ascent(part, target, channels, all_channels, settings, seed, normalization):
    gen = _generator(seed, target, 0)
    scale = settings.noise_conv if target.spatial else settings.noise_class
    x = ((torch.rand(all_channels, *target.image_shape, generator=gen) - 0.5) * scale)[channels]
    value = torch.zeros(len(channels))
    for _ in range(settings.steps):
        x.requires_grad_(True)
        objective = _objective(_run(part, x), target, channels)
        (grad,) = torch.autograd.grad(objective.sum(), x)
        norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x = (x + settings.step * grad / (norm + 1e-10)).detach()
        value = objective.detach()
    # The exercise returns the loss computed before the last step; so do we.
    return exercise_decode(x, normalization), value


# ---------------------------------------------------------------------------------------------------
# The default method: decorrelated (optionally Fourier) parameterization, transforms, penalties


def color_matrix() -> torch.Tensor:
    """Maps decorrelated color to RGB: the square root of CIFAR-10's color covariance, scaled so the
    strongest (luminance) direction has unit length."""
    cov = torch.tensor(CIFAR10_COLOR_COV, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    sqrt = eigenvectors * eigenvalues.clamp_min(0).sqrt()
    return (sqrt / sqrt.norm(dim=0).max()).float()


def _fft_scale(size: int = 32) -> torch.Tensor:
    """1/f amplitude for the rfft2 grid: natural images have most energy at low frequencies."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    freq = torch.sqrt(fx ** 2 + fy ** 2).clamp_min(1.0 / size)
    return (1.0 / freq) / size


class _Image:
    """A batch of images in 0..1 made from free parameters, so the optimizer never leaves the valid range."""

    def __init__(self, n: int, settings: StimulusSettings, gen: torch.Generator, size: int = 32):
        self.settings = settings
        self.matrix = color_matrix() if settings.decorrelate else torch.eye(3)
        mean = torch.tensor(CIFAR10_PIXEL_MEAN)
        self.offset = torch.log(mean / (1 - mean)).view(1, 3, 1, 1)  # sigmoid(offset) = mean color
        self.size = size
        if settings.fft:
            self.freq_scale = _fft_scale(size)
            shape = (n, 3, size, size // 2 + 1, 2)
        else:
            shape = (n, 3, size, size)
        self.param = (torch.randn(shape, generator=gen) * settings.init_std).requires_grad_(True)

    def __call__(self) -> torch.Tensor:
        p = self.param
        if self.settings.fft:
            spectrum = torch.view_as_complex(p.contiguous()) * self.freq_scale
            p = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")
        colored = torch.einsum("ij,njhw->nihw", self.matrix, p)
        return torch.sigmoid(colored + self.offset)


def _random_view(images: torch.Tensor, settings: StimulusSettings, gen: torch.Generator) -> torch.Tensor:
    """One random shift / zoom / rotation, the same for the whole batch (so results do not depend on
    which channels share the batch); reflection padding keeps the borders image-like."""
    u = torch.rand(4, generator=gen) * 2 - 1
    shift = torch.round(u[:2] * settings.jitter) * 2 / images.shape[-1]  # whole pixels, in grid units
    zoom = 1 + settings.scale * float(u[2])
    angle = math.radians(settings.rotate * float(u[3]))
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, float(shift[0])], [sin, cos, float(shift[1])]], dtype=images.dtype)
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean squared difference between neighboring pixels."""
    dy = (images[:, :, 1:] - images[:, :, :-1]).pow(2).flatten(1).mean(1)
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).pow(2).flatten(1).mean(1)
    return dx + dy


def _default_ascent(part, target, channels, all_channels, settings, seed, normalization):
    image = _Image(all_channels, settings, _generator(seed, target, 0), size=target.image_shape[-1])
    with torch.no_grad():  # keep only the requested channels' parameters
        image.param = image.param[channels].detach().requires_grad_(True)
    view_gen = _generator(seed, target, 1)
    optimizer = torch.optim.Adam([image.param], lr=settings.lr)
    mean = torch.tensor(CIFAR10_PIXEL_MEAN).view(1, 3, 1, 1)
    value = torch.zeros(len(channels))
    for _ in range(settings.steps):
        pixels = image()
        seen = _random_view(pixels, settings, view_gen)
        objective = _objective(_run(part, normalization(seen * 255.0)), target, channels)
        penalty = settings.tv * total_variation(pixels) + settings.l2 * (pixels - mean).pow(2).flatten(1).mean(1)
        optimizer.zero_grad(set_to_none=True)
        (penalty - objective).sum().backward()
        optimizer.step()
        value = objective.detach()
    with torch.no_grad():
        return image() * 255.0, value


# ---------------------------------------------------------------------------------------------------
# Public API: stimuli


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with ``n`` intra-op threads (None: torch's current setting), then restore it.

    The ascent's batches are small (at most a layer's channels of 32x32 images), so extra threads mostly
    add synchronization, and on a busy machine they wait for each other's time slices: measured on the
    2-core CPU under load, conv1's 16 stimuli took 50 s with 2 threads and 1.8 s with 1. Hence 1 by default.
    """
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def maximum_stimuli(model: nn.Module, target: Target, normalization: Normalization,
                    settings: StimulusSettings | None = None, seed: int = 0,
                    channels: list[int] | None = None, threads: int | None = 1) -> Stimuli:
    """Stimuli for ``channels`` of ``target`` (all by default), optimized as one batch."""
    return _stimuli(_prepare(model), target, normalization, settings, seed, channels, threads)


def _stimuli(prepared: nn.Module, target: Target, normalization: Normalization,
             settings: StimulusSettings | None, seed: int, channels: list[int] | None,
             threads: int | None) -> Stimuli:
    """:func:`maximum_stimuli` on a model already copied by :func:`_prepare`."""
    settings = (settings or StimulusSettings()).validate()
    all_channels = list(range(target.channels))
    channels = all_channels if channels is None else [int(c) for c in channels]
    bad = [c for c in channels if not 0 <= c < target.channels]
    if bad:
        raise VisualizationError(f"{target.name} has channels 0..{target.channels - 1}; asked for {bad}")
    part = _Probe(prepared, target.name if target.spatial else None, stop=STOP_EARLY)
    index = torch.tensor(channels, dtype=torch.long)
    started = time.perf_counter()
    ascent = _exercise_ascent if settings.method == "exercise" else _default_ascent
    try:
        with _threads(threads):
            floats, value = ascent(part, target, index, target.channels, settings, seed, normalization)
    finally:
        part.close()
    floats = floats.detach().clamp(0, 255)
    return Stimuli(target, channels, floats.round().to(torch.uint8), floats, value.numpy(),
                   time.perf_counter() - started)


def all_stimuli(model: nn.Module, normalization: Normalization, settings: StimulusSettings | None = None,
                seed: int = 0, log=None, threads: int | None = 1, max_channels: int | None = None) -> list[Stimuli]:
    """Stimuli for every channel of every target (conv layer or residual block, see
    :func:`stimulus_targets`) and for every class, one batch per layer. ``max_channels``: only each
    layer's first N channels (the same images as in a full run: each channel's stimulus is its own)."""
    prepared = _prepare(model)
    results = []
    for target in stimulus_targets(model):
        channels = None
        if max_channels and target.spatial and target.channels > max_channels:
            channels = list(range(max_channels))
        results.append(_stimuli(prepared, target, normalization, settings, seed, channels, threads))
        if log:
            log(f"  {target.name}: {len(results[-1].channels)} stimuli in {results[-1].seconds:.1f} s")
    return results


@torch.no_grad()
def class_probabilities(model: nn.Module, images: torch.Tensor, normalization: Normalization) -> np.ndarray:
    """Softmax (N, classes) for uint8 images, re-normalized the way the net was trained."""
    return torch.softmax(predict_logits(model, images, normalization), 1).numpy()


def grader_check(model: nn.Module, class_stimuli: torch.Tensor, normalization: Normalization,
                 renormalize: bool = True) -> np.ndarray:
    """The exercise's grader, done right: p[k] = probability of class k for the stimulus of class k, with
    the uint8 stimulus re-normalized. ``renormalize=False`` reproduces the exercise's quirk for comparison:
    it fed the raw 0..255 values to a net trained on x/255 - 0.5."""
    raw = Normalization((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))  # identity: x / 255 / (1/255)
    probs = class_probabilities(model, class_stimuli, normalization if renormalize else raw)
    return probs[np.arange(len(probs)), np.arange(len(probs))]


def mean_color_image(n: int = 1, size: int = 32) -> torch.Tensor:
    """The gray (mean color) image both methods start from, as uint8."""
    color = torch.tensor(CIFAR10_PIXEL_MEAN) * 255
    return color.round().to(torch.uint8).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


# ---------------------------------------------------------------------------------------------------
# Filters, activation maps, saliency, Grad-CAM


def first_layer_filters(model: nn.Module) -> torch.Tensor:
    """The kernels of the conv that sees the RGB input (the frozen patch-whitening one in airbench-style
    nets) as uint8 images (C, 3, k, k), all on one shared scale so their relative strength shows (zero is
    mid-gray)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if conv is None:
        raise VisualizationError("the model has no conv layer on the RGB input; no filters to show")
    w = conv.weight.detach().float()
    w = w / w.abs().max().clamp_min(1e-12)
    return ((w + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def activation_maps(model: nn.Module, image: torch.Tensor, normalization: Normalization,
                    layers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """For one uint8 image (C, H, W): the activation maps (C, H, W) of each named layer (default: each
    stimulus target, i.e. every conv layer's and residual block's output after its activation), taken
    by forward hooks in one pass."""
    names = list(layers) if layers is not None else [t.name for t in stimulus_targets(model) if t.spatial]
    modules = {name: find_layer(model, name) for name in names}
    maps: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            maps[name] = output[0].detach().clone()
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    try:
        with _evaluating(model):
            model(normalization(image[None]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: maps[name] for name in names}


# ---------------------------------------------------------------------------------------------------
# Plots (matplotlib Agg, saved through cifarlab.plots)
#
# Stimuli, filters and activation maps are drawn as one mosaic image in one axes, with text labels:
# an axes per tile (as plots.image_grid does) costs about 20 ms each to lay out, a second per layer.


def _upscale(tiles: np.ndarray, min_size: int = 32) -> np.ndarray:
    """Repeat pixels so tiny tiles (3x3 filters, 8x8 maps) show as blocks, not a blur."""
    factor = max(1, -(-min_size // tiles.shape[1]))
    return tiles.repeat(factor, axis=1).repeat(factor, axis=2)


def _mosaic(tiles: np.ndarray, cols: int, gap: int, band: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles (N, h, w, 3) uint8 on a white canvas, ``band`` pixels above each for its label; returns the
    canvas and each tile's top-left corner."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // cols)
    cell_h, cell_w = h + band + gap, w + gap
    canvas = np.full((rows * cell_h - gap, min(n, cols) * cell_w - gap, 3), 255, np.uint8)
    corners = []
    for i in range(n):
        y, x = (i // cols) * cell_h + band, (i % cols) * cell_w
        canvas[y:y + h, x:x + w] = tiles[i]
        corners.append((y, x))
    return canvas, corners


def _tile_figure(tiles: np.ndarray, labels: list[str], path, cols: int, title: str, tile_inches: float = 1.0,
                 label_lines: int = 1, font: int = 8) -> Path:
    plt = plots.pyplot()

    tiles = _upscale(np.ascontiguousarray(tiles))
    h, w = tiles.shape[1:3]
    px_per_inch = h / tile_inches
    band = int(math.ceil((0.15 * label_lines + 0.05) * px_per_inch)) if labels else 0
    canvas, corners = _mosaic(tiles, cols, max(1, round(0.1 * px_per_inch)), band)
    width, height = canvas.shape[1] / px_per_inch, canvas.shape[0] / px_per_inch
    fig = plt.figure(figsize=(width, height + 0.45))
    ax = fig.add_axes((0, 0, 1, height / (height + 0.45)))
    ax.imshow(canvas, interpolation="nearest")
    for (y, x), label in zip(corners, labels):
        ax.text(x + w / 2, y - 0.02 * px_per_inch, label, ha="center", va="bottom", fontsize=font)
    ax.axis("off")
    fig.text(0.5, 1 - 0.2 / (height + 0.45), title, ha="center", va="center", fontsize=12)
    return plots.save_figure(fig, path)


def plot_layer_stimuli(stimuli: Stimuli, path, method: str) -> Path:
    t = stimuli.target
    labels = [f"#{c}" for c in stimuli.channels]
    cols = 16 if len(labels) > 32 else 8
    which = "each channel" if len(labels) == t.channels else f"its first {len(labels)} of {t.channels} channels"
    after = "" if t.conv == t.name else f" (after {t.conv})"
    title = f"{t.name}{after}: maximum stimulus of {which}, {method} method"
    return _tile_figure(plots.to_hwc(stimuli.images), labels, path, cols, title, tile_inches=0.9)


def plot_class_stimuli(images: torch.Tensor, classes: list[str], probabilities: np.ndarray, path,
                       method: str) -> Path:
    labels = [f"{name}\np = {p:.3f}" for name, p in zip(classes, probabilities)]
    # One row for CIFAR-10's ten classes; a grid of ten per row for CIFAR-100's hundred.
    return _tile_figure(plots.to_hwc(images), labels, path, min(len(labels), 10),
                        f"Class stimuli, {method} method: p = the net's probability of that class for the 8-bit "
                        f"image", tile_inches=1.35, label_lines=2, font=9)


def plot_filters(filters: torch.Tensor, path) -> Path:
    labels = [f"#{i}" for i in range(len(filters))]
    return _tile_figure(plots.to_hwc(filters), labels, path, min(16, len(filters)),
                        "First conv layer filters (RGB, one shared scale, gray = 0)", tile_inches=0.6)


def _colored(maps: torch.Tensor, cmap: str = "viridis") -> np.ndarray:
    """(C, H, W) activations -> (C, H, W, 3) uint8 on one shared scale (0 .. the layer's maximum)."""
    import matplotlib

    top = float(maps.max()) or 1.0
    rgba = matplotlib.colormaps[cmap]((maps.clamp_min(0) / top).numpy())
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def plot_activation_maps(image: torch.Tensor, maps: dict[str, torch.Tensor], title: str, path) -> Path:
    """The input image, then each conv layer's channel maps as a mosaic (brighter = stronger; one color
    scale per layer)."""
    plt = plots.pyplot()

    cols, size = 16, 32
    blocks = [("input", _upscale(plots.to_hwc(image[None]), size))]
    blocks += [(f"{name}: {len(m)} channels", _upscale(_colored(m), size)) for name, m in maps.items()]
    canvases = [_mosaic(tiles, cols, gap=3, band=0)[0] for _, tiles in blocks]
    heights = [c.shape[0] for c in canvases]
    width = cols * (size + 3) - 3
    fig = plt.figure(figsize=(width / 36, sum(heights) / 36 + 0.35 * len(blocks) + 0.5))
    grid = fig.add_gridspec(len(blocks), 1, height_ratios=heights, hspace=0.35 * len(blocks) * 36 / sum(heights),
                            top=1 - 0.5 / fig.get_figheight(), bottom=0.01, left=0.01, right=0.99)
    for i, ((label, _), canvas) in enumerate(zip(blocks, canvases)):
        ax = fig.add_subplot(grid[i])
        ax.imshow(canvas, interpolation="nearest")
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_title(label, fontsize=9, loc="left")
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    return plots.save_figure(fig, path)


def per_image_unit(maps: torch.Tensor) -> torch.Tensor:
    """Non-negative maps (N, H, W) scaled to 0..1 per image, for an overlay (an all-zero map stays zero)."""
    maps = maps.clamp_min(0)
    return maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)


def plot_attributions(images: torch.Tensor, sal: torch.Tensor, cam: torch.Tensor, titles: list[str],
                      path, cam_layer: str = "the last conv layer") -> Path:
    """One column per image: the image, saliency overlaid, Grad-CAM overlaid."""
    plt = plots.pyplot()

    hwc = plots.to_hwc(images)
    n = len(hwc)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6.4), squeeze=False)
    for i in range(n):
        for r, (overlay, cmap, label) in enumerate(((None, None, ""), (sal[i], "hot", "saliency"),
                                                    (cam[i], "jet", "Grad-CAM"))):
            ax = axes[r, i]
            ax.imshow(hwc[i], interpolation="nearest")
            if overlay is not None:
                ax.imshow(overlay.numpy(), cmap=cmap, alpha=0.55, vmin=0, vmax=1, interpolation="bilinear")
            ax.axis("off")
            ax.set_title(titles[i] if r == 0 else label, fontsize=8)
    fig.suptitle(f"Where the net looks: saliency (input gradient) and Grad-CAM on {cam_layer}", fontsize=11)
    fig.tight_layout()
    return plots.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------
# Everything for a checkpoint into a folder


@dataclass
class VisualizationResult:
    out_dir: Path
    method: str
    files: dict[str, str]
    class_probabilities: dict[str, dict[str, float]]  # method -> class -> p(class | its stimulus)
    seconds: dict[str, float]
    stimuli: list = field(default_factory=list)       # the Stimuli of every target (the report's channel pages)


def render_all(ckpt, out_dir, data=None, method: str = "default", seed: int = 0, images=None,
               settings: StimulusSettings | None = None, also_exercise_classes: bool = True,
               log=print, threads: int | None = 1, cam_layer: str | None = None,
               max_channels: int | None = None, explanations=None) -> VisualizationResult:
    """Stimuli of every layer, class stimuli with the grader check, filters, and (given test data)
    activation maps, saliency and Grad-CAM (on ``cam_layer``, default the last conv layer or block) for
    test images ``images``; PNGs plus ``summary.json``. ``max_channels``: stimuli for at most each
    layer's first N channels (default: all)."""
    out_dir = _prepare_out_dir(out_dir)
    if data is not None:
        images = _check_indices(images, len(data.test))
    model = ckpt.model.cpu().eval()
    cam_layer = check_cam_layer(model, cam_layer)  # before the long part: a bad name fails at once
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    classes = list(ckpt.meta.get("classes") or [str(i) for i in range(num_outputs(model))])
    settings = settings or StimulusSettings.for_method(method)
    files, probs, seconds = {}, {}, {}

    started = time.perf_counter()
    stimuli = all_stimuli(model, normalization, settings, seed, log=log, threads=threads, max_channels=max_channels)
    seconds[f"stimuli_{settings.method}"] = time.perf_counter() - started
    log(f"{sum(len(s.channels) for s in stimuli)} stimuli ({settings.method} method) in "
        f"{seconds[f'stimuli_{settings.method}']:.1f} s")
    for s in stimuli[:-1]:
        files[f"stimuli_{s.target.name}"] = str(plot_layer_stimuli(s, out_dir / f"stimuli_{s.target.name}.png",
                                                                   settings.method))
    class_sets = {settings.method: stimuli[-1].images}
    if also_exercise_classes and settings.method != "exercise":
        ex = maximum_stimuli(model, stimuli[-1].target, normalization, StimulusSettings.exercise(), seed,
                             threads=threads)
        class_sets["exercise"] = ex.images
    for name, imgs in class_sets.items():
        p = grader_check(model, imgs, normalization)
        probs[name] = {c: float(v) for c, v in zip(classes, p)}
        files[f"classes_{name}"] = str(plot_class_stimuli(imgs, classes, p, out_dir / f"classes_{name}.png", name))
        log(f"grader check ({name}): " + ", ".join(f"{c} {v:.3f}" for c, v in probs[name].items()))

    files["filters"] = str(plot_filters(first_layer_filters(model), out_dir / "filters.png"))
    if data is not None:
        files.update(_image_plots(model, normalization, data, images, out_dir, cam_layer))
    explained = {}
    if data is not None:  # attribution methods, faithfulness, sanity check, dataset examples (explain.py)
        explained_files, explained = explain.render(model, normalization, data, images, stimuli, out_dir,
                                                    explanations, seed, log, cam_layer)
        files.update(explained_files)
    atomic_write_json(out_dir / "summary.json", {
        "method": settings.method, "seed": seed, "settings": asdict(settings), "class_probabilities": probs,
        "gradcam_layer": cam_layer, "max_channels": max_channels,
        "seconds": seconds, "files": files, "explanations": explained,
        "note": "class_probabilities: p(class k | stimulus of class k), the uint8 stimulus re-normalized "
                "with the checkpoint's normalization"})
    return VisualizationResult(out_dir, settings.method, files, probs, seconds, stimuli)


DEFAULT_IMAGES = (0, 1, 2, 3, 4, 5, 6, 7)


def _image_plots(model, normalization, data, images, out_dir: Path, cam_layer: str | None = None) -> dict[str, str]:
    test = data.test
    indices = _check_indices(images, len(test))
    batch = test.images[indices]
    # The overlays come from the one registry of methods (cifarlab.explain), scaled to 0..1 per image here.
    sal = explain.attribute("saliency", model, batch, normalization, target="predicted")
    predicted = sal.targets
    cam_layer = check_cam_layer(model, cam_layer)
    cam = explain.attribute("grad_cam", model, batch, normalization, target=predicted, layer=cam_layer)
    sal, cam = per_image_unit(sal.maps), per_image_unit(cam.maps)
    probs = class_probabilities(model, batch, normalization)
    titles = [f"#{i} true: {data.classes[test.labels[i]]}\npred: {data.classes[p]} {probs[k, p]:.2f}"
              for k, (i, p) in enumerate(zip(indices, predicted.tolist()))]
    files = {"attributions": str(plot_attributions(batch, sal, cam, titles, out_dir / "saliency_gradcam.png",
                                                   cam_layer=repr(cam_layer)))}
    first = indices[0]
    maps = activation_maps(model, test.images[first], normalization)
    if maps:
        title = f"Activation maps for test image #{first} ({data.classes[test.labels[first]]})"
        files["activations"] = str(plot_activation_maps(test.images[first], maps, title, out_dir / "activations.png"))
    return files


def _check_indices(images, n: int) -> list[int]:
    if images is None:  # the default images that exist (a tiny test set has fewer than 8)
        images = [i for i in DEFAULT_IMAGES if i < n]
    indices = [int(i) for i in images]
    bad = [i for i in indices if not 0 <= i < n]
    if bad or not indices:
        raise VisualizationError(f"image indices must be 0..{n - 1} (test set), got {bad or indices}")
    return indices


def _prepare_out_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise VisualizationError(f"{out_dir}: exists and is not a folder; choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VisualizationError(f"{out_dir}: cannot create the output folder ({e.strerror})") from None
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Command line
