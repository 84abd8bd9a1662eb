"""How much to trust an attribution map: deletion/insertion curves and the randomization sanity check.

Deletion and insertion (Petsiuk et al. 2018, "RISE"): order the pixels by the map, highest first.
Deletion replaces them, in ``steps`` equal steps, by a baseline (default: the mean colour of the image
set — RISE's zero in a mean-subtracted input); a faithful map makes the class probability fall fast,
so a *low* area under the curve is good. Insertion starts from a blurred copy of the image (RISE's
choice; Gaussian, sigma = H / 8 pixels, 4 px on 32x32, so the class is not readable from it) and reveals
the original pixels in the same order; a *high* area is good. The probability tracked is the softmax
probability of the class the map explains (the runner explains the true class, so that is the true
class's probability). The area is the trapezoid over the fraction of pixels 0..1. A seeded random
order is the baseline every method must beat.

Sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): cascading randomization —
re-initialize the layers with weights one at a time from the output down (each step keeps the earlier
ones randomized) and compare each method's maps for the randomized net with those for the trained net
by Spearman rank correlation per image. A map that explains the model must change when the model
does; a method whose mean correlation is still above ``SANITY_THRESHOLD`` (0.5) with every layer
randomized is flagged: its maps reflect the image (edges, contrast), not what the net learned.

Everything returns plain dicts of floats and lists (JSON-ready) with per-method seconds.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import methods as attr

SANITY_THRESHOLD = 0.5
STEPS = 32


# ---------------------------------------------------------------------------------------------------
# Baselines and pixel orders


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float (N, C, H, W) images, reflect padding, kernel 2*ceil(2 sigma)+1
    (kept smaller than the image so reflection is defined)."""
    h, w = images.shape[-2:]
    radius = max(1, min(math.ceil(2 * sigma), h - 1, w - 1))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (xs / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.device)
    c = images.shape[1]
    x = F.pad(images.float(), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def substrate(kind: str, images: torch.Tensor, mean_colour: torch.Tensor) -> torch.Tensor:
    """What removed pixels become, as 0..255 float: "mean" colour of the image set, "black" or "blur"."""
    if kind == "mean":
        return mean_colour.to(images.device).expand(images.shape).clone()
    if kind == "black":
        return torch.zeros(images.shape, device=images.device)
    if kind == "blur":
        return gaussian_blur(images, sigma=max(1.0, images.shape[-2] / 8))
    raise ValueError(f"unknown baseline {kind!r}: use 'mean', 'black' or 'blur'")


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps -> (N, H*W) rank of each pixel, 0 = highest value; ties keep pixel order (stable)."""
    order = torch.argsort(maps.flatten(1), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return ranks


def random_maps(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, h, w, generator=torch.Generator().manual_seed(int(seed)))


def trapezoid_auc(fractions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.trapezoid(values, fractions, dim=-1)


# ---------------------------------------------------------------------------------------------------
# Deletion and insertion curves


@dataclass
class Curves:
    fractions: torch.Tensor   # (K+1,) fraction of pixels removed / inserted
    deletion: torch.Tensor    # (N, K+1) probability of the explained class
    insertion: torch.Tensor   # (N, K+1)

    @property
    def deletion_auc(self) -> torch.Tensor:
        return trapezoid_auc(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> torch.Tensor:
        return trapezoid_auc(self.fractions, self.insertion)


def deletion_insertion(model: nn.Module, images: torch.Tensor, normalization, maps: torch.Tensor,
                       targets: torch.Tensor, steps: int = STEPS, deletion_baseline: str = "mean",
                       insertion_start: str = "blur", batch_size: int = 8,
                       mean_colour: torch.Tensor | None = None) -> Curves:
    """Deletion and insertion curves of ``maps`` (N, H, W) for uint8 ``images``; ``targets`` (N,) are the
    classes whose probability is tracked. Each forward pass holds ``batch_size`` images x (steps + 1)
    masked copies. ``mean_colour`` (1, C, 1, 1, 0..255; default: that of ``images``) lets callers that
    split an image set keep one baseline."""
    n, _, h, w = images.shape
    device = attr._device(model)
    if mean_colour is None:
        mean_colour = attr.mean_colour(images)
    counts = torch.round(torch.arange(steps + 1) * (h * w) / steps).long()  # pixels changed at each step
    ranks = pixel_ranks(maps.cpu())
    deletion, insertion = [], []
    with attr.evaluating(model), torch.no_grad():
        for s in range(0, n, batch_size):
            x = images[s:s + batch_size].to(device).float()
            changed = (ranks[s:s + batch_size, None, :] < counts[None, :, None]).to(device)  # (B, K+1, HW)
            changed = changed.view(len(x), steps + 1, 1, h, w)
            t = targets[s:s + batch_size].to(device)
            deleted = torch.where(changed, substrate(deletion_baseline, x, mean_colour)[:, None], x[:, None])
            inserted = torch.where(changed, x[:, None], substrate(insertion_start, x, mean_colour)[:, None])
            deletion.append(_class_probability(model, deleted, t, normalization).cpu())
            insertion.append(_class_probability(model, inserted, t, normalization).cpu())
    fractions = counts.double() / (h * w)
    empty = torch.empty(0, steps + 1)
    return Curves(fractions, torch.cat(deletion).double() if deletion else empty,
                  torch.cat(insertion).double() if insertion else empty)


def _class_probability(model, stack: torch.Tensor, targets: torch.Tensor, normalization) -> torch.Tensor:
    """(B, S, C, H, W) 0..255 images -> (B, S) softmax probability of each image's target class."""
    b, s = stack.shape[:2]
    # channels-last input: measured ~1.5x faster for these convs on CPU (as evaluate.predict_logits does)
    x = normalization(stack.flatten(0, 1)).contiguous(memory_format=torch.channels_last)
    logits = model(x).float()
    probs = torch.softmax(logits, dim=1).view(b, s, -1)
    return probs.gather(2, targets.view(b, 1, 1).expand(b, s, 1))[..., 0]


# ---------------------------------------------------------------------------------------------------
# The faithfulness table


def _mean_sem(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    sem = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), sem


def _paired(better: torch.Tensor, worse: torch.Tensor) -> dict:
    """Mean per-image improvement over random and whether it is above 2 standard errors."""
    mean, sem = _mean_sem(better - worse)
    return {"mean_gain": mean, "sem": sem, "beats_random": bool(mean > 2 * sem) if not math.isnan(sem) else mean > 0}


def _summary(curves: Curves, seconds_maps: float, seconds_curves: float) -> dict:
    d_mean, d_sem = _mean_sem(curves.deletion_auc)
    i_mean, i_sem = _mean_sem(curves.insertion_auc)
    return {"deletion_auc": d_mean, "deletion_auc_sem": d_sem, "insertion_auc": i_mean, "insertion_auc_sem": i_sem,
            "deletion_curve": curves.deletion.mean(0).tolist(), "insertion_curve": curves.insertion.mean(0).tolist(),
            "seconds_maps": seconds_maps, "seconds_curves": seconds_curves}


def faithfulness_table(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalization,
                       methods=None, steps: int = STEPS, seed: int = 0, deletion_baseline: str = "mean",
                       insertion_start: str = "blur", method_options: dict | None = None,
                       batch_size: int = 8, maps: dict | None = None) -> dict:
    """Deletion/insertion AUC of each method explaining the *true* class, next to a seeded random order.

    ``method_options``: per-method keyword arguments for :func:`cifarlab.attribution.attribute` (e.g.
    ``{"smoothgrad": {"samples": 8}}``). ``maps``: precomputed :class:`~cifarlab.attribution.Attribution`
    per method (their seconds are reported) to avoid computing them twice.
    Returns ``{"settings", "random", "methods": {name: {..., "vs_random": {"deletion", "insertion"}}}}``.
    """
    labels = torch.as_tensor(labels).long().cpu()
    method_options = method_options or {}
    mean_colour = attr.mean_colour(images)

    def curves_of(maps_: torch.Tensor) -> Curves:
        return deletion_insertion(model, images, normalization, maps_, labels, steps, deletion_baseline,
                                  insertion_start, batch_size, mean_colour)

    start = time.perf_counter()
    random = curves_of(random_maps(len(images), *images.shape[-2:], seed=seed))
    out = {"settings": {"n": len(images), "steps": steps, "seed": seed, "deletion_baseline": deletion_baseline,
                        "insertion_start": insertion_start, "target": "true class",
                        "tracked": "true class probability"},
           "random": _summary(random, 0.0, time.perf_counter() - start), "methods": {}}
    for name in methods or attr.METHODS:
        a = (maps or {}).get(name) or attr.attribute(name, model, images, normalization, target=labels, seed=seed,
                                                      **method_options.get(name, {}))
        if not torch.equal(a.targets.cpu(), labels):
            raise ValueError(f"the {name} maps given explain other classes than the labels: the table tracks "
                             "the true class, so its maps must explain it (attribute(..., target='true'))")
        start = time.perf_counter()
        curves = curves_of(a.maps)
        row = _summary(curves, a.seconds, time.perf_counter() - start)
        row["vs_random"] = {"deletion": _paired(random.deletion_auc, curves.deletion_auc),
                            "insertion": _paired(curves.insertion_auc, random.insertion_auc)}
        out["methods"][name] = row
    return out


# ---------------------------------------------------------------------------------------------------
# Spearman rank correlation (no scipy)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks 1..n of (N, M) values, ties given their average rank (as scipy.stats.rankdata)."""
    x = x.double()
    s = torch.sort(x, dim=1).values
    below = torch.searchsorted(s, x, right=False)       # values strictly smaller
    at_most = torch.searchsorted(s, x, right=True)      # values smaller or equal
    return (below + at_most + 1).double() / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman correlation of (N, ...) maps. A constant row has no order to share: 0."""
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denom = (ra.norm(dim=1) * rb.norm(dim=1))
    return torch.where(denom > 0, (ra * rb).sum(1) / denom.clamp_min(1e-300), torch.zeros_like(denom))


# ---------------------------------------------------------------------------------------------------
# Cascading randomization


def weighted_layers(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Names of the modules that own parameters, in the order the forward pass runs them."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod]))
             for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    try:
        with attr.evaluating(model), torch.no_grad():
            model(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))  # a module run twice counts once, at its first use


def reinitialize(module: nn.Module, seed: int) -> None:
    """The module's own initialization (``reset_parameters``), seeded; without one, each parameter is
    redrawn from a normal with its current standard deviation."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            return
        for p in module.parameters(recurse=False):
            p.copy_(torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0))


