"""Model + images -> predictions and metrics (accuracy, per-class accuracy, confusion matrix)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .precision import autocast, resolve_precision
from .transforms import Normalization

TTA_LEVELS = {0: "no TTA", 1: "flip TTA", 2: "flip + translate TTA"}


def tta_level(value) -> int:
    """None/False -> 0, True -> 1, or the level itself (0, 1, 2); a recipe or CLI value in, an int out."""
    level = int(value or 0)
    if level not in TTA_LEVELS:
        raise ValueError(f"TTA level must be 0 (none), 1 (flip) or 2 (flip + translate), not {value!r}")
    return level


def checkpoint_tta(meta: dict, override=None) -> int:
    """The TTA level to evaluate a checkpoint with: ``override`` if given, else its recipe's level."""
    return tta_level(meta.get("recipe", {}).get("tta", 0) if override is None else override)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, normalization: Normalization,
                   batch_size: int = 128, device: torch.device | str | None = None,
                   tta: int = 0, channels_last: bool | None = None, precision: str = "auto",
                   tta_below: float | None = None) -> torch.Tensor:
    """Logits (float32, CPU) for uint8 images (N, C, H, W), in eval mode, in batches.

    ``precision``: as in :mod:`cifarlab.precision` ("auto": bf16 on CUDA, fp32 on a CPU).

    ``tta`` (test-time augmentation): 0 none; 1 (or True) the mean of the logits of each image and its
    mirror; 2 airbench's: half that, half the mirror-averaged logits of the image shifted one pixel
    up-left and down-right (reflect padding), six passes per image.
    Batches of 128 keep activations in cache: about 2x the throughput of batches of 1,000 on a 2-core CPU
    (measured for the exercise and fast nets).

    ``tta_below`` (selective TTA, from the 2025 CIFAR-10 speedrun record, hiverge/cifar10-speedrun): one
    plain pass for every image, then the ``tta`` passes only for the images whose top softmax probability
    is below this value; confident images keep their plain logits. None (default): TTA for every image.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(getattr(model, "declaration", None), dict):  # refused with the number, before the first batch
        from .memory import check_fits

        check_fits(model.declaration, max(1, min(batch_size, len(images))), device, training=False)
    context = autocast(device, resolve_precision(precision, device, training=False))
    was_training = model.training
    model.eval()
    if channels_last is None:
        channels_last = device.type == "cpu"
    outputs = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalization(images[start:start + batch_size].to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with context:
                logits = _tta_logits(model, x, tta_level(tta)) if tta_below is None \
                    else _selective_tta_logits(model, x, tta_level(tta), tta_below)
            outputs.append(logits.cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, _num_outputs(model))


def _tta_logits(model: torch.nn.Module, x: torch.Tensor, level: int, plain: torch.Tensor | None = None) -> torch.Tensor:
    """``plain``: ``model(x)`` if already computed (selective TTA), so it is not computed twice."""
    plain = model(x).float() if plain is None else plain
    if level <= 0:
        return plain
    mirrored = 0.5 * (plain + model(x.flip(3)).float())
    if level == 1:
        return mirrored
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[2:]
    shifted = [_tta_logits(model, padded[:, :, dy:dy + h, dx:dx + w], 1) for dy, dx in ((0, 0), (2, 2))]
    return 0.5 * mirrored + 0.25 * (shifted[0] + shifted[1])


def _selective_tta_logits(model: torch.nn.Module, x: torch.Tensor, level: int, below: float) -> torch.Tensor:
    """Plain logits; the TTA logits of ``level`` for the rows whose top softmax probability < ``below``."""
    logits = model(x).float()
    if level <= 0:
        return logits
    unsure = torch.softmax(logits, 1).amax(1) < below
    if bool(unsure.any()):
        logits[unsure] = _tta_logits(model, x[unsure], level, plain=logits[unsure])
    return logits


def _num_outputs(model: torch.nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features if linears else 0


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """counts[true, predicted]."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes,
                                                                                                num_classes)


