"""The training doctor on synthetic histories: each finding, its numbers, and the 2-standard-error rule."""
from __future__ import annotations

import json
import math

import pytest

from cifarlab.doctor import Finding, diagnose, format_diagnosis


def rows(train_acc, val_acc, train_loss, val_loss):
    """History rows as the trainer writes them."""
    return [{"epoch": i + 1, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va, "lr": 0.01,
             "seconds": 1.0, "images_per_s": 1000.0}
            for i, (ta, va, tl, vl) in enumerate(zip(train_acc, val_acc, train_loss, val_loss))]


def two_se(p, n):
    """Written out here, independently of the module: 2 sqrt(p(1-p)/n)."""
    return 2 * math.sqrt(p * (1 - p) / n)


def points(x):
    return f"{100 * x:.2f} points"


def kinds(findings):
    return [f.kind for f in findings]


# Validation peaks at epoch 5 and falls; training keeps climbing; validation loss rises from epoch 4.
OVERFIT = rows([.60, .75, .85, .92, .96, .971], [.58, .70, .76, .80, .804, .788],
               [1.1, .7, .45, .25, .12, .08], [1.2, .85, .7, .62, .68, .8])
HEALTHY = rows([.60, .75, .85, .90, .92, .93], [.58, .70, .78, .82, .83, .832],
               [1.1, .7, .45, .32, .26, .22], [1.2, .85, .65, .55, .52, .51])


def test_overfitting_states_the_gap_the_peak_and_their_thresholds():
    findings = diagnose(OVERFIT, 10_000)
    assert kinds(findings) == ["overfitting"]
    text = findings[0].text
    for number in ("97.10%", "78.80%", "18.30 points", "epoch 5 (80.40%)", "1.60 points", "0.6200 at epoch 4",
                   "0.8000", "n = 10,000", points(two_se(.788, 10_000)), points(two_se((.804 + .788) / 2, 10_000))):
        assert number in text, number
    assert "--early-stop" in text and "--ema" in text
    assert findings[0].numbers["best_epoch"] == 5 and findings[0].numbers["gap"] == pytest.approx(.971 - .788)


def test_overfitting_from_the_gap_and_losses_alone_and_mixed_batches_do_not_use_the_gap():
    # validation accuracy still at its best at the end, but its loss rises while training loss falls
    history = rows([.70, .85, .95, .99], [.70, .78, .80, .801], [.9, .5, .2, .05], [.9, .7, .8, 1.0])
    findings = diagnose(history, 10_000)
    assert kinds(findings) == ["overfitting"]
    assert "99.00%" in findings[0].text and "peaked" not in findings[0].text
    assert "overfitting" not in kinds(diagnose(history, 10_000, mixed_batches=True))
    mixed = diagnose(OVERFIT, 10_000, mixed_batches=True)
    assert kinds(mixed) == ["overfitting"]
    assert "gap is not used" in mixed[0].text and "18.30 points" not in mixed[0].text
    assert "epoch 5 (80.40%)" in mixed[0].text


def test_underfitting():
    history = rows([.40, .48, .52, .531, .532], [.41, .48, .52, .530, .531], [1.7, 1.5, 1.4, 1.35, 1.34],
                   [1.7, 1.5, 1.4, 1.36, 1.35])
    findings = diagnose(history, 10_000)
    assert kinds(findings) == ["underfitting"]
    text = findings[0].text
    for number in ("53.20%", "53.10%", "+0.10 points", points(two_se(.531, 10_000))):
        assert number in text, number
    assert "bigger model" in text and "--epochs" in text
    assert "underfitting" not in kinds(diagnose(history, 10_000, mixed_batches=True))  # needs the gap


def test_still_improving():
    history = rows([.52, .62, .70, .76, .82], [.50, .60, .66, .70, .74], [1.4, 1.1, .9, .75, .6],
                   [1.4, 1.15, 1.0, .9, .8])
    findings = diagnose(history, 10_000)
    assert kinds(findings) == ["still_improving"]
    text = findings[0].text
    for number in ("74.00%", "4.00 points", "(70.00%, epoch 4)", points(two_se(.72, 10_000))):
        assert number in text, number
    assert "--epochs" in text