def cascading_randomization(model: nn.Module, images: torch.Tensor, normalization, methods=None,
                            targets=None, seed: int = 0, method_options: dict | None = None,
                            threshold: float = SANITY_THRESHOLD, batch_size: int = 32) -> dict:
    """Spearman correlation between each method's maps for the trained net and for copies with the
    top 1, 2, ... weighted layers re-initialized (the model itself is not touched). ``targets``: the
    classes explained, fixed across steps (default: the trained net's predictions).

    Returns ``{"layers": [names, top first], "threshold", "methods": {name: {"spearman": [mean per step],
    "spearman_sem": [...], "final": mean with all randomized, "flagged": final > threshold, "seconds"}}}``.
    """
    method_options = method_options or {}
    device = attr._device(model)
    layers = weighted_layers(model, normalization(images[:1].to(device)))[::-1]
    if targets is None:
        targets = attr.predicted_classes(model, images, normalization)
    targets = torch.as_tensor(targets).long().cpu()
    methods = list(methods or attr.METHODS)
    kwargs = lambda name, net: dict(target=targets, seed=seed, batch_size=batch_size,  # noqa: E731
                                    layer=_layer_name(model, net, name, images, normalization, method_options),
                                    **{k: v for k, v in method_options.get(name, {}).items() if k != "layer"})
    trained = {}
    seconds = dict.fromkeys(methods, 0.0)
    for name in methods:
        a = attr.attribute(name, model, images, normalization, **kwargs(name, model))
        trained[name], seconds[name] = a.maps, a.seconds
    net = copy.deepcopy(model)
    rows = {name: {"spearman": [], "spearman_sem": []} for name in methods}
    for step, layer in enumerate(layers):
        reinitialize(dict(net.named_modules())[layer], int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
        for name in methods:
            a = attr.attribute(name, net, images, normalization, **kwargs(name, net))
            seconds[name] += a.seconds
            mean, sem = _mean_sem(spearman(trained[name], a.maps))
            rows[name]["spearman"].append(mean)
            rows[name]["spearman_sem"].append(sem)
    for name, row in rows.items():
        row["final"] = row["spearman"][-1] if row["spearman"] else float("nan")
        row["flagged"] = bool(row["final"] > threshold)
        row["seconds"] = seconds[name]
    return {"layers": layers, "threshold": threshold, "n": len(images), "methods": rows}


def _layer_name(model, net, method, images, normalization, method_options) -> str | None:
    """Grad-CAM's layer as a name, so the randomized copy uses its own module of the same name."""
    if method not in attr.LAYER_METHODS:
        return None
    layer = method_options.get(method, {}).get("layer")
    if isinstance(layer, nn.Module):
        return {m: n for n, m in model.named_modules()}[layer]
    return layer or attr.last_conv_layer(model, normalization(images[:1].to(attr._device(model))))
