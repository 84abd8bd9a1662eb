"""Calibration metrics against torchmetrics and hand-built cases; temperature scaling recovers a known T."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cifarlab import calibration as cal


def _logits(n=2000, k=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale, g


def _sample_labels(logits, g):
    """Labels drawn from softmax(logits): the model is then perfectly calibrated by construction."""
    return torch.multinomial(torch.softmax(logits.double(), 1), 1, generator=g)[:, 0]


@pytest.mark.parametrize("seed,k", [(0, 10), (1, 3), (2, 100)])
def test_ece_matches_torchmetrics(seed, k):
    torchmetrics = pytest.importorskip("torchmetrics")
    logits, g = _logits(3000, k, seed)
    labels = torch.randint(0, k, (3000,), generator=g)
    metric = torchmetrics.classification.MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")
    theirs = float(metric(torch.softmax(logits.double(), 1), labels))
    ours = cal.expected_calibration_error(logits, labels)
    assert ours == pytest.approx(theirs, abs=1e-6)
    # MCE too (torchmetrics' norm="max")
    metric = torchmetrics.classification.MulticlassCalibrationError(num_classes=k, n_bins=15, norm="max")
    theirs = float(metric(torch.softmax(logits.double(), 1), labels))
    assert cal.reliability_bins(logits, labels).mce == pytest.approx(theirs, abs=1e-6)


def test_perfectly_calibrated_set_has_ece_near_zero():
    logits, g = _logits(200_000, 10, seed=3, scale=2.0)
    labels = _sample_labels(logits, g)
    ece = cal.expected_calibration_error(logits, labels)
    # Sampling noise only: ~ sqrt(p(1-p)/n_bin) per bin, well under 1% with 200k samples.
    assert ece < 0.005
    # ...while an over-confident version of the same predictions is clearly miscalibrated
    assert cal.expected_calibration_error(logits * 3, labels) > 0.1


def test_nll_and_brier_by_hand():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)],
                           [math.log(0.25), math.log(0.25), math.log(0.5)]])
    labels = torch.tensor([0, 1])
    assert cal.negative_log_likelihood(logits, labels) == pytest.approx(-(math.log(0.7) + math.log(0.25)) / 2)
    brier0 = (0.7 - 1) ** 2 + 0.2 ** 2 + 0.1 ** 2
    brier1 = 0.25 ** 2 + (0.25 - 1) ** 2 + 0.5 ** 2
    assert cal.brier_score(logits, labels) == pytest.approx((brier0 + brier1) / 2)
    # a certain, correct prediction scores 0; a certain, wrong one scores the maximum 2
    assert cal.brier_score(torch.tensor([[100.0, 0.0]]), torch.tensor([0])) == pytest.approx(0, abs=1e-12)
    assert cal.brier_score(torch.tensor([[100.0, 0.0]]), torch.tensor([1])) == pytest.approx(2)


def test_ece_by_hand_and_bin_edges():
    # confidences 0.9 (correct), 0.62 (wrong), 0.62 (correct): bins (13/15, 14/15] and (9/15, 10/15]
    p = torch.tensor([[0.9, 0.1], [0.62, 0.38], [0.62, 0.38]]).double().log()
    labels = torch.tensor([0, 1, 0])
    bins = cal.reliability_bins(p, labels)
    assert bins.count[13] == 1 and bins.count[9] == 2 and sum(bins.count) == 3
    assert bins.accuracy[9] == pytest.approx(0.5) and bins.confidence[9] == pytest.approx(0.62)
    assert bins.ece == pytest.approx(1 / 3 * 0.1 + 2 / 3 * 0.12)
    # the top edge is inclusive: confidence 1.0 lands in the last bin
    assert cal.reliability_bins(torch.tensor([[0.0, -1e9]]), torch.tensor([0])).count[-1] == 1
    json.dumps(bins.to_dict())  # empty bins are None, not NaN


def test_temperature_fit_recovers_known_temperature():
    true_logits, g = _logits(50_000, 10, seed=4, scale=1.5)
    labels = _sample_labels(true_logits, g)
    k = 2.5  # the model is over-confident by a factor 2.5: T should come out ~2.5
    fit = cal.fit_temperature(true_logits * k, labels)
    assert fit.temperature == pytest.approx(k, rel=0.03)
    assert not fit.at_bound
    assert fit.after["ece"] < fit.before["ece"] and fit.after["nll"] < fit.before["nll"]
    assert fit.after["ece"] < 0.01
    assert fit.after["accuracy"] == fit.before["accuracy"]  # argmax unchanged by T > 0
    json.dumps(fit.to_dict())


def test_temperature_fit_is_deterministic_and_bounded():
    # Separable data: the NLL keeps falling as T -> 0, so the lower bound is returned and flagged.
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]] * 10)
    labels = torch.tensor([0, 1] * 10)
    fit = cal.fit_temperature(logits, labels, bounds=(0.05, 20))
    assert fit.temperature == pytest.approx(0.05) and fit.at_bound
    a, b = _logits(500, 10, seed=5)
    y = torch.randint(0, 10, (500,), generator=b)  # random labels: optimum is very hot, at the upper bound
    assert cal.fit_temperature(a, y).temperature == cal.fit_temperature(a.clone(), y.clone()).temperature


def test_temperature_is_the_nll_minimum():
    logits, g = _logits(3000, 10, seed=6, scale=2.0)
    noise = torch.randint(0, 10, (3000,), generator=g)
    labels = torch.where(torch.rand(3000, generator=g) < 0.6, logits.argmax(1), noise)
    t = cal.fit_temperature(logits, labels).temperature
    nll = cal.negative_log_likelihood(logits, labels, t)
    for other in (t * 0.97, t * 1.03):
        assert cal.negative_log_likelihood(logits, labels, other) > nll


def test_reliability_diagram_png(tmp_path):
    logits, g = _logits(500, 10, seed=7)
    labels = _sample_labels(logits, g)
    fit = cal.fit_temperature(logits * 2, labels)
    before = cal.reliability_bins(logits * 2, labels)
    after = cal.reliability_bins(logits * 2, labels, temperature=fit.temperature)
    path = cal.reliability_diagram([before, after], tmp_path / "rel.png", ["before", "after"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cal.reliability_diagram(before, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 1000