def test_unstable_zigzag_and_rising_training_loss():
    history = rows([.55, .65, .68, .72, .74, .75], [.50, .62, .55, .66, .58, .659], [1.3, 1.0, .95, .85, .8, .78],
                   [1.4, 1.1, 1.3, 1.0, 1.2, 1.0])
    findings = diagnose(history, 10_000)
    assert kinds(findings) == ["unstable"]
    assert "2 times" in findings[0].text
    assert "62.00% to 55.00%" in findings[0].text and "66.00% to 58.00%" in findings[0].text
    spiky = [dict(r) for r in HEALTHY]
    spiky[3]["train_loss"] = .54  # 0.45 -> 0.54: +20%
    findings = diagnose(spiky, 10_000)
    assert kinds(findings) == ["unstable"]
    assert "0.4500 to 0.5400 (+20.0%)" in findings[0].text and "--lr" in findings[0].text


def test_lr_too_high_diverged_and_no_progress():
    diverged = rows([.2, .3, .1], [.2, .3, .1], [2.0, 1.8, math.nan], [2.0, 1.8, 2.3])
    findings = diagnose(diverged, 10_000)
    assert kinds(findings) == ["lr_too_high"]
    assert "training loss is nan at epoch 3" in findings[0].text and "lr-find" in findings[0].text
    json.dumps(findings[0].to_dict(), allow_nan=False)  # storable in the checkpoint's meta.json
    stuck = rows([.10, .11, .10, .10], [.100, .102, .101, .100], [2.30, 2.25, 2.31, 2.32], [2.3, 2.3, 2.3, 2.3])
    findings = diagnose(stuck, 10_000)
    assert kinds(findings) == ["lr_too_high"]  # not also under-fitting: a bigger net is not the remedy
    for number in ("2.3200 at epoch 4", "(2.3000)", "10.00%", points(two_se(.1, 10_000))):
        assert number in findings[0].text, number


def test_healthy_run_triggers_nothing_and_says_which_threshold_applied():
    findings = diagnose(HEALTHY, 10_000, val_source="test set")
    assert kinds(findings) == ["healthy"]
    assert points(two_se(.832, 10_000)) in findings[0].text and "83.20%" in findings[0].text
    assert "test set" in findings[0].text


def test_the_two_standard_error_rule():
    """The same 1-point gain at the last epoch counts on 50,000 validation images and not on 100."""
    history = rows([.85, .87, .89], [.80, .81, .82], [.6, .5, .45], [.65, .6, .58])
    p = (.81 + .82) / 2
    assert two_se(p, 50_000) < .01 < two_se(p, 100)
    big = diagnose(history, 50_000)
    assert "still_improving" in kinds(big)
    assert points(two_se(p, 50_000)) in next(f.text for f in big if f.kind == "still_improving")
    assert "still_improving" not in kinds(diagnose(history, 100))
    # a perfect accuracy still has an uncertainty: the threshold is never 0
    perfect = rows([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [.1, .05, .04], [.1, .05, .04])
    assert kinds(diagnose(perfect, 100)) == ["healthy"]


def test_short_and_partial_histories():
    assert kinds(diagnose(HEALTHY[:1], 10_000)) == ["too_short"]
    other_rank = [{k: v for k, v in r.items() if not k.startswith("val_")} for r in HEALTHY]
    assert kinds(diagnose(other_rank, 10_000)) == ["too_short"]
    gaps = [dict(r) for r in HEALTHY]
    gaps[2]["val_acc"] = gaps[2]["val_loss"] = None
    assert kinds(diagnose(gaps, 10_000)) == ["healthy"]
    with pytest.raises(ValueError, match="val_size"):
        diagnose(HEALTHY, 0)


def test_format_and_to_dict():
    findings = diagnose(OVERFIT, 10_000)
    text = format_diagnosis(findings)
    lines = text.splitlines()
    assert lines[0].startswith("Diagnosis of the curves") and "2 binomial standard errors" in lines[0]
    assert lines[1] == f"- {findings[0].text}"
    stored = json.loads(json.dumps(findings[0].to_dict()))
    assert Finding(**stored) == findings[0]
