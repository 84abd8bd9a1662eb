"""Temperature scaling for a run: fit one temperature on its held-out *training* images, store it in the
checkpoint, and read it back wherever probabilities are made.

The temperature is never fitted on the test set: the images are the run's ``--val-split`` hold-out,
rebuilt exactly as training built it (``holdout_split(train, recipe.val_split, seed=recipe.seed)`` of
the same training images). The checkpoint's meta gets::

    "calibration": {"temperature": T, "fitted_on": "N held-out training images", "images": N,
                    "tta": level, "nll_before", "nll_after", "ece_before", "ece_after", "at_bound"}

(NLL and ECE on that held-out set.) Dividing logits by T > 0 never changes their argmax, so accuracy
is unchanged; only the probabilities (``softmax(logits / T)``) move.
"""
from __future__ import annotations

import torch

from .calibration import fit_temperature
from .errors import CifarlabError


class CalibrationError(CifarlabError):
    """A run that cannot be calibrated (no held-out split, data that does not match)."""


def checkpoint_temperature(meta: dict) -> float | None:
    """The temperature a checkpoint stores, or None (probabilities are then the plain softmax)."""
    t = (meta.get("calibration") or {}).get("temperature")
    return float(t) if t is not None else None


def probabilities(logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """softmax(logits / T) in float64 (T = 1 when None)."""
    return torch.softmax(logits.double() / (temperature or 1.0), dim=1)


def fit_on_logits(logits: torch.Tensor, labels: torch.Tensor, tta: int = 0) -> dict:
    """The checkpoint-meta entry for held-out ``logits``/``labels`` (see the module docstring)."""
    fit = fit_temperature(logits, labels)
    n = int(len(labels))
    return {"temperature": fit.temperature, "fitted_on": f"{n} held-out training images", "images": n, "tta": tta,
            "nll_before": fit.before["nll"], "nll_after": fit.after["nll"],
            "ece_before": fit.before["ece"], "ece_after": fit.after["ece"],
            "brier_before": fit.before["brier"], "brier_after": fit.after["brier"],
            "accuracy": fit.before["accuracy"], "at_bound": fit.at_bound, "n_bins": fit.before["n_bins"]}


def holdout_of(ckpt, data):
    """The run's held-out training images, rebuilt from its stored recipe (val_split, seed) and dataset
    identity (a ``--train-subset`` of the first N images is applied first, as training did)."""
    from .data import holdout_split

    recipe = ckpt.meta.get("recipe") or {}
    n_val = int(recipe.get("val_split") or 0)
    if n_val <= 0:
        raise CalibrationError(f"{ckpt.path}: this run has no held-out training images to fit a temperature on "
                               "(the test set is never used for that): train with --val-split N (e.g. 5000)")
    train = trained_on(ckpt, data).train
    stored = (ckpt.meta.get("dataset") or {}).get("train_images")
    if stored is not None and int(stored) != len(train):
        raise CalibrationError(f"{ckpt.path}: trained on {stored} training images, but the data has {len(train)}: "
                               "the held-out split cannot be rebuilt (pass the run's own --dataset/--data-dir)")
    if not 0 < n_val < len(train):
        raise CalibrationError(f"{ckpt.path}: val_split {n_val} does not fit {len(train)} training images")
    _, held_out = holdout_split(train, n_val, seed=int(recipe.get("seed", 0)))
    return held_out


def trained_on(ckpt, data):
    """``data`` as the run saw it: with its ``--train-subset`` (the first N training images) applied."""
    subset = ((ckpt.meta.get("dataset") or {}).get("identity") or {}).get("train_subset")
    if not subset:
        return data
    words = str(subset).split()
    if len(words) != 2 or words[0] != "first" or not words[1].isdigit() or int(words[1]) > len(data.train):
        raise CalibrationError(f"{ckpt.path}: trained on a training subset this command cannot rebuild from this "
                               f"data ({subset!r})")
    return data.with_train(data.train.subset(slice(0, int(words[1]))), subset)


def check_same_data(ckpt, data) -> None:
    """The data must be what the run trained on, by content (the checks a resume makes: classes, image
    size, checksums of the images): a temperature fitted on other pictures would be stored as the run's."""
    from .rundir import data_identity, identity_differences

    differences = identity_differences(ckpt.meta.get("data_identity"), data_identity(trained_on(ckpt, data)))
    if differences:
        raise CalibrationError(f"{ckpt.path}: the data is not what this run trained on: " + "; ".join(differences)
                               + ". Calibrate with the run's own data (its photos unchanged, or "
                                 "--dataset/--data-dir naming an identical copy).")


def calibrate_checkpoint(ckpt, data, device=None, tta: int | None = None) -> dict:
    """Fit T on the run's held-out images and re-save ``ckpt`` (atomically, same folder) with it in its
    meta. Returns the calibration entry."""
    from .checkpoints import STATE_FILE, check_input_shape, save_checkpoint
    from .evaluate import checkpoint_tta, predict_logits
    from .transforms import Normalization

    folder = ckpt.path
    if not folder.is_dir() or (folder / STATE_FILE).exists():
        raise CalibrationError(f"{ckpt.path}: only a finished run's checkpoint folder (RUN/final) is re-saved "
                               "with a temperature; pass the run folder after training has finished")
    if ckpt.meta.get("classes") != list(data.classes):
        raise CalibrationError(f"{ckpt.path}: trained for classes {ckpt.meta.get('classes')}, but the data has "
                               f"{list(data.classes)}")
    check_input_shape(ckpt, data.image_shape)
    held_out = holdout_of(ckpt, data)  # first: no hold-out at all, or another number of images, says so plainly
    check_same_data(ckpt, data)
    tta = checkpoint_tta(ckpt.meta, tta)
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    model = ckpt.model.to(device) if device else ckpt.model
    logits = predict_logits(model, held_out.images, normalization, device=device, tta=tta)
    entry = fit_on_logits(logits, held_out.labels, tta)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "weights_sha256", "versions")}
    meta["calibration"] = entry
    save_checkpoint(folder, ckpt.model.cpu(), meta)
    ckpt.meta["calibration"] = entry
    return entry