@dataclass
class Evaluation:
    classes: list[str]
    labels: np.ndarray          # (N,) true labels
    logits: np.ndarray          # (N, number of classes)
    temperature: float | None = None  # the run's fitted T: probabilities are softmax(logits / T), as predict's
    probabilities: np.ndarray = field(init=False)
    predictions: np.ndarray = field(init=False)

    def __post_init__(self):
        t = self.temperature if self.temperature else 1.0
        self.probabilities = torch.softmax(torch.from_numpy(self.logits) / t, 1).numpy()
        self.predictions = self.probabilities.argmax(1)  # the same with or without T (argmax is unchanged)

    def tempered(self, temperature: float | None) -> "Evaluation":
        """The same logits with probabilities of ``softmax(logits / T)``: what galleries and scores show, so
        they agree with ``predict``; accuracy, loss and calibration still read the logits."""
        return Evaluation(self.classes, self.labels, self.logits, temperature)

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).mean())

    @property
    def loss(self) -> float:
        logp = torch.log_softmax(torch.from_numpy(self.logits), 1)
        return float(-logp[torch.arange(len(self.labels)), torch.from_numpy(self.labels)].mean())

    @property
    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.labels, self.predictions, len(self.classes))

    @property
    def per_class_accuracy(self) -> dict[str, float]:
        cm = self.confusion
        return {c: float(cm[i, i] / max(cm[i].sum(), 1)) for i, c in enumerate(self.classes)}

    @property
    def per_class_quality(self) -> dict[str, dict]:
        """Per class: precision (of the images predicted as it, the share that are it), recall (= its
        accuracy), F1 (their harmonic mean; 0 when both are 0) and support (its test images)."""
        cm = self.confusion.astype(np.float64)
        tp, predicted, actual = np.diag(cm), cm.sum(0), cm.sum(1)
        out = {}
        for i, c in enumerate(self.classes):
            precision = tp[i] / predicted[i] if predicted[i] else 0.0
            recall = tp[i] / actual[i] if actual[i] else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out[c] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                      "support": int(actual[i])}
        return out

    def most_confused(self, k: int = 10) -> list[dict]:
        """The k (true, predicted) pairs of different classes with the most images (fastai's most_confused)."""
        cm = self.confusion.copy()
        np.fill_diagonal(cm, 0)
        flat = np.argsort(-cm, axis=None, kind="stable")[:k]
        pairs = [np.unravel_index(i, cm.shape) for i in flat]
        return [{"true": self.classes[t], "predicted": self.classes[p], "count": int(cm[t, p])}
                for t, p in pairs if cm[t, p] > 0]

    def worst_mistakes(self, k: int = 16) -> np.ndarray:
        """Indices of the wrong predictions made with the highest confidence."""
        wrong = np.flatnonzero(self.predictions != self.labels)
        confidence = self.probabilities[wrong, self.predictions[wrong]]
        return wrong[np.argsort(-confidence, kind="stable")[:k]]

    def to_dict(self) -> dict:
        return {
            "num_images": int(len(self.labels)),
            "accuracy": self.accuracy,
            "loss": self.loss,
            "per_class_accuracy": self.per_class_accuracy,
            "classes": list(self.classes),
            "confusion_matrix": self.confusion.tolist(),
            "confusion_matrix_axes": "rows: true class, columns: predicted class",
            "per_class": self.per_class_quality,
            "macro_f1": float(np.mean([q["f1"] for q in self.per_class_quality.values()])) if self.classes else 0.0,
            "most_confused": self.most_confused(),
        }


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy (better than p +- 1.96 sd near 0 or 1 and for small n)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_gap(base: "Evaluation", shifted: "Evaluation", z: float = 1.959964) -> dict:
    """Accuracy on a shifted test set next to the original's: each with its 95% Wilson interval, and the gap
    (original - shifted) with a 95% normal-approximation interval for two independent samples."""
    def side(ev):
        n, k = len(ev.labels), int((ev.predictions == ev.labels).sum())
        return n, k / max(n, 1), wilson_interval(k, n, z)

    n1, p1, ci1 = side(base)
    n2, p2, ci2 = side(shifted)
    sd = math.sqrt(p1 * (1 - p1) / max(n1, 1) + p2 * (1 - p2) / max(n2, 1))
    gap = p1 - p2
    return {"accuracy": p2, "accuracy_ci95": list(ci2), "num_images": n2, "reference_accuracy": p1,
            "reference_ci95": list(ci1), "reference_images": n1, "gap": gap,
            "gap_ci95": [gap - z * sd, gap + z * sd]}


def evaluate_model(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                   normalization: Normalization, tta: int = 0, device=None,
                   batch_size: int = 128, tta_below: float | None = None) -> Evaluation:
    logits = predict_logits(model, images, normalization, batch_size=batch_size, device=device, tta=tta,
                            tta_below=tta_below)
    return Evaluation(classes=list(classes), labels=labels.cpu().numpy(), logits=logits.numpy())
