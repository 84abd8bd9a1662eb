"""PNG plots with matplotlib's Agg backend, written atomically.

Names drawn in a figure (classes, files, layers) are data, never markup: :func:`pyplot` turns matplotlib's
mathtext and TeX off, so a class folder named ``$x^$`` or ``\\nosuchmacro`` is drawn as those characters
instead of failing the whole command inside the mathtext parser; long names are shortened with an ellipsis
(:func:`label`) so a 1,000-character class name does not make a figure 1,000 characters wide."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .fsutil import atomic_write_bytes


MAX_LABEL = 40  # characters of a name drawn in a figure; the full name is in results.json and the report


def pyplot():
    """matplotlib.pyplot on the Agg backend (headless, deterministic; never needs a display), imported
    on first use: commands that draw nothing (training, --help) do not pay for loading it. Every figure
    cifarlab draws comes from here, so this is where text stops being parsed as math or TeX: no figure
    uses either, and any name may hold '$', '^' or '\\'."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"text.parse_math": False, "text.usetex": False})
    import matplotlib.pyplot as plt

    return plt


def label(name, limit: int = MAX_LABEL) -> str:
    """A name as a figure shows it: at most ``limit`` characters (the end replaced by an ellipsis)."""
    text = str(name)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def to_hwc(images) -> np.ndarray:
    """uint8 (N, 3, H, W) tensor/array -> (N, H, W, 3) numpy for imshow."""
    arr = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def training_curves(history: list[dict], path: str | Path, val_source: str = "validation") -> Path:
    epochs = [row["epoch"] for row in history]
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        if all(f"val_{key}" in row for row in history):
            ax.plot(epochs, [row[f"val_{key}"] for row in history], "s-", label=val_source)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot(epochs, [row["lr"] for row in history], "o-", color="tab:green")
    axes[2].set_title("Learning rate (at epoch start)")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    return save_figure(fig, path)


# Above this many classes a confusion matrix is a heat map without per-cell numbers (the most-confused
# pairs are listed beside it), and per-class accuracy is a sorted curve instead of labelled bars.
MAX_ANNOTATED_CLASSES = 20


def confusion_matrix_plot(cm: np.ndarray, classes: list[str], path: str | Path) -> Path:
    n = len(classes)
    many = n > MAX_ANNOTATED_CLASSES
    fig, ax = pyplot().subplots(figsize=(11, 10) if many else (8, 7))
    # Many classes: rows normalized to recall, so each row's colours read the same whatever its count.
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if many else cm
    im = ax.imshow(shown, cmap="Blues", interpolation="nearest")
    ax.set_title("Confusion matrix (rows: true, columns: predicted" + (", row-normalized)" if many else ")"),
                 fontsize=13)
    if many:
        step = max(1, n // 50)
        ticks = range(0, n, step)
        ax.set_xticks(ticks, [label(classes[i]) for i in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [label(classes[i]) for i in ticks], fontsize=6)
    else:
        ax.set_xticks(range(n), [label(c) for c in classes], rotation=45, ha="right")
        ax.set_yticks(range(n), [label(c) for c in classes])
        threshold = cm.max() / 2
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def per_class_accuracy_plot(per_class: dict[str, float], path: str | Path) -> Path:
    names, values = [label(name) for name in per_class], [100 * v for v in per_class.values()]
    if len(names) > MAX_ANNOTATED_CLASSES:  # sorted, best first: the spread and the worst classes at a glance
        order = np.argsort(values, kind="stable")[::-1]
        names, values = [names[i] for i in order], [values[i] for i in order]
        fig, ax = pyplot().subplots(figsize=(max(8, 0.14 * len(names)), 4.5))
        ax.bar(range(len(names)), values, color="tab:blue", width=0.9)
        step = max(1, len(names) // 60)
        ax.set_xticks(range(0, len(names), step), names[::step], rotation=90, fontsize=6)
        ax.set_title("Per-class test accuracy, sorted")
    else:
        fig, ax = pyplot().subplots(figsize=(8, 4))
        bars = ax.bar(range(len(names)), values, color="tab:blue", tick_label=names)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.tick_params(axis="x", rotation=45)
        ax.set_title("Per-class test accuracy")
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    return save_figure(fig, path)


def image_grid(images, titles: list[str], path: str | Path, cols: int = 8, title: str | None = None,
               cell: tuple[float, float] = (2.0, 2.6), title_size: int = 9) -> Path:
    """A grid of uint8 (N, 3, H, W) images with a title under each."""
    images = to_hwc(images)
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = pyplot().subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(titles[i], fontsize=title_size)
    if title:
        fig.suptitle(title, fontsize=14)
    fig.tight_layout()
    return save_figure(fig, path)


def prediction_gallery(images, evaluation, indices, path: str | Path, title: str) -> Path:
    """The exercise's gallery: each image titled 'pred: X / score: 0.93 / true: Y'."""
    classes = evaluation.classes
    titles = [f"pred: {label(classes[evaluation.predictions[i]], 24)}\n"
              f"score: {evaluation.probabilities[i, evaluation.predictions[i]]:.3f}\n"
              f"true: {label(classes[evaluation.labels[i]], 24)}" for i in indices]
    return image_grid(images[np.asarray(indices)], titles, path, title=title, cell=(2.0, 2.9))
