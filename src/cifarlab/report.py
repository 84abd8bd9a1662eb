"""One self-contained HTML report per run: ``RUN/report.html``.

Everything a reader needs to judge a run on one page, readable offline: the model summary, the recipe,
the final numbers, training curves and their diagnosis (:mod:`cifarlab.doctor`), confusion matrix,
per-class accuracy, prediction gallery, worst mistakes, a 2-D map of the test set's penultimate features,
maximum stimuli per layer with a page per channel, class stimuli with the net's probabilities,
first-layer filters, activation maps, saliency and Grad-CAM.

The page is rendered by Jinja2 templates (``cifarlab/templates/report.html``) with autoescape on, so a
class name, a file name or a recipe value is always text, never markup. Images are inlined as base64 data
URIs and the page fetches nothing; its Content-Security-Policy allows no network access and runs only
the page's own inline script (by its sha256), which needs no server:

* a click on a confusion-matrix cell shows the test images of that (true, predicted) pair (at most
  :data:`CELL_IMAGES` of them, "showing k of N", N the cell's count), JPEG thumbnails in one sprite per cell;
* hovering a point of the feature map shows that test image, its true and predicted class;
* each stimulus links to its channel's page (plain ``#fragment`` pages, shown with CSS ``:target``).

Inputs come from the run folder where they exist (``eval/results.json``, ``eval/predictions.safetensors``
and the PNGs from :func:`cifarlab.pipeline.evaluate_to_folder`, ``training_curves.png``) and are
computed where they do not. Visualizations are rendered into ``RUN/visualize/``.
"""
from __future__ import annotations

import base64
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import plots
from .doctor import diagnose
from .errors import CifarlabError, ReportError, short_repr
from .evaluate import TTA_LEVELS, tta_level
from .explain import beats_random, faithfulness_verdict
from .fsutil import atomic_write_text
from .models import summary

SECTIONS = [
    ("overview", "Overview"), ("results", "Final numbers"), ("curves", "Training curves"),
    ("diagnosis", "Diagnosis of the training curves"),
    ("confusion", "Confusion matrix"), ("per-class", "Per-class accuracy"), ("quality", "Per-class quality"),
    ("calibration", "Calibration"), ("shift", "Distribution shift"), ("ood", "Unlike any class"), ("gallery", "Predictions"),
    ("mistakes", "Worst mistakes"), ("map", "Feature map"), ("stimuli", "Maximum stimuli per layer"),
    ("classes", "Class stimuli"), ("filters", "First-layer filters"), ("activations", "Activation maps"),
    ("attributions", "Saliency and Grad-CAM"), ("explanations", "Attributions"),
    ("examples", "Dataset examples"), ("model", "Model summary"), ("recipe", "Recipe"),
]

EVAL_PNGS = ("confusion_matrix.png", "per_class_accuracy.png", "gallery.png", "worst_mistakes.png", "reliability.png")
CELL_IMAGES = 50      # test images shown per confusion cell (the first ones, in test-set order)
MAP_POINTS = 2000     # test images on the feature map (a seeded random subsample)
MAP_METHODS = ("pca", "umap")
THUMB = 32            # thumbnail side in pixels (CIFAR's own size; photos are shrunk to it)
MAX_IMAGE_BYTES = 64 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------
# Gathering the inputs


def _load_inputs(run_dir: Path, ckpt, data, log):
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a run folder (it does not exist or is a file)")
    if ckpt is None:
        from .checkpoints import load_checkpoint

        ckpt = load_checkpoint(run_dir)
    if data is None:
        from .data import load_stored

        entry = ckpt.meta.get("dataset") or {}
        log(f"loading {entry.get('spec', 'cifar10')} for the report")
        data = load_stored(entry)  # the same size and fit the model was trained on
    return ckpt, data


def _results(run_dir: Path, ckpt, data, log) -> tuple[dict, dict]:
    """(``eval/results.json``, ``eval/predictions.safetensors``) if they describe this checkpoint and this
    test set and the plots exist, else evaluate now."""
    from .pipeline import PREDICTIONS_FILE, evaluate_to_folder

    eval_dir = run_dir / "eval"
    path = eval_dir / "results.json"
    if path.exists() and all((eval_dir / name).exists() for name in EVAL_PNGS + (PREDICTIONS_FILE,)):
        results, why = stored_results(path, ckpt)
        if results is not None:
            predictions, why = _stored_predictions(eval_dir / PREDICTIONS_FILE, results, data)
            if predictions is not None:
                return results, predictions
        log(f"{path}: {why}; evaluating {ckpt.path} again")
    else:
        log(f"evaluating {ckpt.path} on the test set into {eval_dir}")
    seed = int(ckpt.meta.get("recipe", {}).get("seed", 0))
    evaluate_to_folder(ckpt, data, eval_dir, seed=seed)
    results, why = stored_results(path, ckpt)
    predictions = None
    if results is not None:
        predictions, why = _stored_predictions(eval_dir / PREDICTIONS_FILE, results, data)
    if predictions is None:
        raise ReportError(f"{eval_dir}: just evaluated, but cannot read it back: {why}")
    return results, predictions


