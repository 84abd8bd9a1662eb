"""Batch-level tensor transforms: normalization and augmentation, no per-image Python.

Inputs are uint8 (N, C, H, W) batches taken from the in-memory dataset by indexing.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# CIFAR-10's training-set statistics serve ``Normalization.named("standard")`` without data; training
# computes them from its own training images (:meth:`Normalization.of_images`).
from .data.cifar10 import CIFAR10_MEAN, CIFAR10_STD


@dataclass(frozen=True)
class Normalization:
    """x_norm = (x / 255 - mean) / std, per channel. Stored in every checkpoint."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def named(cls, name: str) -> "Normalization":
        if name == "exercise":  # the exercise's x/255 - 0.5
            return cls((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
        if name == "standard":  # per-channel mean/std of CIFAR-10's training set
            return cls(CIFAR10_MEAN, CIFAR10_STD)
        raise ValueError(f"unknown normalization {name!r}: use 'exercise' or 'standard'")

    @classmethod
    def for_training(cls, name: str, images: torch.Tensor) -> "Normalization":
        """The recipe's normalization; "standard" uses the mean and std of ``images`` (the training set)."""
        return cls.of_images(images) if name == "standard" else cls.named(name)

    @classmethod
    def of_images(cls, images: torch.Tensor, chunk: int = 4096) -> "Normalization":
        """Per-channel mean and std (0..1 units) of uint8 images (N, C, H, W), in chunks: exact integer sums,
        no float copy of the whole set."""
        total = torch.zeros(images.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, len(images), chunk):
            x = images[start:start + chunk].to(torch.int64)
            total += x.sum(dim=(0, 2, 3)).double()
            squares += (x * x).sum(dim=(0, 2, 3)).double()
        n = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / n
        std = (squares / n - mean * mean).clamp_min(1e-12).sqrt()
        return cls(tuple(round(float(m) / 255, 7) for m in mean), tuple(round(max(float(s) / 255, 1e-3), 7)
                                                                    for s in std))

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    def __call__(self, images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """uint8 (or 0..255 float) images -> normalized float; works on any device."""
        scale, shift = _affine(self, images.device, dtype)
        return torch.addcmul(-shift, images.to(dtype), scale)  # x * (1 / (255 std)) - mean / std, one pass

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float -> 0..255 float (not clipped)."""
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x * std + mean) * 255.0


@functools.lru_cache(maxsize=32)
def _affine(norm: Normalization, device: torch.device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift tensors, built once per device and dtype (not on every batch).

    Built outside inference mode: a cached inference tensor could never take part in autograd later
    (the stimulus search differentiates through the normalization)."""
    with torch.inference_mode(False):
        scale = torch.tensor([1.0 / (255.0 * s) for s in norm.std], dtype=dtype).view(1, -1, 1, 1).to(device)
        shift = torch.tensor([m / s for m, s in zip(norm.mean, norm.std)], dtype=dtype).view(1, -1, 1, 1).to(device)
    return scale, shift


def random_flip(x: torch.Tensor, generator=None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror a random half of the batch, or the images ``mask`` (bool, per image) says; no draw then."""
    if mask is None:
        mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def random_translate(x: torch.Tensor, pad: int, generator=None, mode: str = "zeros") -> torch.Tensor:
    """Random crop of a padded image (translation by up to ``pad`` pixels), per image, in one gather.

    ``mode``: "zeros" (torchvision's RandomCrop default) or "reflect" (airbench's choice)."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="constant" if mode == "zeros" else mode)
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # n h 1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # n 1 w
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Gathering from an NHWC view yields an NHWC (channels_last) result, the layout convs prefer on CPU.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_cutout(x: torch.Tensor, size: int, generator=None) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square at a random place in each image."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device, generator=generator)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return x.masked_fill(inside[:, None], 0.0)


def random_resized_crop(x: torch.Tensor, min_scale: float, generator=None,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Each image becomes a random crop of ``min_scale``..1 of its area, aspect ``ratio`` (log-uniform),
    resized back to the full size with bilinear sampling (torchvision's RandomResizedCrop, whose scale is
    (0.08, 1) for ImageNet; small photo sets at 32-64 px keep more with 0.35). One sampling call per batch."""
    if min_scale >= 1.0:
        return x
    n = x.shape[0]
    area = torch.empty(n, device=x.device).uniform_(min_scale, 1.0, generator=generator)
    log_ratio = torch.empty(n, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)   # fractions of the side
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * (1 - width)  # inside the image
    cy = (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * (1 - height)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width, cx, height, cy
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, normalization: "Normalization", generator=None) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a random factor in 1 +- ``strength`` per image
    (torchvision's ColorJitter order), in pixel space: normalized -> 0..255 -> jittered, clipped ->
    normalized again."""
    if strength <= 0:
        return x
    n = x.shape[0]
    factors = 1 + (torch.rand(3, n, 1, 1, 1, device=x.device, generator=generator) * 2 - 1) * strength
    pixels = normalization.invert(x)
    pixels = pixels * factors[0]  # brightness
    gray = _luma(pixels)
    pixels = (pixels - gray.mean((2, 3), keepdim=True)) * factors[1] + gray.mean((2, 3), keepdim=True)  # contrast
    pixels = (pixels - _luma(pixels)) * factors[2] + _luma(pixels)  # saturation
    return normalization(pixels.clamp(0, 255), dtype=x.dtype)


def _luma(pixels: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 gray (as PIL's "L"), one channel; a 1-channel image is its own gray."""
    if pixels.shape[1] != 3:
        return pixels
    weights = torch.tensor([0.299, 0.587, 0.114], device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels * weights).sum(1, keepdim=True)


def alternating_flips(seed: int, n: int, epoch: int) -> torch.Tensor:
    """airbench's derandomized flip: a random half of the images is mirrored in even epochs and the
    other half in odd ones, so every image is seen both ways in any two consecutive epochs. A pure
    function of (seed, n, epoch), so resume rebuilds it. Returns a bool mask over the training set."""
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed * 100_003 + 77_777)) < 0.5
    return first ^ bool(epoch % 2)


@dataclass(frozen=True)
class Augment:
    flip: bool = False
    translate: int = 0
    cutout: int = 0
    translate_pad: str = "zeros"
    crop_scale: float = 0.0  # random resized crop's smallest area fraction (0: off)
    color_jitter: float = 0.0

    @classmethod
    def from_recipe(cls, recipe) -> "Augment":
        return cls(recipe.flip, recipe.translate, recipe.cutout, recipe.translate_pad, recipe.crop_scale,
                   recipe.color_jitter)

    @property
    def active(self) -> bool:
        return self.flip or self.translate > 0 or self.cutout > 0 or self.crop_scale > 0 or self.color_jitter > 0

    def __call__(self, x: torch.Tensor, generator=None, flip_mask: torch.Tensor | None = None,
                 normalization: Normalization | None = None) -> torch.Tensor:
        """``flip_mask``: which images to mirror (alternating flips) instead of a random half;
        ``normalization``: the one ``x`` went through (colour jitter works on pixel values)."""
        if self.crop_scale:
            x = random_resized_crop(x, self.crop_scale, generator)
        if self.color_jitter:
            x = color_jitter(x, self.color_jitter, normalization, generator)
        if self.flip:
            x = random_flip(x, generator, flip_mask)
        if self.translate:
            x = random_translate(x, self.translate, generator, self.translate_pad)
        if self.cutout:
            x = random_cutout(x, self.cutout, generator)
        return x
