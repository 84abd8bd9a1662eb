"""The jobs behind the CLI: evaluate a checkpoint into a folder of artifacts, and the whole ``run``.

Each function takes plain values and returns what it wrote, so a notebook can call them too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import plots
from .checkpoints import Checkpoint, check_input_shape
from .devices import resolve_device
from .data import Dataset
from .errors import CheckpointError
from .evaluate import TTA_LEVELS, Evaluation, accuracy_gap, checkpoint_tta, evaluate_model, tta_level
from .fsutil import atomic_write_bytes, atomic_write_json
from .temperature import checkpoint_temperature
from .transforms import Normalization


def check_compatible(ckpt: Checkpoint, data: Dataset, model_name: str | None = None) -> None:
    """A checkpoint must predict the dataset's classes (and be the architecture asked for, if any)."""
    classes = ckpt.meta.get("classes")
    if classes != list(data.classes):
        raise CheckpointError(f"{ckpt.path}: trained for classes {classes}, but the data has {list(data.classes)}.")
    name = ckpt.meta.get("architecture", {}).get("name")
    if model_name and name != model_name:
        raise CheckpointError(f"{ckpt.path}: holds architecture {name!r}, not the {model_name!r} asked for.")
    check_input_shape(ckpt, data.image_shape)


def evaluate_to_folder(ckpt: Checkpoint, data: Dataset, out_dir: str | Path, seed: int = 0,
                       gallery_size: int = 16, tta: int | None = None, device=None,
                       shifted: list[Dataset] = (), tta_below: float | None = None) -> tuple[Evaluation, dict]:
    """Test-set evaluation: results.json, confusion matrix (PNG + counts), per-class accuracy, galleries."""
    out_dir = Path(out_dir)
    if device:
        device = resolve_device(device)  # before the folder exists: a bad --device leaves no empty eval/
    check_compatible(ckpt, data)
    out_dir.mkdir(parents=True, exist_ok=True)
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    tta = checkpoint_tta(ckpt.meta, tta)
    model = ckpt.model.to(device) if device else ckpt.model
    ev = evaluate_model(model, data.test.images, data.test.labels, data.classes, normalization, tta=tta, device=device,
                        tta_below=tta_below)
    results = dict(ev.to_dict(), checkpoint=str(ckpt.path), architecture=ckpt.meta["architecture"]["name"],
                   tta=tta, tta_below=tta_below, epoch=ckpt.meta.get("epoch"),
                   weights_sha256=ckpt.meta.get("weights_sha256"))
    rng = np.random.default_rng(seed)
    random_idx = rng.choice(len(ev.labels), size=min(gallery_size, len(ev.labels)), replace=False)
    worst_idx = ev.worst_mistakes(gallery_size)
    results["gallery_indices"] = random_idx.tolist()
    results["dataset"] = data.spec or data.name
    results["shift"] = [dict(accuracy_gap(ev, _evaluate_on(ckpt, other, normalization, tta, device)),
                             dataset=other.spec or other.name) for other in shifted]
    results["calibration"], reliability = calibration_results(ev, ckpt.meta, out_dir / "reliability.png")
    ev = ev.tempered(checkpoint_temperature(ckpt.meta))  # galleries' scores = predict's calibrated probabilities
    results["scores"] = ("softmax(logits / T), T = %.4f (the run's temperature)" % ev.temperature
                         if ev.temperature else "softmax(logits): the run has no temperature")
    results["worst_mistakes"] = [
        {"index": int(i), "true": data.classes[ev.labels[i]], "predicted": data.classes[ev.predictions[i]],
         "score": float(ev.probabilities[i, ev.predictions[i]])} for i in worst_idx]
    files = {
        "results": out_dir / "results.json",
        "confusion_matrix": plots.confusion_matrix_plot(ev.confusion, data.classes, out_dir / "confusion_matrix.png"),
        "per_class_accuracy": plots.per_class_accuracy_plot(ev.per_class_accuracy, out_dir / "per_class_accuracy.png"),
        "gallery": plots.prediction_gallery(data.test.images, ev, random_idx, out_dir / "gallery.png",
                                            "Random test images: prediction / score / truth"),
        "worst_mistakes": plots.prediction_gallery(data.test.images, ev, worst_idx, out_dir / "worst_mistakes.png",
                                                   "Most confident mistakes"),
        "reliability": reliability,
    }
    files["predictions"] = save_predictions(out_dir / PREDICTIONS_FILE, ev)
    atomic_write_json(out_dir / "confusion_matrix.json", {"classes": list(data.classes),
                                                          "rows": "true class", "columns": "predicted class",
                                                          "counts": ev.confusion.tolist()})
    atomic_write_json(files["results"], results)
    return ev, {k: str(v) for k, v in files.items()}