def stored_results(path: Path, ckpt) -> tuple[dict | None, str]:
    """(results, "") when ``path`` is well-formed and describes exactly this checkpoint, else (None, why):
    checked before any rendering, so a malformed or stale file is recomputed instead of crashing the page."""
    from .validation import ValidationError, check_results, load_json_file

    try:
        results = check_results(load_json_file(path, "evaluation results"), path)
    except ValidationError as e:
        return None, f"unusable ({str(e).removeprefix(f'{path}: ')})"
    if not _same_path(results["checkpoint"], ckpt.path):
        return None, f"is for another checkpoint ({results['checkpoint']})"
    sha = results.get("weights_sha256")
    if sha is not None and sha != ckpt.meta.get("weights_sha256"):
        return None, "is for other weights of this checkpoint (it was trained further since)"
    if results["classes"] != list(ckpt.meta.get("classes", [])):
        return None, "names other classes than the checkpoint"
    return results, ""


_stored_results = stored_results  # the name tests/test_cli_hostile.py knows it by


def _stored_predictions(path: Path, results: dict, data) -> tuple[dict | None, str]:
    """The per-image predictions, if they are this test set's (its labels, image for image) and add up to
    the confusion matrix of ``results``."""
    from .evaluate import confusion_matrix
    from .pipeline import load_predictions

    n, k = results["num_images"], len(results["classes"])
    try:
        predictions = load_predictions(path, k, n)
    except CifarlabError as e:
        return None, str(e)
    if n != len(data.test) or not np.array_equal(predictions["labels"], data.test.labels.numpy()):
        return None, f"{path.name} is for another test set than the one loaded"
    counts = confusion_matrix(predictions["labels"], predictions["predicted"], k)
    if "confusion_matrix" in results and counts.tolist() != results["confusion_matrix"]:
        return None, f"{path.name} does not add up to the confusion matrix of results.json"
    return predictions, ""


def _same_path(a, b) -> bool:
    return a is not None and Path(a).resolve() == Path(b).resolve()


def _curves(run_dir: Path, ckpt) -> Path | None:
    path = run_dir / "training_curves.png"
    if path.exists():
        return path
    history = ckpt.meta.get("history") or []
    if not history:
        return None
    return plots.training_curves(history, path, val_source=ckpt.meta.get("val_source", "validation"))


def _diagnosis(ckpt) -> tuple[list[str], str]:
    """(finding texts, where they come from): the trainer's stored diagnosis, else one computed from the
    checkpoint's history; no texts and a reason when neither is possible. Meta values are checked, not
    trusted: a checkpoint is a file anyone can hand over."""
    meta = ckpt.meta
    stored = meta.get("diagnosis")
    texts = ([f["text"] for f in stored if isinstance(f, dict) and isinstance(f.get("text"), str)]
             if isinstance(stored, list) else [])
    if texts:
        return texts, "Stored by the trainer with the final checkpoint."
    if not meta.get("history"):
        return [], "The checkpoint stores no training history: nothing to diagnose."
    val_size = meta.get("val_size")
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
        return [], ("The checkpoint does not store the number of validation images, which the 2-standard-error "
                    "rule needs: not diagnosed.")
    recipe = meta.get("recipe") or {}
    findings = diagnose(meta["history"], val_size, str(meta.get("val_source", "validation")),
                        mixed_batches=bool(recipe.get("mixup") or recipe.get("cutmix")))
    return [f.text for f in findings], "Computed from the history stored in the checkpoint."


@dataclass
class VisualOutputs:
    """What ``cifarlab visualize`` left for the report: its PNGs by key, and its numbers."""

    out_dir: Path
    files: dict[str, str]
    class_probabilities: dict[str, dict[str, float]]
    method: str
    seconds: float
    explanations: dict


def _visual_outputs(vis) -> VisualOutputs:
    """The one place that knows where visualize's outputs are: the result of ``render_all`` and the
    ``summary.json`` beside its PNGs (``"explanations"``: attribution numbers and dataset examples)."""
    from .validation import load_json_file

    try:
        saved = load_json_file(Path(vis.out_dir) / "summary.json", "visualization summary")
    except CifarlabError:
        saved = {}
    explained = saved.get("explanations") if isinstance(saved, dict) else None
    return VisualOutputs(Path(vis.out_dir), dict(vis.files), dict(vis.class_probabilities), vis.method,
                         next(iter(vis.seconds.values()), 0.0), explained if isinstance(explained, dict) else {})


# ---------------------------------------------------------------------------------------------------
# Page blocks: plain data for the template (every string is escaped there)


def _figure(path, alt: str) -> dict:
    """A PNG inlined as a data URI; a visible note instead if the file is missing or not a PNG."""
    if path is None or not Path(path).exists():
        return {"kind": "missing", "text": f"Not available: {alt}."}
    from .validation import read_bounded

    try:
        data = read_bounded(path, MAX_IMAGE_BYTES, "image", ReportError)
    except ReportError as e:
        return {"kind": "missing", "text": f"Not available: {alt} ({e})."}
    if not data.startswith(PNG_SIGNATURE):
        return {"kind": "missing", "text": f"Not available: {alt} ({path} is not a PNG file)."}
    return {"kind": "figure", "src": "data:image/png;base64," + base64.b64encode(data).decode("ascii"), "alt": alt}


def _table(header: list[str] | None, rows: list[list], numeric_from: int = 1) -> dict:
    """A table; cells from column ``numeric_from`` on are right-aligned. No header row for None."""
    return {"kind": "table", "header": header, "rows": [[str(v) for v in row] for row in rows],
            "numeric_from": numeric_from}


def _text(text: str, kind: str = "text") -> dict:
    """A paragraph: ``text``, ``strong``, ``missing``, ``h3`` or ``pre``."""
    return {"kind": kind, "text": text}


def _section(sid: str, blocks: list[dict], intro: str = "") -> dict:
    return {"id": sid, "title": dict(SECTIONS)[sid], "intro": intro, "blocks": blocks}


