"""Are the probabilities honest? Calibration metrics, reliability diagrams and temperature scaling.

Everything here works on logits (float (N, K), any number of classes K) and int64 labels (N,), so it
applies to any model and dataset; the probabilities are ``softmax(logits / T)``. Sums are done in
float64: ECE is a difference of averages and float32 would cost digits on 10,000 images.

Conventions
-----------
ECE (Guo et al. 2017, "On Calibration of Modern Neural Networks"): confidence = the maximum
probability, accuracy = whether that class is the label; the confidences are put in ``n_bins``
equal-width bins ``((m-1)/M, m/M]`` and ECE = sum over bins of (bin size / N) * |accuracy - confidence|.
(torchmetrics bins ``[lo, hi)``; the two differ only for a confidence exactly on an edge.)
NLL: mean cross-entropy in nats. Brier score: the mean over samples of the sum over classes of
``(p_k - onehot_k)^2`` (Brier 1950's multi-class form, range 0..2); some libraries divide it by K.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import plots

N_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _as_inputs(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(logits).detach().cpu().double()
    labels = torch.as_tensor(labels).detach().cpu().long()
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return logits, labels


@dataclass
class ReliabilityBins:
    """Per-bin data of a reliability diagram; empty bins have count 0 and NaN confidence/accuracy."""

    edges: list[float]        # n_bins + 1 edges, 0..1
    confidence: list[float]   # mean max-probability in the bin
    accuracy: list[float]     # fraction correct in the bin
    count: list[int]

    @property
    def ece(self) -> float:
        total = sum(self.count)
        return float(sum(c / total * abs(a - p) for c, a, p in zip(self.count, self.accuracy, self.confidence) if c))

    @property
    def mce(self) -> float:
        """Maximum calibration error: the worst non-empty bin's gap."""
        gaps = [abs(a - p) for c, a, p in zip(self.count, self.accuracy, self.confidence) if c]
        return float(max(gaps, default=0.0))

    def to_dict(self) -> dict:
        # NaN is not JSON: empty bins say None.
        clean = lambda values: [None if isinstance(v, float) and math.isnan(v) else v for v in values]  # noqa: E731
        d = asdict(self)
        d["confidence"], d["accuracy"] = clean(self.confidence), clean(self.accuracy)
        return d


def reliability_bins(logits, labels, n_bins: int = N_BINS, temperature: float = 1.0) -> ReliabilityBins:
    logits, labels = _as_inputs(logits, labels)
    probs = torch.softmax(logits / temperature, dim=1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False) puts c in bin m when edges[m] < c <= edges[m+1]: Guo's ((m-1)/M, m/M].
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    conf_mean = (conf_sum / count).tolist()  # 0 / 0 = NaN for an empty bin
    acc_mean = (acc_sum / count).tolist()
    return ReliabilityBins(edges.tolist(), conf_mean, acc_mean, [int(c) for c in count.tolist()])


def expected_calibration_error(logits, labels, n_bins: int = N_BINS, temperature: float = 1.0) -> float:
    return reliability_bins(logits, labels, n_bins, temperature).ece


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    logits, labels = _as_inputs(logits, labels)
    return float(F.cross_entropy(logits / temperature, labels))


def brier_score(logits, labels, temperature: float = 1.0) -> float:
    """Mean over samples of sum over classes of (p - onehot)^2 (range 0..2; not divided by K)."""
    logits, labels = _as_inputs(logits, labels)
    probs = torch.softmax(logits / temperature, dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).double()
    return float((probs - onehot).pow(2).sum(1).mean())


def calibration_metrics(logits, labels, temperature: float = 1.0, n_bins: int = N_BINS) -> dict:
    """accuracy, ECE, MCE, NLL and Brier of softmax(logits / temperature), as a JSON-ready dict."""
    bins = reliability_bins(logits, labels, n_bins, temperature)
    logits_, labels_ = _as_inputs(logits, labels)
    return {
        "n": int(len(labels_)),
        "accuracy": float((logits_.argmax(1) == labels_).double().mean()) if len(labels_) else float("nan"),
        "ece": bins.ece,
        "mce": bins.mce,
        "nll": negative_log_likelihood(logits, labels, temperature),
        "brier": brier_score(logits, labels, temperature),
        "temperature": float(temperature),
        "n_bins": n_bins,
    }


# ---------------------------------------------------------------------------------------------------
# Temperature scaling


