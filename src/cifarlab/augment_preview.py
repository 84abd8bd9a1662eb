"""What a recipe's augmentation really feeds the net: a few training images beside several augmented views.

Each view runs the training batch path on the images as one batch — normalization, then
:class:`~cifarlab.transforms.Augment` with the recipe's flip (alternating flips included), translation and
cutout, then MixUp / CutMix (:func:`cifarlab.mixing.mix_batch`) with the batch's other images as
partners — and is de-normalized back to pixels for display. The images are the first ``n`` of epoch
``epoch``'s training order (the head of that epoch's first batch), from the split training uses (without
its ``val_split`` hold-out).
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Dataset, holdout_split
from .errors import CifarlabError
from .mixing import mix_batch, soft_targets
from .plots import image_grid
from .recipes import Recipe
from .train import epoch_order
from .transforms import Augment, Normalization, alternating_flips


@dataclass
class Preview:
    originals: torch.Tensor  # uint8 (n, C, H, W), as stored
    labels: torch.Tensor     # int64 (n,)
    views: torch.Tensor      # uint8 (views, n, C, H, W): what the net is fed, back in pixels
    targets: torch.Tensor    # float32 (views, n, classes): each view's soft labels, before label smoothing
    classes: list[str]
    title: str               # the augmentation in words


def preview(recipe: Recipe, data: Dataset, n: int = 8, views: int = 4, seed: int = 0, epoch: int = 0) -> Preview:
    """``views`` augmented versions of ``n`` training images; the random draws come from ``seed`` in a fork of
    torch's RNG, so previewing leaves the global RNG as it was."""
    train = holdout_split(data.train, recipe.val_split, seed=recipe.seed)[0] if recipe.val_split else data.train
    if not 1 <= n <= len(train):
        raise CifarlabError(f"cannot preview {n} images: the training split has {len(train)}")
    if views < 1:
        raise CifarlabError(f"views must be at least 1, not {views}")
    normalization = Normalization.for_training(recipe.normalization, train.images)
    idx = epoch_order(recipe.seed, epoch, len(train))[:n]
    images, labels = train.images[idx], train.labels[idx]
    flips = alternating_flips(recipe.seed, len(train), epoch)[idx] if recipe.flip and recipe.alt_flip else None
    augment = Augment.from_recipe(recipe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shown = [_view(recipe, normalization, augment, images, labels, flips, data.num_classes)
                 for _ in range(views)]
    return Preview(images, labels, torch.stack([p for p, _ in shown]), torch.stack([t for _, t in shown]),
                   list(data.classes), describe(recipe, epoch))


def _view(recipe, normalization, augment, images, labels, flips, num_classes):
    """One pass of the training batch path: (uint8 pixels, soft targets)."""
    x = normalization(images)
    if augment.active:
        x = augment(x, flip_mask=flips, normalization=normalization)
    x, targets = mix_batch(x, labels, num_classes, recipe.mixup, recipe.cutmix)
    if targets.ndim == 1:
        targets = soft_targets(targets, num_classes)
    # The net sees unclipped values (cutout and zero padding are 0 after normalization: the mean colour).
    return normalization.invert(x).round().clamp(0, 255).to(torch.uint8), targets


def describe(recipe: Recipe, epoch: int = 0) -> str:
    parts = []
    if recipe.crop_scale:
        parts.append(f"random resized crop {recipe.crop_scale:g}..1 of the area")
    if recipe.color_jitter:
        parts.append(f"colour jitter 1 +- {recipe.color_jitter:g}")
    if recipe.flip:
        parts.append(f"alternating flip (epoch {epoch})" if recipe.alt_flip else "random flip")
    if recipe.translate:
        parts.append(f"translate {recipe.translate} ({recipe.translate_pad} padding)")
    if recipe.cutout:
        parts.append(f"cutout {recipe.cutout}")
    mixes = [f"{name} {alpha:g}" for name, alpha in (("MixUp", recipe.mixup), ("CutMix", recipe.cutmix)) if alpha]
    if mixes:
        parts.append(" or ".join(mixes) + (" (one per batch)" if len(mixes) == 2 else ""))
    text = ", ".join(parts) or "no augmentation"
    if recipe.label_smoothing and mixes:
        text += f"; labels before label smoothing {recipe.label_smoothing:g}"
    return text


def soft_label(weights: torch.Tensor, classes: list[str]) -> str:
    """"cat" for a whole label; "0.63 cat" over "0.37 dog" for a mixed one, largest weight first."""
    present = [i for i in weights.argsort(descending=True).tolist() if weights[i] > 0]
    if len(present) == 1:
        return classes[present[0]]
    return "\n".join(f"{float(weights[i]):.2f} {classes[i]}" for i in present)


def render(result: Preview, path: str | Path) -> Path:
    """A PNG grid: one row per image, its original first, then each view, titled with its (soft) label."""
    n, views = len(result.originals), len(result.views)
    images = torch.stack([result.originals, *result.views], 1).flatten(0, 1)  # row-major: image by image
    titles = []
    for i in range(n):
        titles.append(result.classes[int(result.labels[i])])
        titles.extend(soft_label(result.targets[v, i], result.classes) for v in range(views))
    headings = ["original"] + [f"view {v + 1}" for v in range(views)]
    titles[:views + 1] = [f"{h}\n{t}" for h, t in zip(headings, titles)]
    title = textwrap.fill(result.title, width=14 * (views + 1))  # no wider than the grid
    return image_grid(images, titles, path, cols=views + 1, title=title, cell=(1.8, 2.6), title_size=9)