def _pct(v) -> str:
    return f"{100 * v:.2f}%"


def _diagnosis_section(ckpt) -> dict:
    texts, source = _diagnosis(ckpt)
    if not texts:
        return _section("diagnosis", [_text(source, "missing")])
    return _section("diagnosis", [{"kind": "list", "items": texts}],
                    "The training doctor: each statement is made only when the difference exceeds 2 binomial "
                    "standard errors of the validation accuracy, 2 sqrt(p(1-p)/n) with n the validation images "
                    f"(rules: cifarlab.doctor). {source}")


def _cards(results: dict, ckpt) -> dict:
    tta = f" ({TTA_LEVELS[tta_level(results.get('tta'))]})" if results.get("tta") else ""
    items = [(_pct(results["accuracy"]), "test accuracy" + tta),
             (f"{results['loss']:.4f}", "test loss"), (f"{results['num_images']:,}", "test images"),
             (f"{ckpt.model.num_parameters():,}", "parameters"),
             (str(ckpt.meta.get("epoch") if ckpt.meta.get("epoch") is not None else "-"), "epochs trained")]
    if ckpt.meta.get("train_seconds"):
        items.append((f"{ckpt.meta['train_seconds']:.0f} s", "training time"))
    return {"kind": "cards", "items": items}


def _probability_table(probs: dict[str, dict[str, float]]) -> dict:
    methods = list(probs)
    classes = list(next(iter(probs.values()))) if probs else []
    rows = [[c] + [f"{probs[m][c]:.3f}" for m in methods] for c in classes]
    rows.append(["minimum"] + [f"{min(probs[m].values()):.3f}" for m in methods])
    return _table(["class"] + [f"p(class | stimulus), {m} method" for m in methods], rows)


def _numbers_sections(run_dir: Path, ckpt, results: dict, curves, confusion: dict | None = None) -> list[dict]:
    """Overview, final numbers, curves and their diagnosis, confusion matrix, per-class accuracy, quality,
    calibration, shift, gallery, mistakes. ``confusion``: the clickable matrix (:func:`confusion_block`)."""
    eval_dir = run_dir / "eval"
    val_source = ckpt.meta.get("val_source", "validation set")
    dataset = ckpt.meta.get("dataset") or {"spec": "cifar10"}
    shape = "x".join(map(str, dataset.get("image_shape", [3, 32, 32])))
    overview = _table(None, [
        ["run folder", str(run_dir)], ["checkpoint", str(ckpt.path)],
        ["architecture", ckpt.meta.get("architecture", {}).get("name", "?")],
        ["data", f"{dataset.get('spec', '?')}: {len(results['classes'])} classes, images {shape}, "
                 f"{dataset.get('train_images', '?')} training images"],
        ["validation during training", val_source],
        ["versions", ", ".join(f"{k} {v}" for k, v in ckpt.meta.get("versions", {}).items())]], 2)
    numbers = _table(["metric", "value"], [
        ["test accuracy", _pct(results["accuracy"])], ["test loss (cross-entropy)", f"{results['loss']:.4f}"],
        ["test images", f"{results['num_images']:,}"],
        ["test-time augmentation", TTA_LEVELS[tta_level(results.get("tta"))]]])
    # Sorted worst first: with 100 classes the table is read from the top for what fails.
    per_class = [[c, _pct(results["per_class_accuracy"][c])] for c in
                 sorted(results["classes"], key=lambda c: results["per_class_accuracy"][c])]
    confused = [[p["true"], p["predicted"], p["count"]] for p in results.get("most_confused", [])]
    mistakes = [[m["index"], m["true"], m["predicted"], f"{m['score']:.3f}"]
                for m in results.get("worst_mistakes", [])]
    confusion_blocks = [confusion] if confusion else []
    confusion_blocks.append(_figure(eval_dir / "confusion_matrix.png", "confusion matrix"))
    if confused:
        confusion_blocks += [_text("Most confused pairs", "h3"), _table(["true", "predicted as", "test images"],
                                                                         confused, 2)]
    return [
        _section("overview", [_cards(results, ckpt), overview]),
        _section("results", [numbers]),
        _section("curves", [_figure(curves, "training curves")],
                 f"Loss and accuracy per epoch; validation on the {val_source}."),
        _diagnosis_section(ckpt),
        _section("confusion", confusion_blocks,
                 "Rows: true class; columns: predicted class. Click a cell to see its test images."
                 if confusion else ""),
        _section("per-class", [_figure(eval_dir / "per_class_accuracy.png", "per-class accuracy"),
                               _table(["class (worst first)", "test accuracy"], per_class)]),
        _section("quality", _quality_blocks(results),
                 "Precision: of the test images predicted as the class, the share that are it. Recall: of the "
                 "class's test images, the share predicted as it (its accuracy). F1: their harmonic mean."),
        _calibration_section(eval_dir, results),
        _shift_section(results),
        _ood_section(eval_dir, ckpt),
        _section("gallery", [_figure(eval_dir / "gallery.png", "random test predictions")],
                 "Random test images with the predicted class, its probability and the true class."),
        _section("mistakes", [_figure(eval_dir / "worst_mistakes.png", "most confident mistakes"),
                              _table(["test index", "true", "predicted", "probability"], mistakes, 3)],
                 "The wrong predictions the net was most sure of."),
    ]


