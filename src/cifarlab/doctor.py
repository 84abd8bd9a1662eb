"""The training doctor: a plain-language diagnosis of a run's curves (the per-epoch history).

THE RULE. A validation accuracy measured on n images is a binomial proportion: its standard error is
se = sqrt(p (1 - p) / n). A statement about accuracies (a drop, a gain, a train-validation gap) is made only
when the difference exceeds two such standard errors, threshold = 2 se, with p the validation accuracy the
statement is about: for two validation accuracies compared, their mean; for the train-validation gap, the
validation accuracy. p is clipped to [1/(2n), 1 - 1/(2n)], so a perfect (or zero) accuracy still carries the
uncertainty of about half an image and the threshold is never 0. The rule is a rough gate, not a test: it
keeps the doctor quiet about differences that a different draw of n validation images would undo, which
is most of what a small --val-split shows. Every finding states the numbers that triggered it and its
threshold.

The findings, checked on the epochs that have a validation accuracy (rows of non-main ranks have none):

- lr_too_high: (a) a training or validation loss is NaN or infinite (diverged; nothing else is judged,
  the curves after it mean nothing), or (b) after 3 or more epochs the final training loss is no lower than
  epoch 1's and the validation accuracy is not above epoch 1's by more than 2 se: no progress at all, the
  signature of steps that overshoot. (A too-low lr still makes slow progress.)
- overfitting: (a) the best validation accuracy came before the last epoch and the last is below it by
  more than 2 se, or (b) the final training accuracy is above the validation accuracy by more than 2 se,
  AND the validation loss rose more than 10% above its minimum while the training loss kept falling
  after that minimum: the net fits its training images better and its held-out ones worse. A gap alone is
  normal (every net fits what it trains on better), hence the loss condition.
- underfitting: the final training accuracy is below 90%, not above the validation accuracy by more than
  2 se (no gap: the net does not even fit its training images), and the last epoch did not improve the
  validation accuracy by more than 2 se over the earlier best (a plateau, else it is still_improving).
  Not reported with lr_too_high, whose remedy differs.
- still_improving: the last epoch's validation accuracy is above the best of the earlier epochs by more
  than 2 se: more epochs would probably help.
- unstable: the validation accuracy dropped by more than 2 se between consecutive epochs at least twice
  (one drop can be the start of over-fitting), or the training loss, an average over a whole epoch and
  so smooth, rose more than 5% from one epoch to the next.

MixUp and CutMix (``mixed_batches=True``): the training accuracy is measured on blended batches whose
labels are mixed, so it is lower than the net's real fit and not comparable with validation. Then the
train-validation gap is not used (over-fitting is judged on the validation curve alone, and the text says
so) and under-fitting, which needs that gap, is not judged. Label smoothing alone does not need the flag:
training accuracy is still counted against the true labels and only the training loss's own trend is used.

Short histories (fewer than 2 epochs with a validation accuracy) give one ``too_short`` finding; when
nothing fires the single finding is ``healthy``, with the threshold that was applied.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

TRAIN_ACC_LOW = 0.90  # underfitting: below this final training accuracy the net does not fit its data
VAL_LOSS_RISE = 0.10  # overfitting (b): relative rise of the validation loss above its minimum
TRAIN_LOSS_RISE = 0.05  # unstable: relative rise of the epoch-averaged training loss

OVERFIT_REMEDY = ("Try more augmentation (--flip, --translate 2, --cutout 8, --mixup 0.2 or --cutmix 1.0), more "
                  "--weight-decay, weight averaging (--ema 0.999), or keep the best epoch with --early-stop 3 "
                  "(needs --val-split).")
UNDERFIT_REMEDY = ("Try a bigger model, more --epochs, a higher --lr (cifarlab lr-find suggests one), or less "
                   "regularization (lower --weight-decay, less augmentation, no --mixup/--cutmix).")
LR_REMEDY = "Lower --lr (cifarlab lr-find suggests one) or add a warm-up (--warmup with --schedule onecycle)."
UNSTABLE_REMEDY = ("Try a lower --lr (cifarlab lr-find), a warm-up (--warmup with --schedule onecycle), a "
                   "larger --batch-size, or weight averaging (--ema 0.999).")


@dataclass
class Finding:
    kind: str  # overfitting, underfitting, still_improving, unstable, lr_too_high, healthy, too_short
    text: str
    numbers: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def threshold(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy p measured on n images (p clipped: never 0)."""
    p = min(max(p, 0.5 / n), 1 - 0.5 / n)
    return 2 * math.sqrt(p * (1 - p) / n)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _pts(v: float) -> str:
    return f"{100 * v:.2f} points"