@dataclass
class TemperatureFit:
    temperature: float
    before: dict              # calibration_metrics at T = 1 on the fitting set
    after: dict               # at the fitted T, same set
    at_bound: bool            # the optimum lies at (or beyond) a bound: the bound was returned
    bounds: tuple[float, float]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bounds"] = list(self.bounds)
        return d


def _nll_slope(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """d NLL / d beta at inverse temperature beta: mean of (E_p[z] - z_label) with p = softmax(beta z)."""
    p = torch.softmax(beta * logits, dim=1)
    return float(((p * logits).sum(1) - logits.gather(1, labels[:, None])[:, 0]).mean())


def fit_temperature(logits, labels, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, n_bins: int = N_BINS,
                    iterations: int = 100) -> TemperatureFit:
    """The one temperature T in ``bounds`` that minimizes the NLL of softmax(logits / T) on held-out data.

    NLL is convex in beta = 1/T (log-sum-exp of a linear function minus a linear function), so its
    slope in beta is increasing and the optimum is where the slope changes sign: bisection on log(beta)
    finds it to float64 precision in 100 halvings with no step size, no randomness and no failure mode
    (LBFGS on log T can overshoot on separable data, where the optimum is T -> 0). Dividing logits by
    T > 0 never changes the argmax, so accuracy is unchanged.
    """
    logits_, labels_ = _as_inputs(logits, labels)
    lo_t, hi_t = float(bounds[0]), float(bounds[1])
    if not 0 < lo_t < hi_t:
        raise ValueError(f"temperature bounds must satisfy 0 < low < high, got {bounds}")
    lo, hi = math.log(1 / hi_t), math.log(1 / lo_t)  # log beta
    at_bound = False
    if _nll_slope(logits_, labels_, math.exp(lo)) >= 0:     # NLL already rising at the largest T's beta
        log_beta, at_bound = lo, True
    elif _nll_slope(logits_, labels_, math.exp(hi)) <= 0:   # still falling at the smallest T
        log_beta, at_bound = hi, True
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if _nll_slope(logits_, labels_, math.exp(mid)) > 0:
                hi = mid
            else:
                lo = mid
        log_beta = 0.5 * (lo + hi)
    temperature = 1 / math.exp(log_beta)
    return TemperatureFit(temperature, calibration_metrics(logits, labels, 1.0, n_bins),
                          calibration_metrics(logits, labels, temperature, n_bins), at_bound, (lo_t, hi_t))


# ---------------------------------------------------------------------------------------------------
# Reliability diagram


def reliability_diagram(bins: ReliabilityBins | list[ReliabilityBins], path: str | Path,
                        titles: list[str] | None = None) -> Path:
    """PNG: per bin, the accuracy as a bar against the diagonal (perfect calibration), the gap to the
    bin's mean confidence shaded, ECE in the title, and the bin counts below. Several bin sets (e.g.
    before / after temperature scaling) are drawn side by side with the same axes."""
    sets = [bins] if isinstance(bins, ReliabilityBins) else list(bins)
    titles = titles or [""] * len(sets)
    plt = plots.pyplot()
    fig, axes = plt.subplots(2, len(sets), figsize=(4.5 * len(sets), 5.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for col, (b, title) in enumerate(zip(sets, titles)):
        _draw_bins(axes[0, col], axes[1, col], b, title)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def _draw_bins(ax, ax_count, b: ReliabilityBins, title: str) -> None:
    edges = np.asarray(b.edges)
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    acc = np.nan_to_num(np.asarray(b.accuracy, dtype=float))
    conf = np.asarray(b.confidence, dtype=float)
    filled = np.asarray(b.count) > 0
    ax.bar(centers[filled], acc[filled], width[filled], color="tab:blue", edgecolor="black", label="accuracy")
    gap_lo = np.minimum(acc, conf)[filled]
    # hatched, unfilled: the gap stays visible whether it lies above the bar (over-confident) or inside it
    ax.bar(centers[filled], np.abs(acc - conf)[filled], width[filled], bottom=gap_lo, color="none",
           hatch="///", edgecolor="tab:red", linewidth=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}{' — ' if title else ''}ECE {100 * b.ece:.2f}%", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    ax_count.bar(centers, b.count, width, color="gray", edgecolor="black")
    ax_count.set_yscale("symlog")
    ax_count.set_xlabel("confidence (max probability)")
    ax_count.set_ylabel("images")
