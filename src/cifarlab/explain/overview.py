"""Explanations and how much to trust them, rendered for ``cifarlab visualize`` (and so ``run`` and the report).

:func:`render` is called by :func:`cifarlab.visualize.render_all` with what it already has (the model,
its normalization, the test data, the image indices it shows and the maximum stimuli it computed) and
writes, into the same folder:

* ``attribution_methods.png``: the maps of every method of :data:`cifarlab.attribution.METHODS` on the
  same test images (explaining the predicted class), one row per method, the colour scale fixed across
  the images of a row so they can be compared (signed maps on a symmetric diverging scale);
* ``faithfulness.png``: mean deletion and insertion curves per method and for a random order, on
  ``faithfulness_images`` test images (a seeded random choice), explaining the true class;
* ``sanity.png``: cascading randomization, Spearman correlation per method as layers are re-initialized
  from the top down, on ``sanity_images`` test images;
* ``examples_<layer>.png``: for every stimulus target (each conv layer's channels, and the classes), the
  top-9 test images beside the channel's maximum stimulus, with the ratio of the stimulus's activation to
  the best real image's.

The numbers go to ``explanations.json`` and into ``summary.json`` (key ``"explanations"``). Every part
can be switched off (0 images); ``ExplainSettings(enabled=False)`` skips it all.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import methods as attr
from .. import plots
from ..fsutil import atomic_write_json

# Defaults sized so that evaluate + visualize with everything on stays around a minute for the exercise
# net on 2 cores (README, "What the defaults cost").
FAITHFULNESS_IMAGES = 100
FAITHFULNESS_STEPS = 16
SANITY_IMAGES = 16
EXAMPLE_IMAGES = None  # None: the whole test set
TOP_K = 9


@dataclass
class ExplainSettings:
    enabled: bool = True
    faithfulness_images: int = FAITHFULNESS_IMAGES
    faithfulness_steps: int = FAITHFULNESS_STEPS
    sanity_images: int = SANITY_IMAGES
    example_images: int | None = EXAMPLE_IMAGES   # None: all test images; 0: no dataset examples
    methods: tuple[str, ...] | None = None         # None: every METHODS entry

    def validate(self) -> "ExplainSettings":
        for name in ("faithfulness_images", "sanity_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.faithfulness_steps < 2:
            raise ValueError("faithfulness_steps must be >= 2")
        if self.example_images is not None and self.example_images < 0:
            raise ValueError("example_images must be >= 0 (or None for the whole test set)")
        unknown = [m for m in self.methods or () if m not in attr.METHODS]
        if unknown:
            raise ValueError(f"unknown attribution methods {unknown}: use {', '.join(attr.METHODS)}")
        return self


def render(model, normalization, data, indices: list[int], stimuli, out_dir: Path,
           settings: ExplainSettings | bool | None = None, seed: int = 0, log=print,
           cam_layer: str | None = None) -> tuple[dict[str, str], dict]:
    """Everything in the module docstring; returns (files, summary). ``stimuli``: visualize's list of
    :class:`~cifarlab.visualize.Stimuli` (may be empty: no dataset examples then). ``cam_layer``: the
    layer (module name) of Grad-CAM and Grad-CAM++ (default: the last conv layer)."""
    from . import faithfulness as faith

    if settings is False:
        settings = ExplainSettings(enabled=False)
    settings = (settings or ExplainSettings()).validate()
    out_dir = Path(out_dir)
    if not settings.enabled:
        return {}, {"enabled": False}
    methods = list(settings.methods or attr.METHODS)
    test = data.test
    files: dict[str, str] = {}
    summary: dict = {"enabled": True, "settings": asdict(settings), "seconds": {}}
    summary["settings"]["methods"] = methods

    # 1. the maps of every method on the same images
    started = time.perf_counter()
    batch = test.images[indices]
    layer_options = {m: {"layer": cam_layer} for m in attr.LAYER_METHODS} if cam_layer else {}
    maps = attr.attribute_all(model, batch, normalization, methods=methods, target="predicted", seed=seed,
                              layer=cam_layer)
    predicted = next(iter(maps.values())).targets if maps else torch.empty(0, dtype=torch.long)
    titles = [f"#{i} {data.classes[int(test.labels[i])]}\npred: {data.classes[int(p)]}"
              for i, p in zip(indices, predicted.tolist())]
    files["attribution_methods"] = str(plot_method_maps(batch, maps, titles, out_dir / "attribution_methods.png"))
    summary["maps"] = {"images": [int(i) for i in indices], "target": "predicted class",
                       "seconds": {m: a.seconds for m, a in maps.items()},
                       "layers": {m: a.layer for m, a in maps.items() if a.layer}}
    summary["seconds"]["maps"] = time.perf_counter() - started

    # 2. faithfulness: deletion / insertion against a random order
    rng = np.random.default_rng(seed)
    n_faith = min(settings.faithfulness_images, len(test))
    if n_faith:
        started = time.perf_counter()
        chosen = np.sort(rng.choice(len(test), size=n_faith, replace=False))
        table = faith.faithfulness_table(model, test.images[chosen], test.labels[chosen], normalization,
                                         methods=methods, steps=settings.faithfulness_steps, seed=seed,
                                         method_options=layer_options)
        table["settings"]["images"] = "seeded random choice of test images"
        summary["faithfulness"] = table
        files["faithfulness"] = str(plot_faithfulness(table, out_dir / "faithfulness.png"))
        summary["seconds"]["faithfulness"] = time.perf_counter() - started
        log(f"faithfulness on {n_faith} test images, {settings.faithfulness_steps} steps in "
            f"{summary['seconds']['faithfulness']:.1f} s: "
            + "; ".join(f"{m} {faithfulness_verdict(r)}" for m, r in table["methods"].items()))

    # 3. sanity check: cascading randomization
    n_sanity = min(settings.sanity_images, len(test))
    if n_sanity:
        started = time.perf_counter()
        chosen = np.sort(rng.choice(len(test), size=n_sanity, replace=False))
        sanity = faith.cascading_randomization(model, test.images[chosen], normalization, methods=methods, seed=seed,
                                               method_options=layer_options)
        summary["sanity"] = sanity
        files["sanity"] = str(plot_sanity(sanity, out_dir / "sanity.png"))
        summary["seconds"]["sanity"] = time.perf_counter() - started
        flagged = [m for m, r in sanity["methods"].items() if r["flagged"]]
        log(f"sanity check on {n_sanity} images in {summary['seconds']['sanity']:.1f} s; flagged: "
            + (", ".join(flagged) or "none"))

    # 4. dataset examples beside the stimuli
    if stimuli and settings.example_images != 0:
        started = time.perf_counter()
        files.update(_dataset_examples(model, normalization, data, stimuli, settings, out_dir, summary))
        summary["seconds"]["examples"] = time.perf_counter() - started
        log(f"dataset examples (top-{TOP_K} of {summary['examples']['images']} test images) for "
            f"{len(summary['examples']['layers'])} layers in {summary['seconds']['examples']:.1f} s")
    summary["files"] = files
    atomic_write_json(out_dir / "explanations.json", summary)
    return files, summary


def beats_random(row: dict, metric: str | None = None) -> bool:
    """Whether a method beats a random pixel order on ``metric`` ("deletion" or "insertion": mean
    per-image gain above two standard errors), or on both when ``metric`` is None."""
    vs = row.get("vs_random", {})
    metrics = (metric,) if metric else ("deletion", "insertion")
    return all(bool(vs.get(m, {}).get("beats_random")) for m in metrics)


def faithfulness_verdict(row: dict) -> str:
    """Worded per metric, never one pooled yes: "beats random on deletion and insertion", "beats random
    on insertion, not on deletion", "no better than random on deletion or insertion". (Saliency can lift
    the insertion curve yet delete worse than random: one word for both would hide that.)"""
    won = [m for m in ("deletion", "insertion") if beats_random(row, m)]
    lost = [m for m in ("deletion", "insertion") if m not in won]
    if not lost:
        return "beats random on deletion and insertion"
    if not won:
        return "no better than random on deletion or insertion"
    return f"beats random on {won[0]}, not on {lost[0]}"


def _dataset_examples(model, normalization, data, stimuli, settings, out_dir: Path, summary: dict) -> dict:
    from . import examples as dx

    test = data.test
    n = len(test) if settings.example_images is None else min(settings.example_images, len(test))
    modules = dict(model.named_modules())
    targets = [s for s in stimuli if s.target.name == dx.CLASSES or s.target.name in modules]
    skipped = [s.target.name for s in stimuli if s not in targets]
    top = dx.top_activating(model, test.images[:n], normalization, layers=[s.target.name for s in targets], k=TOP_K)
    files, layers = {}, {}
    for s in targets:
        t = top[s.target.name]
        ratio = dx.stimulus_ratio(model, s.images, normalization, t, channels=s.channels)
        names = data.classes if s.target.name == dx.CLASSES else None
        key = f"examples_{s.target.name}"
        files[key] = str(plot_examples(s, t, ratio, test.images, out_dir / f"{key}.png", names))
        finite = ratio[np.isfinite(ratio)]
        layers[s.target.name] = {
            "channels": [int(c) for c in s.channels], "top_indices": t.indices[s.channels].tolist(),
            "top_values": t.values[s.channels].tolist(), "stimulus_ratio": [_num(r) for r in ratio],
            "median_ratio": _num(np.median(finite)) if len(finite) else None,
            "above_best_real": int((finite > 1).sum())}
    summary["examples"] = {"images": n, "set": "test", "k": TOP_K, "layers": layers, "skipped_layers": skipped,
                           "activation": "channel mean over space (the stimulus objective); logit for classes",
                           "ratio": "activation of the stimulus / activation of the best real image"}
    return files


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------------
# Plots


def method_scale(maps: torch.Tensor) -> tuple[float, float, str]:
    """(vmin, vmax, colormap) shared by all images of one method: a symmetric diverging scale for signed
    maps (integrated gradients, occlusion), 0..max otherwise; the 99.5th percentile of |map| so one hot
    pixel does not wash the rest out."""
    a = maps.detach().float().flatten()
    if a.numel() == 0:
        return 0.0, 1.0, "inferno"
    top = float(torch.quantile(a.abs()[:1_000_000], 0.995)) or float(a.abs().max()) or 1.0
    if float(a.min()) < 0:
        return -top, top, "RdBu_r"
    return 0.0, top, "inferno"


def plot_method_maps(images: torch.Tensor, maps: dict, titles: list[str], path) -> Path:
    plt = plots.pyplot()
    hwc = plots.to_hwc(images)
    n, rows = len(hwc), len(maps) + 1
    fig, axes = plt.subplots(rows, n + 1, figsize=(1.5 * n + 1.2, 1.6 * rows),
                             gridspec_kw={"width_ratios": [1] * n + [0.08]}, squeeze=False)
    for i in range(n):
        axes[0, i].imshow(hwc[i], interpolation="nearest")
        axes[0, i].set_title(titles[i], fontsize=7)
    axes[0, n].axis("off")
    for r, (name, a) in enumerate(maps.items(), start=1):
        vmin, vmax, cmap = method_scale(a.maps)
        for i in range(n):
            im = axes[r, i].imshow(a.maps[i].numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[r, 0].set_ylabel(name.replace("_", " "), fontsize=8)
        fig.colorbar(im, cax=axes[r, n])
        axes[r, n].tick_params(labelsize=6)
    for ax in axes[:, :n].flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Attribution maps of every method for the predicted class (colour scale fixed per row)",
                 fontsize=10)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def plot_faithfulness(table: dict, path) -> Path:
    plt = plots.pyplot()
    steps = table["settings"]["steps"]
    x = np.linspace(0, 1, steps + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = dict(table["methods"], random=table["random"])
    for name, row in rows.items():
        style = dict(color="black", linestyle="--") if name == "random" else {}
        for ax, kind in zip(axes, ("deletion", "insertion")):
            ax.plot(x, row[f"{kind}_curve"], label=f"{name} ({row[f'{kind}_auc']:.3f})", **style)
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        ax.set_title(f"{kind} (AUC in the legend, {better} is better)", fontsize=10)
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("true-class probability")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.suptitle(f"Deletion and insertion on {table['settings']['n']} test images", fontsize=11)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def plot_sanity(sanity: dict, path) -> Path:
    plt = plots.pyplot()
    layers = sanity["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers) + 3), 3.8))
    for name, row in sanity["methods"].items():
        ax.plot(range(1, len(layers) + 1), row["spearman"], marker="o", label=name + (" (flagged)" if row["flagged"]
                                                                                      else ""))
    ax.axhline(sanity["threshold"], color="red", linestyle=":", label=f"flag above {sanity['threshold']}")
    ax.set_xticks(range(1, len(layers) + 1), layers, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("re-initialized down to this layer (from the top)")
    ax.set_ylabel("Spearman vs trained maps")
    ax.set_ylim(-0.2, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(f"Cascading randomization on {sanity['n']} test images", fontsize=10)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def plot_examples(stimuli, top, ratio: np.ndarray, images: torch.Tensor, path, class_names=None) -> Path:
    """One row per channel: its maximum stimulus, a gap, then its top-9 test images; the ratio on the left."""
    plt = plots.pyplot()
    channels = list(stimuli.channels)
    stim = plots.to_hwc(stimuli.images)
    h, w = stim.shape[1:3]
    k = top.indices.shape[1]
    gap = max(2, h // 8)
    cell_w = w + gap
    canvas = np.full((len(channels) * (h + gap) - gap, (k + 1) * cell_w + 2 * gap - gap, 3), 255, np.uint8)
    for r, c in enumerate(channels):
        y = r * (h + gap)
        canvas[y:y + h, :w] = stim[r]
        best = plots.to_hwc(images[top.indices[c]])
        for j in range(k):
            x = w + 3 * gap + j * cell_w
            canvas[y:y + h, x:x + w] = best[j]
    px_per_inch = h / 0.45
    width, height = canvas.shape[1] / px_per_inch + 1.6, canvas.shape[0] / px_per_inch + 0.6
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((1.6 / width, 0.1 / height, 1 - 1.6 / width, 1 - 0.6 / height))
    ax.imshow(canvas, interpolation="nearest")
    for r, c in enumerate(channels):
        label = class_names[c] if class_names else f"#{c}"
        value = "n/a" if not math.isfinite(float(ratio[r])) else f"x{float(ratio[r]):.2f}"
        ax.text(-gap, r * (h + gap) + h / 2, f"{label}  {value}", ha="right", va="center", fontsize=7)
    ax.axis("off")
    fig.text(0.5, 1 - 0.25 / height, f"{stimuli.target.name}: maximum stimulus | top-{k} test images "
             "(x: stimulus activation / best real image's)", ha="center", va="center", fontsize=9)
    return plots.save_figure(fig, path)