def _two_se(thr: float, n: int) -> str:
    return f"2 standard errors ({_pts(thr)}, n = {n:,})"


def _number(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _finite(row: dict, key: str) -> float | None:
    v = _number(row, key)
    return v if v is not None and math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------------
# The findings: each returns a Finding or None; ``val`` is the rows that have a validation accuracy.


def _diverged(history: list[dict]) -> Finding | None:
    for i, row in enumerate(history):
        for key in ("train_loss", "val_loss"):
            v = _number(row, key)
            if v is not None and not math.isfinite(v):
                epoch = row.get("epoch", i + 1)
                name = "training" if key == "train_loss" else "validation"
                return Finding("lr_too_high", f"Diverged: the {name} loss is {v} at epoch {epoch}; "
                               f"the curves after it mean nothing. {LR_REMEDY}",
                               {"epoch": epoch, key: str(v)})  # a string: NaN is not JSON, and meta is
    return None


def _no_progress(val: list[dict], n: int) -> Finding | None:
    first, last = val[0], val[-1]
    if len(val) < 3 or first["train_loss"] is None or last["train_loss"] is None:
        return None
    gain = last["val_acc"] - first["val_acc"]
    thr = threshold((first["val_acc"] + last["val_acc"]) / 2, n)
    if last["train_loss"] < first["train_loss"] or gain > thr:
        return None
    text = (f"Learning rate probably too high: the training loss {last['train_loss']:.4f} at epoch {last['epoch']} "
            f"is no lower than at epoch {first['epoch']} ({first['train_loss']:.4f}), and validation accuracy "
            f"{_pct(last['val_acc'])} is not above epoch {first['epoch']}'s {_pct(first['val_acc'])} by more than "
            f"{_two_se(thr, n)}: training made no progress (or the data or labels are broken). "
            + LR_REMEDY)
    return Finding("lr_too_high", text, {"first_train_loss": first["train_loss"], "last_train_loss": last["train_loss"],
                                         "first_val_acc": first["val_acc"], "last_val_acc": last["val_acc"],
                                         "threshold": thr, "n": n})


def _peak_drop(val: list[dict], n: int) -> tuple[str, dict] | None:
    """Over-fitting's validation-curve half: the last epoch clearly below the best one."""
    best = max(val, key=lambda r: r["val_acc"])  # the first of equal maxima
    last = val[-1]
    thr = threshold((best["val_acc"] + last["val_acc"]) / 2, n)
    drop = best["val_acc"] - last["val_acc"]
    if best is last or drop <= thr:
        return None
    return (f"validation accuracy peaked at epoch {best['epoch']} ({_pct(best['val_acc'])}) then fell to "
            f"{_pct(last['val_acc'])} at epoch {last['epoch']}: {_pts(drop)} lower, more than {_two_se(thr, n)}",
            {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "last_val_acc": last["val_acc"],
             "drop": drop, "drop_threshold": thr})


def _gap_and_loss(val: list[dict], n: int) -> tuple[str, dict] | None:
    """Over-fitting's train-validation half: a clear gap while validation loss rises and training loss falls."""
    last = val[-1]
    losses = [r for r in val if r["val_loss"] is not None and r["train_loss"] is not None]
    if last["train_acc"] is None or len(losses) < 2 or losses[-1] is not last:
        return None
    gap = last["train_acc"] - last["val_acc"]
    thr = threshold(last["val_acc"], n)
    low = min(losses, key=lambda r: r["val_loss"])
    rise = (last["val_loss"] - low["val_loss"]) / max(low["val_loss"], 1e-12)
    if gap <= thr or rise <= VAL_LOSS_RISE or last["train_loss"] >= low["train_loss"]:
        return None
    return (f"training accuracy {_pct(last['train_acc'])} is {_pts(gap)} above validation {_pct(last['val_acc'])}, "
            f"more than {_two_se(thr, n)}, and validation loss rose from {low['val_loss']:.4f} at epoch "
            f"{low['epoch']} to {last['val_loss']:.4f} (+{100 * rise:.0f}%) while training loss fell from "
            f"{low['train_loss']:.4f} to {last['train_loss']:.4f}",
            {"train_acc": last["train_acc"], "val_acc": last["val_acc"], "gap": gap, "gap_threshold": thr,
             "val_loss_min": low["val_loss"], "val_loss_min_epoch": low["epoch"], "val_loss": last["val_loss"]})


def _overfitting(val: list[dict], n: int, mixed_batches: bool) -> Finding | None:
    seen = [s for s in (_peak_drop(val, n), None if mixed_batches else _gap_and_loss(val, n)) if s]
    if not seen:
        return None
    numbers = {"n": n, **{k: v for _, nums in seen for k, v in nums.items()}}
    note = (" (MixUp/CutMix: training accuracy is measured on mixed batches, so the train-validation gap is not "
            "used; judged on the validation curve alone)" if mixed_batches else "")
    text = "Over-fitting: " + "; and ".join(t for t, _ in seen) + note + ". " + OVERFIT_REMEDY
    return Finding("overfitting", text, numbers)


def _last_gain(val: list[dict], n: int) -> tuple[float, float, dict]:
    """(gain, threshold, best earlier row): the last epoch's validation accuracy over the earlier best."""
    earlier = max(val[:-1], key=lambda r: r["val_acc"])
    last = val[-1]
    return last["val_acc"] - earlier["val_acc"], threshold((earlier["val_acc"] + last["val_acc"]) / 2, n), earlier


def _still_improving(val: list[dict], n: int) -> Finding | None:
    gain, thr, earlier = _last_gain(val, n)
    if gain <= thr:
        return None
    last = val[-1]
    text = (f"Still improving: validation accuracy {_pct(last['val_acc'])} at epoch {last['epoch']} is {_pts(gain)} "
            f"above the best earlier epoch ({_pct(earlier['val_acc'])}, epoch {earlier['epoch']}), more than "
            f"{_two_se(thr, n)}: more --epochs would probably help.")
    return Finding("still_improving", text, {"val_acc": last["val_acc"], "earlier_best": earlier["val_acc"],
                                             "earlier_best_epoch": earlier["epoch"], "gain": gain,
                                             "threshold": thr, "n": n})


def _underfitting(val: list[dict], n: int) -> Finding | None:
    last = val[-1]
    if last["train_acc"] is None:
        return None
    gap = last["train_acc"] - last["val_acc"]
    gap_thr = threshold(last["val_acc"], n)
    gain, gain_thr, _ = _last_gain(val, n)
    if last["train_acc"] >= TRAIN_ACC_LOW or gap > gap_thr or gain > gain_thr:
        return None
    text = (f"Under-fitting: training accuracy {_pct(last['train_acc'])} is below {100 * TRAIN_ACC_LOW:.0f}% and "
            f"not above validation {_pct(last['val_acc'])} by more than {_two_se(gap_thr, n)}, and the last epoch "
            f"changed validation accuracy by only {100 * gain:+.2f} points over the earlier best (2 standard errors: "
            f"{_pts(gain_thr)}): the net does not fit even its training images. " + UNDERFIT_REMEDY)
    return Finding("underfitting", text, {"train_acc": last["train_acc"], "val_acc": last["val_acc"], "gap": gap,
                                          "gap_threshold": gap_thr, "gain": gain, "gain_threshold": gain_thr, "n": n})


def _unstable(history: list[dict], val: list[dict], n: int) -> Finding | None:
    drops = []
    for a, b in zip(val, val[1:]):
        thr = threshold((a["val_acc"] + b["val_acc"]) / 2, n)
        if a["val_acc"] - b["val_acc"] > thr:
            drops.append(f"epoch {a['epoch']} to {b['epoch']}: {_pct(a['val_acc'])} to {_pct(b['val_acc'])} "
                         f"(threshold {_pts(thr)})")
    train = [r for r in history if r["train_loss"] is not None]
    rises = [f"epoch {a['epoch']} to {b['epoch']}: {a['train_loss']:.4f} to {b['train_loss']:.4f} "
             f"(+{100 * (b['train_loss'] / a['train_loss'] - 1):.1f}%)"
             for a, b in zip(train, train[1:]) if 0 < a["train_loss"] * (1 + TRAIN_LOSS_RISE) < b["train_loss"]]
    seen = []
    if len(drops) >= 2:
        seen.append(f"validation accuracy dropped by more than 2 standard errors (n = {n:,}) between consecutive "
                    f"epochs {len(drops)} times ({'; '.join(drops)})")
    if rises:
        seen.append(f"the training loss rose more than {100 * TRAIN_LOSS_RISE:.0f}% from one epoch to the next "
                    f"({'; '.join(rises)})")
    if not seen:
        return None
    return Finding("unstable", "Unstable: " + "; and ".join(seen) + ". " + UNSTABLE_REMEDY,
                   {"val_drops": len(drops), "train_loss_rises": len(rises), "n": n})


# ---------------------------------------------------------------------------------------------------
# Public API


def _clean(history: list[dict]) -> list[dict]:
    """The rows with their finite numbers only (None for missing or non-finite) and a 1-based epoch."""
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    return [dict({k: _finite(row, k) for k in keys}, epoch=row.get("epoch", i + 1)) for i, row in enumerate(history)]


def diagnose(history: list[dict], val_size: int, val_source: str = "validation",
             mixed_batches: bool = False) -> list[Finding]:
    """The findings about a run's per-epoch ``history`` (the rows the trainer writes), validated on
    ``val_size`` images (``val_source`` names them in the texts); see the module docstring for the rules."""
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
        raise ValueError(f"val_size must be a positive number of validation images, not {val_size!r}")
    n = val_size
    diverged = _diverged(history)
    if diverged:
        return [diverged]
    rows = _clean(history)
    val = [r for r in rows if r["val_acc"] is not None]
    if len(val) < 2:
        return [Finding("too_short", f"Too little to judge: the doctor needs at least 2 epochs with a validation "
                                     f"accuracy ({val_source}), this history has {len(val)}.", {"epochs": len(val)})]
    lr = _no_progress(val, n)
    findings = [f for f in (lr, _overfitting(val, n, mixed_batches), _still_improving(val, n),
                            None if lr or mixed_batches else _underfitting(val, n), _unstable(rows, val, n)) if f]
    if findings:
        return findings
    thr = threshold(val[-1]["val_acc"], n)
    gap_note = " (MixUp/CutMix: the train-validation gap is not used)" if mixed_batches else ""
    return [Finding("healthy", f"Nothing to flag: no over-fitting, under-fitting, instability or unfinished "
                               f"improvement beyond 2 standard errors of the validation accuracy ({_pts(thr)} "
                               f"at the final {_pct(val[-1]['val_acc'])}, n = {n:,}; {val_source}){gap_note}.",
                    {"val_acc": val[-1]["val_acc"], "threshold": thr, "n": n})]


def format_diagnosis(findings: list[Finding]) -> str:
    """Console text: a header with the rule, then one "- " line per finding."""
    header = ("Diagnosis of the curves (a difference counts only above 2 binomial standard errors of the "
              "validation accuracy, 2 sqrt(p(1-p)/n)):")
    return "\n".join([header] + [f"- {f.text}" for f in findings])