PREDICTIONS_FILE = "predictions.safetensors"
PREDICTIONS_FORMAT = "cifarlab-predictions-1"
MAX_PREDICTION_IMAGES = 10 ** 8


def save_predictions(path: Path, ev: Evaluation) -> Path:
    """Per test image, its true and predicted class and the predicted class's probability (what the
    report's confusion-cell galleries and feature map show): safetensors, written atomically."""
    from safetensors.torch import save

    tensors = {"labels": torch.from_numpy(np.asarray(ev.labels, np.int64)),
               "predicted": torch.from_numpy(np.asarray(ev.predictions, np.int64)),
               "confidence": torch.from_numpy(np.clip(ev.probabilities.max(1), 0, 1).astype(np.float32))}
    meta = {"format": PREDICTIONS_FORMAT, "classes": str(len(ev.classes))}
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    return path


def load_predictions(path: Path, num_classes: int, num_images: int) -> dict[str, np.ndarray]:
    """:func:`save_predictions`'s file read back: a regular file of a bounded size, then keys, dtypes,
    shapes (``num_images`` each), classes in range and probabilities in 0..1; a one-line
    ValidationError naming the file otherwise."""
    from .checkpoints import read_safetensors
    from .validation import ValidationError

    if not 0 <= num_images <= MAX_PREDICTION_IMAGES:
        raise ValidationError(f"{path}: {num_images} test images is out of bounds")
    tensors, meta = read_safetensors(path, 20 * num_images + 4096)  # 8 + 8 + 4 bytes per image + header
    if meta.get("format") != PREDICTIONS_FORMAT or meta.get("classes") != str(num_classes):
        raise ValidationError(f"{path}: not {PREDICTIONS_FORMAT} for {num_classes} classes; re-run cifarlab evaluate")
    expected = {"labels": torch.int64, "predicted": torch.int64, "confidence": torch.float32}
    if set(tensors) != set(expected):
        raise ValidationError(f"{path}: holds {sorted(tensors)}, expected {sorted(expected)}; re-run cifarlab evaluate")
    for name, dtype in expected.items():
        t = tensors[name]
        if t.dtype != dtype or t.shape != (num_images,):
            raise ValidationError(f"{path}: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} ({num_images},); "
                                  "re-run cifarlab evaluate")
    for name in ("labels", "predicted"):
        if num_images and not (0 <= int(tensors[name].min()) and int(tensors[name].max()) < num_classes):
            raise ValidationError(f"{path}: {name} outside 0..{num_classes - 1}; re-run cifarlab evaluate")
    conf = tensors["confidence"]
    if num_images and not (torch.isfinite(conf).all() and 0 <= float(conf.min()) and float(conf.max()) <= 1):
        raise ValidationError(f"{path}: confidence outside 0..1; re-run cifarlab evaluate")
    return {name: t.numpy() for name, t in tensors.items()}