def _quality_blocks(results: dict) -> list[dict]:
    quality = results.get("per_class")
    if not quality:
        return [_text("Not in this results.json (evaluated by an older cifarlab): re-run cifarlab evaluate.",
                      "missing")]
    names = list(quality)
    many = len(names) > 20
    if many:  # with many classes the table is read from the top for what fails
        names.sort(key=lambda c: quality[c]["f1"])
    rows = [[c, _pct(quality[c]["precision"]), _pct(quality[c]["recall"]), f"{quality[c]['f1']:.3f}",
             quality[c].get("support", "?")] for c in names]
    macro = results.get("macro_f1")
    note = [_text(f"Macro-averaged F1: {macro:.3f}.")] if macro is not None else []
    return note + [_table([f"class{' (worst F1 first)' if many else ''}", "precision", "recall", "F1",
                           "test images"], rows)]


def _calibration_section(eval_dir: Path, results: dict) -> dict:
    cal = results.get("calibration")
    if not cal:
        return _section("calibration", [_text("Not in this results.json (evaluated by an older cifarlab): re-run "
                                              "cifarlab evaluate.", "missing")])
    before, after = cal["before"], cal.get("after")
    metrics = [("ECE (expected calibration error)", "ece", _pct), ("MCE (worst bin)", "mce", _pct),
               ("NLL (nats)", "nll", lambda v: f"{v:.4f}"),
               ("Brier score (sum over classes)", "brier", lambda v: f"{v:.4f}"), ("accuracy", "accuracy", _pct)]
    header = ["metric (test set)", "softmax" if not after else "before (T = 1)"]
    if after:
        header.append(f"after (T = {cal['temperature']:.3f})")
    rows = [[label] + [fmt(before[key])] + ([fmt(after[key])] if after else []) for label, key, fmt in metrics]
    if after:
        where = (f"The temperature T = {cal['temperature']:.3f} was fitted on {cal.get('fitted_on')} "
                 "(the run's --val-split hold-out, never the test set) by minimizing their NLL; dividing the "
                 "logits by T leaves every prediction, so the accuracy, unchanged.")
    else:
        where = ("This checkpoint stores no temperature: train with --val-split N, or run cifarlab calibrate RUN "
                 "on a run that has one, to fit it on held-out training images.")
    intro = (f"Are the probabilities honest? ECE: the confidences (maximum probability) in {cal['n_bins']} "
             "equal-width bins, the mean |accuracy - confidence| weighted by bin size (Guo et al. 2017). "
             "Brier: the squared distance of the probability vector to the one-hot label, summed over classes "
             "(0..2). " + where)
    return _section("calibration", [_figure(eval_dir / "reliability.png", "reliability diagram"),
                                    _table(header, rows)], intro)


def _shift_section(results: dict) -> dict:
    shift = results.get("shift") or []
    if not shift:
        return _section("shift", [{"kind": "parts", "parts": [
            ("No shifted test set was evaluated. ", False), ("cifarlab evaluate RUN --on cifar10.1", True),
            (" adds CIFAR-10.1 (2,000 new test images, Recht et al. 2018) and reports the accuracy gap here.",
             False)]}])
    rows = []
    for s in shift:
        lo, hi = s["accuracy_ci95"]
        rlo, rhi = s["reference_ci95"]
        glo, ghi = s["gap_ci95"]
        rows.append([s.get("dataset", "?"), f"{s['num_images']:,}",
                     f"{_pct(s['accuracy'])} ({100 * lo:.1f}-{100 * hi:.1f})",
                     f"{_pct(s['reference_accuracy'])} ({100 * rlo:.1f}-{100 * rhi:.1f})",
                     f"{100 * s['gap']:+.2f} ({100 * glo:+.1f} to {100 * ghi:+.1f})"])
    return _section("shift", [_table(["test set", "images", "accuracy (95% CI)", "original test accuracy (95% CI)",
                                      "gap, points (95% CI)"], rows)],
                    "Does the accuracy hold on new images of the same classes? Intervals: Wilson for each "
                    "accuracy, normal approximation for the gap (original minus shifted).")


