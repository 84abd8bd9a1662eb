"""The recipe's pieces the loop runs with: optimizer (and its parameter groups), learning-rate schedule,
data order and batch slices. Pure functions of the recipe and position, so a resumed run rebuilds them."""
from __future__ import annotations

import math

import torch

from ..finetune import layer_group_scales
from ..optimizers import make_muon
from ..recipes import Recipe


def make_optimizer(recipe: Recipe, model: torch.nn.Module, foreach: bool = True) -> torch.optim.Optimizer:
    """The recipe's optimizer. ``foreach``: PyTorch's multi-tensor implementation (one kernel per operation
    for all parameters instead of one per parameter; PyTorch picks it on CUDA only). Bitwise the same
    updates as the per-parameter loop (tests/test_optimizers_foreach.py) with fewer small ops per step."""
    if recipe.optimizer == "muon":  # Muon on the conv filters, SGD on the rest (airbench94_muon)
        return make_muon(recipe, model)
    groups = sgd_groups(recipe, model) if recipe.optimizer == "sgd" else \
        [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if recipe.lr_mult != 1.0:  # fine-tuning: earlier layers learn more slowly (see cifarlab.finetune)
        groups = discriminative_groups(groups, layer_group_scales(model, recipe.lr_mult))
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                               foreach=foreach)
    cls = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[recipe.optimizer]
    # eps=1e-8: Keras 2.0.6's Adamax default, the exercise's (and PyTorch's) value.
    return cls(groups, lr=recipe.lr, weight_decay=recipe.weight_decay, eps=1e-8, foreach=foreach)


def discriminative_groups(groups: list[dict], scales: dict[int, float]) -> list[dict]:
    """Each group split by its parameters' lr factors; a part's lr_scale is the group's times the factor."""
    split = []
    for group in groups:
        by_factor: dict[float, list] = {}
        for p in group["params"]:
            by_factor.setdefault(scales[id(p)], []).append(p)
        for factor, params in sorted(by_factor.items()):
            split.append(dict(group, params=params, lr_scale=group.get("lr_scale", 1.0) * factor))
    return split


def sgd_groups(recipe: Recipe, model: torch.nn.Module) -> list[dict]:
    """Parameter groups: weights; other biases; BatchNorm parameters (lr x bn_lr_scale). By default only
    weights decay (the usual practice); ``decay_all`` decays everything, as airbench does, dividing the
    BatchNorm group's decay by its lr scale so every parameter shrinks by the same factor per step."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = [p for p in trainable if id(p) in norm_ids]
    weights = [p for p in trainable if id(p) not in norm_ids and p.ndim > 1]
    biases = [p for p in trainable if id(p) not in norm_ids and p.ndim <= 1]
    wd = recipe.weight_decay
    groups = [{"params": weights, "weight_decay": wd, "lr_scale": 1.0},
              {"params": biases, "weight_decay": wd if recipe.decay_all else 0.0, "lr_scale": 1.0},
              {"params": norm, "weight_decay": wd / recipe.bn_lr_scale if recipe.decay_all else 0.0,
               "lr_scale": recipe.bn_lr_scale}]
    return [g for g in groups if g["params"]]


def learning_rate(recipe: Recipe, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate for (epoch, step-in-epoch): Keras-style per-epoch decay or per-step schedules."""
    if recipe.schedule == "exp":
        return recipe.lr * recipe.lr_decay ** epoch
    if recipe.schedule == "constant":
        return recipe.lr
    total = recipe.epochs * steps_per_epoch
    t = (epoch * steps_per_epoch + step) / total
    warm, start, end = recipe.warmup, recipe.lr_start, recipe.lr_end
    if warm > 0 and t < warm:
        return recipe.lr * (start + (1 - start) * t / warm)
    frac = min(1.0, (t - warm) / (1 - warm))
    return recipe.lr * (1 + (end - 1) * frac)  # linear decay to lr_end (onecycle's triangle)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, progress: float | None = None) -> None:
    """Every group's lr: the schedule's ``lr`` x the group's lr_scale; a group with ``zero_at`` (a fraction of
    training) instead falls linearly from its ``peak_lr`` to 0 at that point (airbench94_muon's whitening bias)."""
    for group in optimizer.param_groups:
        if progress is not None and group.get("zero_at"):
            group["lr"] = group["peak_lr"] * max(0.0, 1.0 - progress / group["zero_at"])
        else:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch), so resume can rebuild it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    # Single process keeps the last partial batch as Keras does; data-parallel runs drop it so every rank
    # takes the same number of equal-sized steps.
    return math.ceil(n / batch_size) if world == 1 else n // (batch_size * world)


def batch_indices(order: torch.Tensor, step: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """Rank r takes slice r of each global batch, so N ranks x batch B == 1 process x batch N*B."""
    start = step * batch_size * world + rank * batch_size
    return order[start:start + batch_size]