def calibration_results(ev: Evaluation, meta: dict, png: Path) -> tuple[dict, Path]:
    """ECE (15 equal-width bins), MCE, NLL and Brier on the test set, before and (when the checkpoint
    stores a temperature, fitted on held-out training images) after temperature scaling; the reliability
    diagram(s) as one PNG."""
    from .calibration import calibration_metrics, reliability_bins, reliability_diagram
    from .temperature import checkpoint_temperature

    t = checkpoint_temperature(meta)
    out = {"n_bins": 15, "evaluated_on": "test set", "before": calibration_metrics(ev.logits, ev.labels),
           "reliability_before": reliability_bins(ev.logits, ev.labels).to_dict(), "temperature": t}
    bins, titles = [reliability_bins(ev.logits, ev.labels)], ["before temperature scaling" if t else "softmax"]
    if t is not None:
        stored = meta["calibration"]
        out["after"] = calibration_metrics(ev.logits, ev.labels, temperature=t)
        out["reliability_after"] = reliability_bins(ev.logits, ev.labels, temperature=t).to_dict()
        out["fitted_on"] = stored.get("fitted_on")
        out["fit"] = {k: v for k, v in stored.items() if k not in ("temperature", "fitted_on")}
        bins.append(reliability_bins(ev.logits, ev.labels, temperature=t))
        titles.append(f"after T = {t:.2f}")
    else:
        out["fitted_on"] = None
        out["note"] = "no temperature in the checkpoint: train with --val-split N, or run cifarlab calibrate RUN"
    return out, reliability_diagram(bins, png, titles)


def _evaluate_on(ckpt: Checkpoint, data: Dataset, normalization: Normalization, tta: int, device) -> Evaluation:
    """The checkpoint on another test set of the same classes (distribution shift)."""
    check_compatible(ckpt, data)
    model = ckpt.model.to(device) if device else ckpt.model
    return evaluate_model(model, data.test.images, data.test.labels, data.classes, normalization, tta=tta,
                          device=device)


def results_summary(results: dict) -> str:
    tta = tta_level(results.get("tta"))
    lines = [f"Test accuracy: {100 * results['accuracy']:.2f}% on {results['num_images']:,} images"
             + (f" ({TTA_LEVELS[tta]}" + (f", only below p = {results['tta_below']:g}"
                                            if results.get("tta_below") is not None else "") + ")" if tta else ""),
             "Per-class accuracy:"]
    if len(results["per_class_accuracy"]) <= 20:
        lines += [f"  {name:<12}{100 * acc:6.2f}%" for name, acc in results["per_class_accuracy"].items()]
    else:  # 100 classes: the spread, and where it fails
        ranked = sorted(results["per_class_accuracy"].items(), key=lambda kv: kv[1])
        lines += ["  worst: " + ", ".join(f"{n} {100 * a:.1f}%" for n, a in ranked[:5]),
                  "  best:  " + ", ".join(f"{n} {100 * a:.1f}%" for n, a in ranked[-5:])]
    cal = results.get("calibration")
    if cal:
        b, a = cal["before"], cal.get("after")
        arrow = (lambda k, f: f"{f(b[k])} -> {f(a[k])}") if a else (lambda k, f: f(b[k]))  # noqa: E731
        pct, num = (lambda v: f"{100 * v:.2f}%"), (lambda v: f"{v:.4f}")  # noqa: E731
        lines.append(f"Calibration ({cal['n_bins']} bins): ECE {arrow('ece', pct)}, NLL {arrow('nll', num)}, "
                     f"Brier {arrow('brier', num)}"
                     + (f" (temperature {cal['temperature']:.3f}, fitted on {cal['fitted_on']})" if a
                        else " (no temperature: train with --val-split N or run cifarlab calibrate)"))
    for s in results.get("shift", []):
        lo, hi = s["accuracy_ci95"]
        glo, ghi = s["gap_ci95"]
        lines.append(f"On {s['dataset']}: {100 * s['accuracy']:.2f}% of {s['num_images']:,} images (95% CI "
                     f"{100 * lo:.1f}-{100 * hi:.1f}); gap to the test set {100 * s['gap']:+.2f} points "
                     f"(95% CI {100 * glo:+.1f} to {100 * ghi:+.1f})")
    return "\n".join(lines)