def _ood_section(eval_dir: Path, ckpt) -> dict:
    """``cifarlab evaluate --ood``'s results (``eval/ood.json``, ``eval/ood_scores.png``) when they are there and
    were made with these weights: per OOD set the share flagged and each score's AUROC (bootstrap interval
    for small sets), and the score histograms."""
    from . import validation as V
    from .ood import SCORE_NAMES, SCORES

    path = eval_dir / "ood.json"
    hint = [("Not evaluated. ", False), ("cifarlab evaluate RUN --ood noise permuted folder:PATH", True),
            (" scores how well the run tells its own kind of images from others, and predict flags a photo as "
             "unlike any class it knows.", False)]
    if not path.is_file():
        return _section("ood", [{"kind": "parts", "parts": hint}])
    try:
        stored = V.load_json_file(path, "OOD results", ReportError)
        sets, threshold = stored["sets"], stored["threshold"]
        if threshold.get("weights_sha256") != ckpt.meta.get("weights_sha256"):
            return _section("ood", [_text(f"{path} was made with other weights; evaluate --ood again.", "missing")])
        rows = []
        for entry in sets[:50]:
            cells = [str(entry["name"]), f"{int(entry['images']):,}", _pct(float(entry["flagged_at_threshold"]))]
            for score in SCORES:
                m = entry["metrics"].get(score)
                ci = m.get("auroc_ci95") if m else None
                cells.append("-" if m is None else f"{float(m['auroc']):.3f}"
                             + (f" [{float(ci[0]):.3f}, {float(ci[1]):.3f}]" if ci else ""))
            rows.append(cells)
        accepted = float(stored["in_distribution"]["accepted_at_threshold"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, CifarlabError) as e:
        return _section("ood", [_text(f"{path}: not readable as OOD results ({short_repr(e, 120)}); evaluate --ood "
                                      "again.", "missing")])
    table = _table(["OOD set", "images", "flagged", *(f"AUROC {SCORE_NAMES[s]}" for s in SCORES)], rows)
    return _section("ood", [table, _figure(eval_dir / "ood_scores.png", "OOD score histograms")],
                    f"AUROC: how well each score ranks the test images above the set's (1 = perfectly, 0.5 = "
                    f"chance; 95% bootstrap interval for small sets). Flagged: the share below the run's threshold, "
                    f"which accepts {100 * accepted:.1f}% of the test images. The flag uses the all-layers KNN score.")


# ---------------------------------------------------------------------------------------------------
# Thumbnails: many small images as one inlined sprite


def _sprite(images, cols: int, fmt: str = "JPEG", size: int = THUMB) -> dict:
    """uint8 images (N, C, H, W) as one grid image (``cols`` per row, each ``size`` px square) in a data
    URI: one image to decode instead of N. JPEG for photos (a fifth of PNG's bytes at 32 px), PNG for
    stimuli (synthetic detail)."""
    from PIL import Image

    tiles = plots.to_hwc(images)
    if tiles.shape[-1] == 1:
        tiles = tiles.repeat(3, axis=-1)
    n = len(tiles)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    sheet = Image.new("RGB", (cols * size, rows * size), "white")
    for i, tile in enumerate(tiles):
        img = Image.fromarray(np.ascontiguousarray(tile))
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BOX if img.width > size else Image.Resampling.NEAREST)
        sheet.paste(img, ((i % cols) * size, (i // cols) * size))
    buf = io.BytesIO()
    sheet.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {"optimize": True}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return {"src": f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii"), "cols": cols,
            "size": size}


# ---------------------------------------------------------------------------------------------------
# The clickable confusion matrix


def confusion_block(classes: list[str], predictions: dict, images, cap: int = CELL_IMAGES) -> dict:
    """The confusion matrix as a table of buttons, and per non-empty cell the test-set indices of its first
    ``cap`` images with their thumbnails (one sprite per cell, decoded only when the cell is clicked)."""
    labels, predicted = predictions["labels"], predictions["predicted"]
    k = len(classes)
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (labels, predicted), 1)
    row_totals = counts.sum(1, keepdims=True).clip(min=1)
    cells = {}
    for t, p in zip(*np.nonzero(counts)):
        members = np.flatnonzero((labels == t) & (predicted == p))
        shown = members[:cap]
        cells[f"{t},{p}"] = dict(_sprite(images[shown], 10), n=int(counts[t, p]), idx=shown.tolist())
    shade = (counts / row_totals).round(3)
    return {"kind": "confusion", "classes": list(classes), "counts": counts.tolist(), "shade": shade.tolist(),
            "cap": cap, "data": {"classes": list(classes), "cells": cells, "cap": cap}}


# ---------------------------------------------------------------------------------------------------
# The feature map


def _palette(k: int) -> list[str]:
    """Matplotlib's tab10 for up to 10 classes, else evenly spaced hues."""
    if k <= 10:
        return ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"][:k]
    return [f"hsl({round(360 * i / k)}, 70%, 45%)" for i in range(k)]


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, D) -> (N, 2) and a sentence saying how. PCA: the top two principal components of the centred
    features (numpy SVD); UMAP: umap-learn, if installed."""
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ReportError("--map umap needs umap-learn (pip install umap-learn); --map pca needs nothing "
                              "more") from None
        xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(features)
        return np.asarray(xy, np.float64), "UMAP (umap-learn, 15 neighbours) of the features"
    if method != "pca":
        raise ReportError(f"unknown map method {method!r}: use one of {', '.join(MAP_METHODS)}")
    centred = features - features.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    explained = (s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-12)
    how = f"PCA of the features (the first two components explain {100 * explained:.1f}% of their variance)"
    return centred @ vt[:2].T, how


def feature_map_block(ckpt, data, predictions: dict, method: str = "pca", points: int = MAP_POINTS,
                      seed: int = 0) -> dict:
    """A scatter (inline SVG) of a seeded random subsample of the test set in 2-D, coloured by true class,
    mistakes ringed; hovering a point shows its thumbnail. Features: the L2-normalised input of the
    head (:func:`cifarlab.ood.features_and_logits`, the OOD scores' features)."""
    from . import ood
    from .transforms import Normalization

    n = len(data.test)
    if n < 3:
        return _text(f"Not drawn: the test set has {n} images.", "missing")
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=min(points, n), replace=False))
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    try:
        features, _ = ood.features_and_logits(ckpt.model.cpu(), data.test.images[chosen], normalization)
    except CifarlabError as e:
        return _text(f"Not drawn: {e}.", "missing")
    xy, how = project_2d(ood.normalize_rows(features).numpy().astype(np.float64), method, seed)
    classes = list(ckpt.meta["classes"])
    true, pred = predictions["labels"][chosen], predictions["predicted"][chosen]
    width, height, margin = 640, 480, 12
    lo, span = xy.min(0), np.ptp(xy, 0).clip(min=1e-12)
    xs = margin + (xy[:, 0] - lo[0]) / span[0] * (width - 2 * margin)
    ys = height - margin - (xy[:, 1] - lo[1]) / span[1] * (height - 2 * margin)  # up is up
    colors = _palette(len(classes))
    dots = [{"x": round(float(x), 1), "y": round(float(y), 1), "color": colors[int(t)], "wrong": bool(t != p)}
            for x, y, t, p in zip(xs, ys, true, pred)]
    sprite = _sprite(data.test.images[chosen], 50)
    return {"kind": "map", "width": width, "height": height, "dots": dots,
            "legend": [{"name": c, "color": col} for c, col in zip(classes, colors)],
            "caption": ((f"{len(chosen):,} of {n:,} test images (a random subsample, seed {seed})" if len(chosen) < n
                         else f"All {n:,} test images") + f"; {how}. "
                        "Colour: true class; ringed: predicted wrongly. Hover a point to see the image."),
            "data": {"classes": classes, "idx": chosen.tolist(), "true": true.tolist(), "pred": pred.tolist(),
                     "conf": [round(float(c), 3) for c in predictions["confidence"][chosen]], **sprite}}


# ---------------------------------------------------------------------------------------------------
# Stimuli: per layer, and a page per channel


def _examples_of(out: VisualOutputs, layer: str, n_test: int) -> dict[int, tuple[list[int], list[float], float]]:
    """channel -> (its top test images, their activations, stimulus / best-image ratio), from the
    dataset-examples numbers in summary.json; entries that are not well-formed are left out."""
    entry = ((out.explanations.get("examples") or {}).get("layers") or {}).get(layer)
    if not isinstance(entry, dict):
        return {}
    found = {}
    rows = zip(entry.get("channels") or [], entry.get("top_indices") or [], entry.get("top_values") or [],
               entry.get("stimulus_ratio") or [])
    for c, idx, values, ratio in rows:
        if (isinstance(c, int) and isinstance(idx, list) and isinstance(values, list) and len(idx) == len(values)
                and all(isinstance(i, int) and 0 <= i < n_test for i in idx)
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            found[c] = (idx, [float(v) for v in values], ratio if isinstance(ratio, (int, float)) else None)
    return found


def stimuli_pages(stimuli, out: VisualOutputs, test_images, class_names: list[str]) -> tuple[list[dict], list[dict]]:
    """(one entry per layer: its tiles, each linking to its channel's page, and two sprites: the stimuli,
    and each channel's top test images in a row; the pages): the stimulus enlarged, its objective, and the
    test images that drive the channel most beside it."""
    layers, pages = [], []
    for li, s in enumerate(stimuli):
        is_classes = s.target.kind == "class"
        examples = _examples_of(out, s.target.name, len(test_images))
        tiles = []
        for j, c in enumerate(s.channels):
            name = class_names[c] if is_classes and c < len(class_names) else f"channel #{c}"
            tiles.append({"id": f"ch-{li}-{c}", "k": j, "label": name})
        ids = [t["id"] for t in tiles]
        per_row = max((len(idx) for idx, _, _ in examples.values()), default=0)
        layers.append({"name": s.target.name, "index": li, "tiles": tiles, "sprite": _sprite(s.images, 16, "PNG"),
                       "examples_sprite": _examples_sprite(s.channels, examples, per_row, test_images)})
        for j, (c, tile) in enumerate(zip(s.channels, tiles)):
            idx, values, ratio = examples.get(c, ([], [], None))
            pages.append({
                "id": tile["id"], "layer": s.target.name, "layer_index": li, "k": j, "label": tile["label"],
                "objective": float(s.objective[j]), "ratio": ratio,
                "objective_is": "the class logit" if is_classes else "the channel's mean activation",
                "prev": ids[j - 1] if j else None, "next": ids[j + 1] if j + 1 < len(ids) else None,
                "examples": [{"index": i, "value": v, "k": j * per_row + m}
                             for m, (i, v) in enumerate(zip(idx, values))]})
    return layers, pages


def _examples_sprite(channels, examples: dict, per_row: int, test_images) -> dict | None:
    """One sprite per layer, row j = channel j's top test images (black where a channel has fewer)."""
    if not per_row:
        return None
    rows = [examples.get(c, ([],))[0] for c in channels]
    slots = [i for idx in rows for i in idx + [-1] * (per_row - len(idx))]
    images = test_images[[max(i, 0) for i in slots]]  # a copy: indexing with a list
    images[[k for k, i in enumerate(slots) if i < 0]] = 0
    return _sprite(images, per_row)


CLASS_INTRO = (
    "Inputs that maximize each class logit, saved as 8-bit images and fed back through the net (re-normalized "
    "as in training): p is the probability it gives the class each was made for. The default method uses random "
    "jitter, scale and rotation, total-variation and L2 penalties and a color space decorrelated with CIFAR-10's "
    "own color covariance; the exercise method is the original notebook's 20 normalized gradient steps.")


def _visual_sections(out: VisualOutputs, layers: list[dict]) -> list[dict]:
    """Stimuli per layer (with links to the channel pages), class stimuli with probabilities, filters,
    activation maps, saliency/Grad-CAM."""
    files = out.files
    stimuli = []
    by_name = {layer["name"]: layer for layer in layers}
    for key, path in files.items():
        if key.startswith("stimuli_"):
            stimuli += [_text(key[len("stimuli_"):], "h3"), _figure(path, key.replace("_", " ", 1))]
            if key[len("stimuli_"):] in by_name:
                stimuli.append({"kind": "channels", "layer": by_name[key[len("stimuli_"):]]})
    classes = []
    for m in out.class_probabilities:
        classes += [_text(f"{m} method", "h3"), _figure(files.get(f"classes_{m}"), f"class stimuli, {m} method")]
    if "classes" in by_name:
        classes += [_text(f"Pages per class ({out.method} method)", "h3"),
                    {"kind": "channels", "layer": by_name["classes"]}]
    return [
        _section("stimuli", stimuli,
                 f"For every channel of every conv layer and residual block (after its activation), the input "
                 f"found by gradient ascent ({out.method} method) that maximizes the channel's mean activation; "
                 f"all channels of a layer optimized as one batch, {out.seconds:.1f} s for all layers and classes. "
                 "Click a stimulus below a layer's mosaic for its channel's page."),
        _section("classes", classes + [_probability_table(out.class_probabilities)], CLASS_INTRO),
        _section("filters", [_figure(files.get("filters"), "first-layer filters")]),
        _section("activations", [_figure(files.get("activations"), "activation maps")],
                 "What each conv layer's (or residual block's) channels respond to in one test image (after "
                 "the activation)."),
        _section("attributions", [_figure(files.get("attributions"), "saliency and Grad-CAM")],
                 "Top: test images with the prediction. Middle: saliency, the size of the gradient of the "
                 "predicted logit with respect to each pixel. Bottom: Grad-CAM on the layer the title names "
                 "(by default the last conv layer or residual block)."),
    ]


def _explanation_sections(out: VisualOutputs) -> list[dict]:
    """The two sections below, or a note in each when summary.json's numbers are not what visualize writes
    (a file anyone can edit: a missing key or a wrong type must not end the report in a traceback)."""
    try:
        return _explanation_sections_of(out)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        note = [_text(f"Not shown: the explanations in {Path(out.out_dir) / 'summary.json'} are malformed "
                      f"({type(e).__name__}: {e}); re-run cifarlab visualize.", "missing")]
        return [_section("explanations", note), _section("examples", note)]


def _explanation_sections_of(out: VisualOutputs) -> list[dict]:
    """Every attribution method's maps, their faithfulness and sanity numbers, dataset examples."""
    explained = out.explanations
    if not explained.get("enabled"):
        off = [_text("Not rendered (cifarlab visualize --no-explanations, or no test data).", "missing")]
        return [_section("explanations", off), _section("examples", off)]
    files = explained.get("files", {})
    faith = explained.get("faithfulness") or {}
    sanity = explained.get("sanity") or {}
    maps_seconds = (explained.get("maps") or {}).get("seconds", {})
    methods = list(explained["settings"]["methods"])
    rows, verdicts = [], []
    random = faith.get("random")
    for m in methods:
        f = (faith.get("methods") or {}).get(m)
        s = (sanity.get("methods") or {}).get(m)
        seconds = (maps_seconds.get(m, 0.0) + (f["seconds_maps"] + f["seconds_curves"] if f else 0.0)
                   + (s["seconds"] if s else 0.0))
        row = [m.replace("_", " ")]
        if f:
            gain_d, gain_i = f["vs_random"]["deletion"]["mean_gain"], f["vs_random"]["insertion"]["mean_gain"]
            row += [f"{f['deletion_auc']:.3f} ± {f['deletion_auc_sem']:.3f}",
                    f"{f['insertion_auc']:.3f} ± {f['insertion_auc_sem']:.3f}",
                    f"{random['deletion_auc']:.3f} / {random['insertion_auc']:.3f}",
                    f"{gain_d:+.3f} / {gain_i:+.3f}"]
            if not beats_random(f):  # worded per metric: which curve beats a random pixel order, which does not
                verdicts.append(f"{m.replace('_', ' ')} {faithfulness_verdict(f)} here (gain over a random pixel "
                                "order above two standard errors).")
        else:
            row += ["-"] * 4
        if s:
            row.append(f"{s['final']:.2f}" + (" (flagged)" if s["flagged"] else ""))
            if s["flagged"]:
                verdicts.append(f"{m.replace('_', ' ')} fails the sanity check: with every layer re-initialized its "
                                f"maps still correlate {s['final']:.2f} (Spearman) with the trained net's, so they "
                                "show the image more than what the net learned.")
        else:
            row.append("-")
        row.append(f"{seconds:.1f}")
        rows.append(row)
    table = _table(["method", "deletion AUC (lower better)", "insertion AUC (higher better)",
                    "random: deletion / insertion", "gain vs random: deletion / insertion",
                    "sanity: Spearman, all layers random", "seconds"], rows)
    ranked = sorted(((f["insertion_auc"] - f["deletion_auc"], m) for m, f in (faith.get("methods") or {}).items()),
                    reverse=True)
    if ranked:
        verdicts.insert(0, f"Most faithful here (insertion minus deletion AUC): {ranked[0][1].replace('_', ' ')} "
                           f"({ranked[0][0]:.3f}; random {random['insertion_auc'] - random['deletion_auc']:.3f}).")
    fs = faith.get("settings") or {}
    intro = ("The maps of every method for the predicted class on the same test images, the colour scale fixed "
             "across the images of each method. Faithfulness (Petsiuk et al. 2018): pixels removed (to the mean "
             "colour) or inserted (into a blurred copy) in the order of the map, explaining the true class; the "
             f"area under the true-class probability curve on {fs.get('n', 0)} test images, {fs.get('steps', 0)} "
             "steps, ± one standard error. Sanity check (Adebayo et al. 2018): Spearman correlation between the "
             f"maps of the trained net and of the net with every layer re-initialized, on {sanity.get('n', 0)} "
             f"images; above {sanity.get('threshold', 0.5)} is flagged. Seconds: maps, curves and sanity check.")
    body = ([_figure(files.get("attribution_methods"), "attribution maps of every method"), table]
            + [_text(v, "strong") for v in verdicts]
            + ([_figure(files.get("faithfulness"), "deletion and insertion curves")] if "faithfulness" in files else [])
            + ([_figure(files.get("sanity"), "cascading randomization")] if "sanity" in files else []))
    examples = explained.get("examples") or {}
    ex_rows = [[layer, len(e["channels"]), f"{e['median_ratio']:.2f}" if e["median_ratio"] is not None else "n/a",
                e["above_best_real"]] for layer, e in (examples.get("layers") or {}).items()]
    ex_body = []
    for key, path in files.items():
        if key.startswith("examples_"):
            ex_body += [_text(key[len("examples_"):], "h3"), _figure(path, key.replace("_", " ", 1))]
    if ex_rows:
        ex_body = [_table(["layer", "channels", "median ratio stimulus / best image", "channels above 1"],
                          ex_rows)] + ex_body
    else:
        ex_body = [_text("Not rendered (--example-images 0).", "missing")]
    ex_intro = (f"For every conv channel and every class: its maximum stimulus, then the {examples.get('k', 9)} test "
                f"images (of {examples.get('images', 0):,}) that activate it most (channel mean over space; the logit "
                "for a class). The number is the stimulus's activation over the best real image's: above 1, the "
                "stimulus drives the channel harder than any test image.")
    return [_section("explanations", body, intro), _section("examples", ex_body, ex_intro)]




def _model_sections(ckpt) -> list[dict]:
    recipe = ckpt.meta.get("recipe", {})
    recipe_block = (_table(["setting", "value"], [[k, v] for k, v in recipe.items()]) if recipe
                    else _text("No recipe stored in the checkpoint.", "missing"))
    return [_section("model", [_text(summary(ckpt.model), "pre")]), _section("recipe", [recipe_block])]


# ---------------------------------------------------------------------------------------------------
# The page


@dataclass
class ReportInputs:
    """Everything the page shows, gathered; :func:`page` turns it into HTML without reading anything."""

    run_dir: Path
    ckpt: object
    results: dict
    curves: Path | None
    confusion: dict | None
    feature_map: dict
    visual: VisualOutputs
    layers: list[dict]
    pages: list[dict]


def page(inputs: ReportInputs) -> str:
    from . import templates  # Jinja2: imported when a page is made, not by every cifarlab command

    ckpt, results = inputs.ckpt, inputs.results
    subtitle = (f"{ckpt.meta.get('architecture', {}).get('name', '')} \u00b7 test accuracy "
                f"{_pct(results['accuracy'])} \u00b7 generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    numbers = _numbers_sections(inputs.run_dir, ckpt, results, inputs.curves, inputs.confusion)
    feature_map = _section("map", [inputs.feature_map],
                           "Where the test images lie in the net's penultimate features (the input of its last "
                           "dense layer, L2-normalised), projected to two dimensions.")
    sections = (numbers + [feature_map] + _visual_sections(inputs.visual, inputs.layers)
                + _explanation_sections(inputs.visual) + _model_sections(ckpt))
    assert [s["id"] for s in sections] == [sid for sid, _ in SECTIONS]
    script, script_hash = templates.inline_script("report.js")
    return templates.render("report.html", title=f"cifarlab report: {inputs.run_dir.resolve().name}",
                            subtitle=subtitle, sections=sections, pages=inputs.pages,
                            layer_sprites=[layer["sprite"] for layer in inputs.layers],
                            example_sprites=[layer["examples_sprite"] for layer in inputs.layers],
                            script=script, script_hash=script_hash)


# ---------------------------------------------------------------------------------------------------
# Public API


def build_report(run_dir, ckpt=None, data=None, log=print, *, settings=None, seed: int | None = None,
                 images=None, explanations=None, map_method: str = "pca", map_points: int = MAP_POINTS,
                 cell_images: int = CELL_IMAGES) -> Path:
    """Write ``run_dir/report.html`` and return its path.

    ``ckpt`` defaults to the run's final (else newest good) checkpoint, ``data`` to the data the checkpoint
    names. ``settings``/``seed``/``images``/``explanations`` go to :func:`cifarlab.visualize.render_all`;
    ``map_method`` (``pca`` or ``umap``) and ``map_points`` shape the feature map, ``cell_images`` caps the
    images per confusion cell.
    """
    from . import visualize

    if map_method not in MAP_METHODS:
        raise ReportError(f"unknown map method {map_method!r}: use one of {', '.join(MAP_METHODS)}")
    run_dir = Path(run_dir)
    ckpt, data = _load_inputs(run_dir, ckpt, data, log)
    results, predictions = _results(run_dir, ckpt, data, log)
    curves = _curves(run_dir, ckpt)
    if seed is None:
        seed = int(ckpt.meta.get("recipe", {}).get("seed", 0))
    vis = visualize.render_all(ckpt, run_dir / "visualize", data=data, seed=seed, images=images,
                               settings=settings, log=log, explanations=explanations)
    visual = _visual_outputs(vis)
    layers, pages = stimuli_pages(vis.stimuli, visual, data.test.images, list(ckpt.meta["classes"]))
    inputs = ReportInputs(run_dir, ckpt, results, curves,
                          confusion_block(results["classes"], predictions, data.test.images, cell_images),
                          feature_map_block(ckpt, data, predictions, map_method, map_points, seed),
                          visual, layers, pages)
    path = run_dir / "report.html"
    atomic_write_text(path, page(inputs))
    return path
