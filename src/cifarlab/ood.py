"""Out-of-distribution (OOD) scores for a trained run, post hoc: no retraining, nothing changes in the model.

A CIFAR-10 classifier must call an ant photo *something*; softmax probabilities do not say "none of
these". Three scores say how much an image looks like the run's training data. **Higher = more
in-distribution** for all three:

* ``knn`` (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors"): the negative
  Euclidean distance between the image's L2-normalised penultimate feature and its ``k``-th nearest
  L2-normalised training feature (k = 50 by default). On unit vectors ``|a - b| = sqrt(2 - 2 cos(a, b))``,
  so it is found as the k-th largest cosine similarity (a matmul and a top-k, in chunks of queries so
  the similarity block stays under :data:`SIM_CHUNK_ELEMENTS` floats). It lies in [-2, 0].
* ``msp`` (Hendrycks & Gimpel 2017): the largest softmax probability, of ``logits / T`` with the run's
  fitted temperature T when the checkpoint stores one (``cifarlab calibrate`` / ``--val-split``), else T = 1.
* ``energy`` (Liu et al. 2020, "Energy-based out-of-distribution detection"): ``T * logsumexp(logits / T)``
  with T = 1 (the negative free energy).
* ``layers`` (**the flag's score**): the same KNN score on every conv layer's or residual block's output
  after its activation (averaged over space, L2-normalised; :func:`feature_layers`) and on the penultimate
  features, each standardized by its mean and sd on the held-out images below, then the minimum over layers:
  the most unusual layer decides. Noise and scrambled pixels look plain in the first layers' statistics
  while an unfamiliar object shows in the last ones; the penultimate layer alone misses the first kind.
  Measured on the ``fast`` run (``bench/bench_ood_layers.py``, ``bench/results/ood_layers_fast.txt``): AUROC
  against Gaussian noise 0.913 -> 1.000, pixel-permuted test images 0.838 -> 0.999, the ant/bee photos
  0.766 -> 0.833; photos flagged 18% -> 44% at the same 95% of held-out images accepted. The per-layer banks
  hold a seeded :data:`LAYER_BANK_IMAGES` of the bank's images with k scaled alike (:func:`layer_k_for`).

Penultimate features are the *input* of the model's last declared layer of type ``dense`` (its head),
read with a forward pre-hook; the model runs in eval mode, in batches, in fp32 (no autocast), on the
checkpoint's own normalization, without test-time augmentation.

**The feature bank** (``RUN/ood/bank.safetensors``; never pickle) holds the L2-normalised features of the
run's training images, built once per run. Its safetensors metadata (``cifarlab_ood``, JSON) records
the checkpoint's ``weights_sha256``, the dataset identity's content key (photo folders) and the
checksum of the training images, the split, the count and dimension, ``k`` and when it was made, and a
checksum of its tensors. On load it is checked like every file cifarlab reads: a regular file of a
bounded size before any byte is read, then the metadata schema
(:func:`cifarlab.validation.check_ood_bank_meta`), the tensor checksum, shapes (N, D) float32, finite
values, rows of unit norm (within :data:`UNIT_NORM_TOLERANCE`), and indices that are exactly the split
below. A bank made for other weights or other data, or a damaged one, is rebuilt and the reason said;
files are written atomically.

**The threshold** (``RUN/ood/threshold.json``) is fitted on in-distribution images that are *not* in the
bank (an image in the bank is its own nearest neighbour, which would make the threshold too lenient):

* a run trained with ``--val-split N`` (``recipe.val_split`` > 0): the bank is the images it trained on
  and the threshold comes from its N held-out images, rebuilt exactly as training made them
  (``holdout_split(train, val_split, seed=recipe.seed)``);
* otherwise a seeded random :data:`HOLDOUT_IMAGES` training images (10% of them if that is fewer; the same
  ``holdout_split`` with the recipe's seed) are kept out of the bank for the threshold. (The model did see
  them in training; the bank does not hold them.)

Each layer's KNN scores on them give its standardization (mean, sd); the threshold is the 5th percentile
of their ``layers`` scores (``tpr`` 0.95): an image scoring below it is flagged as unlike any class the
model knows, and at least 95% of those held-out images are not. (``knn_threshold``, the same percentile of
the penultimate KNN score alone, is stored beside it for comparison.) The
held-out features are stored in the bank file too, so a threshold for another ``k`` costs no forward pass.

Use :func:`prepare` (``ood.prepare(run_dir_or_ckpt, data)``) for an :class:`OODDetector`, and
:func:`evaluate_ood` for AUROC and FPR at 95% TPR against OOD sets (``cifarlab evaluate RUN --ood ...``).
"""
from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import validation as V
from .errors import CheckpointError, CifarlabError, DataError, short_repr

OOD_DIR = "ood"
BANK_FILE = "bank.safetensors"
THRESHOLD_FILE = "threshold.json"
RESULTS_FILE = "ood.json"
HISTOGRAM_FILE = "ood_scores.png"
BANK_FORMAT = "cifarlab-ood-bank-2"
THRESHOLD_FORMAT = "cifarlab-ood-threshold-2"
BANK_META_KEY = "cifarlab_ood"
DEFAULT_K = 50
TPR = 0.95
HOLDOUT_IMAGES = 5000
HOLDOUT_FRACTION = 0.1
UNIT_NORM_TOLERANCE = 1e-3
MAX_BANK_BYTES = 8 << 30              # 2,000,000 images x 1,024 features in fp32
SIM_CHUNK_ELEMENTS = 1 << 24          # similarity block of one KNN chunk: 64 MiB of fp32
# Per-layer banks hold a seeded subset of the bank's images, k scaled with them (k = 50 of 45,000 -> 11 of
# 10,000). Measured on the fast run (bench/bench_ood_layers.py): AUROC 0.9986 / 0.8293 (permuted / photos)
# with 10,000 vs 0.9980 / 0.8333 with all 45,000; the file stays ~50 MB instead of ~210 MB.
LAYER_BANK_IMAGES = 10_000
SCORES = ("layers", "knn", "msp", "energy")
SCORE_NAMES = {"layers": "KNN all layers", "knn": "KNN", "msp": "MSP", "energy": "Energy"}
FLAG_SCORE = "layers"                 # the score the flag and the threshold use
BOOTSTRAP_BELOW = 2000                # OOD sets smaller than this get bootstrap 95% intervals
BOOTSTRAP_RESAMPLES = 1000
MAX_GENERATED = 2000                  # noise / permuted sets: as many as the test set, at most this many
FLAG_TEXT = "unlike any class I know"


class OODError(CifarlabError):
    """The OOD scores cannot be made (no run folder, data that is not the run's, too few images...)."""


# ---------------------------------------------------------------------------------------------------
# Features and scores


def head_layer(model: torch.nn.Module) -> str:
    """The (dotted) name of the declaration's last layer of type ``dense``: the head."""
    from .models import head_name

    decl = getattr(model, "declaration", None)
    head = head_name(decl) if isinstance(decl, dict) else None
    if head is None:
        raise OODError("the model has no dense layer: OOD features are the input of its last dense layer")
    return head


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise OODError(f"the model has no module named {name!r}")
    return module


def feature_layers(model: torch.nn.Module) -> list[str]:
    """The layers whose pooled outputs the all-layers score reads: each conv layer's or residual block's
    output after its activation (the stimulus targets of :mod:`cifarlab.net_layers`)."""
    from .net_layers import stimulus_targets

    return [t.name for t in stimulus_targets(model) if t.spatial]


def features_and_logits(model: torch.nn.Module, images: torch.Tensor, normalization, batch_size: int = 128,
                        device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) -> (penultimate features (N, D), logits (N, classes)), float32 on the CPU; eval
    mode, fp32, no TTA, the given normalization. Features: the input of the head (:func:`head_layer`)."""
    feats, _, logits = network_features(model, images, normalization, (), batch_size, device)
    return feats, logits


@torch.inference_mode()
def network_features(model: torch.nn.Module, images: torch.Tensor, normalization, layers=(), batch_size: int = 128,
                     device=None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(penultimate features (N, D), {layer: its output averaged over space (N, C)}, logits), one pass per
    batch with forward hooks; float32 on the CPU."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seen: list[torch.Tensor] = []
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook(module, args):
        seen.append(args[0].detach().float().flatten(1))

    handles = [_module(model, head_layer(model)).register_forward_pre_hook(hook)]
    for name in layers:
        handles.append(_module(model, name).register_forward_hook(
            lambda m, a, out, name=name: pooled[name].append(out.detach().float().mean((2, 3)).cpu())))
    was_training = model.training
    model.eval()
    feats, logits = [], []
    try:
        for start in range(0, len(images), batch_size):
            x = normalization(images[start:start + batch_size].to(device))
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            seen.clear()
            out = model(x).float()
            if len(seen) != 1:
                raise OODError(f"the head {head_layer(model)!r} ran {len(seen)} times in one forward pass")
            feats.append(seen[0].cpu())
            logits.append(out.cpu())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not feats:
        return torch.empty(0, 0), {name: torch.empty(0, 0) for name in layers}, torch.empty(0, 0)
    return torch.cat(feats), {name: torch.cat(v) for name, v in pooled.items()}, torch.cat(logits)


def min_z(per_layer: dict[str, np.ndarray], standardize: dict[str, list[float]]) -> np.ndarray:
    """The all-layers score: each layer's KNN score standardized by its held-out mean and sd, the minimum over
    layers (the most unusual layer decides: noise is plain in the first layers, an odd object in the last)."""
    z = [(np.asarray(per_layer[name]) - mean) / sd for name, (mean, sd) in standardize.items()]
    return np.min(np.stack(z), 0)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return torch.nn.functional.normalize(x.float(), dim=1)


def knn_scores(queries: torch.Tensor, bank: torch.Tensor, k: int = DEFAULT_K,
               chunk_elements: int = SIM_CHUNK_ELEMENTS) -> np.ndarray:
    """-(distance to the k-th nearest bank row) for each L2-normalised query row; bank rows L2-normalised.
    Queries go in chunks so that one similarity block holds at most ``chunk_elements`` values."""
    if not 1 <= k <= len(bank):
        raise OODError(f"k = {k} needs at least {k} images in the feature bank; it holds {len(bank)}")
    bank = bank.float()
    queries = queries.to(bank.device, torch.float32)
    step = max(1, chunk_elements // max(1, len(bank)))
    out = []
    with torch.inference_mode():
        for start in range(0, len(queries), step):
            sim = queries[start:start + step] @ bank.T
            kth = torch.topk(sim, k, dim=1, largest=True, sorted=True).values[:, -1]
            out.append(kth.double().cpu())
    cos = torch.cat(out) if out else torch.empty(0, dtype=torch.float64)
    return -torch.sqrt(torch.clamp(2.0 - 2.0 * cos, min=0.0)).numpy()


def msp_scores(logits: torch.Tensor, temperature: float | None = None) -> np.ndarray:
    """max softmax(logits / T) (T = 1 when None)."""
    return torch.softmax(logits.double() / (temperature or 1.0), dim=1).amax(1).numpy()


def energy_scores(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """T * logsumexp(logits / T): the negative free energy (Liu et al. 2020)."""
    return (temperature * torch.logsumexp(logits.double() / temperature, dim=1)).numpy()


def fit_threshold(scores, tpr: float = TPR) -> float:
    """The score that at least ``tpr`` of ``scores`` reach (scores >= it are accepted): their
    (1 - tpr) quantile, taken as an observed value (numpy's ``lower`` method)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores) or not np.isfinite(scores).all():
        raise OODError("the threshold needs finite scores of at least one held-out image")
    return float(np.quantile(scores, 1.0 - tpr, method="lower"))


# ---------------------------------------------------------------------------------------------------
# Metrics


def _check_scores(pos, neg) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    if not len(pos) or not len(neg):
        raise ValueError("both sets need at least one score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("scores must be finite")
    return pos, neg


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` in ascending order; tied values share the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    s = x[order]
    cuts = np.flatnonzero(s[1:] != s[:-1]) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, len(s)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(pos, neg) -> float:
    """Area under the ROC curve, positives = ``pos`` (in-distribution; higher scores are more positive):
    P(a positive scores above a negative) + P(tie) / 2, from the Mann-Whitney rank sum with tied
    scores given their average rank."""
    pos, neg = _check_scores(pos, neg)
    ranks = average_ranks(np.concatenate([pos, neg]))
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fpr_at_tpr(pos, neg, tpr: float = TPR) -> float:
    """The share of ``neg`` accepted (score >= t) at the highest threshold t that accepts at least ``tpr`` of
    ``pos``: the first point of the ROC curve (thresholds from high to low) whose TPR reaches ``tpr``."""
    pos, neg = _check_scores(pos, neg)
    need = max(1, math.ceil(tpr * len(pos) - 1e-9))
    t = np.sort(pos)[::-1][need - 1]
    return float((neg >= t).mean())


def bootstrap_ci(pos, neg, metric, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of ``metric(pos, neg)``: both sets resampled with replacement."""
    pos, neg = _check_scores(pos, neg)
    rng = np.random.default_rng(seed)
    values = np.array([metric(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))])
                       for _ in range(resamples)])
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------------------
# The run, its training images, the split


def run_dir_of(path) -> Path | None:
    """The run folder a checkpoint belongs to (RUN for RUN/final, RUN/checkpoints/step-N, their
    model.safetensors, or RUN itself), or None for a checkpoint outside a run."""
    from .checkpoints import CKPT_DIR, CKPT_RE

    p = Path(path)
    if p.suffix == ".safetensors":
        p = p.parent
    if p.name == "final" and p.parent.is_dir():
        return p.parent
    if CKPT_RE.match(p.name) and p.parent.name == CKPT_DIR:
        return p.parent.parent
    if p.is_dir() and ((p / "final").is_dir() or (p / CKPT_DIR).is_dir()):
        return p
    return None


def _tensor_sha256(*tensors) -> str:
    from .rundir import _tensor_sha256 as sha

    return sha(*tensors)


def training_images(ckpt, data):
    """The run's training images (a ``--train-subset`` of the first N applied first, as training did),
    checked against what the checkpoint recorded: the count and, when stored, the images' checksum."""
    entry = ckpt.meta.get("dataset") or {}
    if list(data.classes) != list(ckpt.meta.get("classes") or []):
        raise OODError(f"the data's classes {list(data.classes)[:5]}... are not the run's")
    train = data.train
    subset = (entry.get("identity") or {}).get("train_subset")
    if subset:
        words = str(subset).split()
        if len(words) != 2 or words[0] != "first" or not words[1].isdigit():
            raise OODError(f"the run trained on a training subset that cannot be rebuilt ({subset!r})")
        train = train.subset(slice(0, int(words[1])))
    stored = entry.get("train_images")
    if stored is not None and int(stored) != len(train):
        raise OODError(f"the run trained on {stored} training images, but its data now has {len(train)}: its "
                       f"training images cannot be rebuilt")
    sha = (ckpt.meta.get("data_identity") or {}).get("train_sha256")
    if sha and _tensor_sha256(train.images, train.labels) != sha:
        raise OODError("the training images differ from the ones the run trained on (their checksum changed)")
    if len(train) < 2:
        raise OODError(f"the run has {len(train)} training image(s): too few for a feature bank")
    return train


def bank_split(ckpt, n_train: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(bank indices, threshold indices, what the threshold images are) into the run's training images."""
    from .data import Split, holdout_split

    recipe = ckpt.meta.get("recipe") or {}
    seed = int(recipe.get("seed", 0) or 0)
    n_val = int(recipe.get("val_split") or 0)
    if n_val > 0:
        n_hold, what = n_val, f"{n_val} held-out training images (the run's --val-split, seed {seed}), not in the bank"
    else:
        n_hold = min(HOLDOUT_IMAGES, int(n_train * HOLDOUT_FRACTION))
        what = (f"{n_hold} training images held out of the bank (seeded random {n_hold} of {n_train}, seed {seed}); "
                f"the model saw them in training")
    if not 0 < n_hold < n_train:
        raise OODError(f"cannot hold {n_hold} of {n_train} training images out of the feature bank")
    index = torch.arange(n_train)
    bank, held = holdout_split(Split(index, index), n_hold, seed=seed)  # exactly training's split
    return bank.labels.clone(), held.labels.clone(), what


# ---------------------------------------------------------------------------------------------------
# The bank file


@dataclass
class Bank:
    features: torch.Tensor          # (N, D) L2-normalised float32
    indices: torch.Tensor           # (N,) int64, into the run's training images
    holdout_features: torch.Tensor  # (M, D) L2-normalised float32: the threshold's images
    holdout_indices: torch.Tensor   # (M,) int64
    info: dict = field(default_factory=dict)
    layer_indices: torch.Tensor | None = None                         # (L,) int64: a subset of ``indices``
    layers: dict[str, torch.Tensor] = field(default_factory=dict)     # name -> (L, C) L2-normalised pooled
    holdout_layers: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (M, C)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"features": self.features, "indices": self.indices, "holdout_features": self.holdout_features,
               "holdout_indices": self.holdout_indices, "layer_indices": self.layer_indices}
        out.update({f"layer.{name}": t for name, t in self.layers.items()})
        out.update({f"holdout_layer.{name}": t for name, t in self.holdout_layers.items()})
        return out


def _tensors_sha256(tensors: dict) -> str:
    from .checkpoints import weights_sha256

    return weights_sha256(tensors)


def save_bank(path: str | Path, bank: Bank) -> Path:
    """Write the bank atomically (safetensors; the metadata as JSON under ``cifarlab_ood``)."""
    from safetensors.torch import save as st_save

    from .fsutil import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in bank.tensors().items()}
    bank.info = dict(bank.info, format=BANK_FORMAT, tensors_sha256=_tensors_sha256(tensors))
    try:
        atomic_write_bytes(path, st_save(tensors, metadata={BANK_META_KEY: json.dumps(bank.info)}))
    except OSError as e:
        raise OODError(f"could not write the feature bank: {V.os_error_message(e, path)}") from None
    return Path(path)


def load_bank(path: str | Path, expected: dict | None = None) -> Bank:
    """Read and check a bank file (module docstring); ``expected``: metadata values it must have (weights,
    data, split...). Anything wrong is one OODError saying what."""
    from .checkpoints import read_safetensors

    path = Path(path)
    try:
        tensors, header = read_safetensors(path, MAX_BANK_BYTES)
    except CheckpointError as e:
        raise OODError(str(e).replace("; it is truncated or damaged.", " (truncated or damaged).")) from None
    if BANK_META_KEY not in header:
        raise OODError(f"{path}: not a cifarlab feature bank (no '{BANK_META_KEY}' metadata)")
    info = V.check_ood_bank_meta(V.parse_json(header[BANK_META_KEY], path, OODError), path, OODError)
    layer_dims = {entry["name"]: entry["dim"] for entry in info["layers"]}
    names = {"features", "indices", "holdout_features", "holdout_indices", "layer_indices"}
    names |= {f"{kind}.{name}" for name in layer_dims for kind in ("layer", "holdout_layer")}
    if set(tensors) != names:
        missing, extra = sorted(names - set(tensors))[:5], sorted(set(tensors) - names)[:5]
        raise OODError(f"{path}: its tensors do not match its metadata (missing {missing}, unexpected {extra})")
    if _tensors_sha256(tensors) != info["tensors_sha256"]:
        raise OODError(f"{path}: the tensors' checksum does not match its metadata (damaged or edited)")
    count, dim, held, layer_count = info["count"], info["dim"], info["holdout"]["count"], info["layer_count"]
    matrices = [("features", count, dim), ("holdout_features", held, dim)]
    matrices += [(f"{kind}.{name}", rows, d) for name, d in layer_dims.items()
                 for kind, rows in (("layer", layer_count), ("holdout_layer", held))]
    for name, rows, dim in matrices:
        t = tensors[name]
        if t.dtype != torch.float32 or t.ndim != 2 or tuple(t.shape) != (rows, dim):
            raise OODError(f"{path}: '{name}' is {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}, not "
                           f"float32 ({rows}, {dim})")
        if not bool(torch.isfinite(t).all()):
            raise OODError(f"{path}: '{name}' holds NaN or infinite values")
        norms = torch.linalg.vector_norm(t, dim=1)
        worst = float((norms - 1).abs().max()) if len(norms) else 0.0
        if worst > UNIT_NORM_TOLERANCE:
            raise OODError(f"{path}: '{name}' rows are not of unit norm (off by up to {worst:.3g})")
    for name, rows in (("indices", count), ("holdout_indices", held), ("layer_indices", layer_count)):
        t = tensors[name]
        if t.dtype != torch.int64 or t.ndim != 1 or len(t) != rows:
            raise OODError(f"{path}: '{name}' is {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}, not int64 "
                           f"({rows},)")
    for key, want in (expected or {}).items():
        if info.get(key) != want:
            raise OODError(f"{path}: made for {key} {short_repr(info.get(key), 40)}, not {short_repr(want, 40)}")
    return Bank(tensors["features"], tensors["indices"], tensors["holdout_features"], tensors["holdout_indices"],
                info, tensors["layer_indices"], {name: tensors[f"layer.{name}"] for name in layer_dims},
                {name: tensors[f"holdout_layer.{name}"] for name in layer_dims})


# ---------------------------------------------------------------------------------------------------
# The detector


@dataclass
class OODDetector:
    """A run's OOD scores. ``score(images)``: {"knn", "msp", "energy"} arrays (higher = more
    in-distribution); ``flag(images)``: KNN score below the threshold."""

    model: torch.nn.Module
    normalization: object
    bank: torch.Tensor
    k: int
    threshold: float
    temperature: float | None
    run_dir: Path
    info: dict
    threshold_info: dict
    device: object = None
    batch_size: int = 128
    bank_indices: torch.Tensor | None = None  # (N,) int64: each bank row's index in ``train``
    train: object = None                      # the run's training Split (images and labels), for neighbours
    layer_banks: dict = field(default_factory=dict)   # layer -> (L, C) normalised pooled training features
    layer_k: int = 1
    standardize: dict = field(default_factory=dict)   # layer (and "penultimate") -> [held-out mean, sd]
    train_mean_colour: torch.Tensor | None = None     # (1, C, 1, 1), 0..255: Integrated Gradients' baseline

    def score(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        feats, pooled, logits = network_features(self.model, images, self.normalization, list(self.layer_banks),
                                                 self.batch_size, self.device)
        return self.scores_of(feats, logits, pooled)

    def scores_of(self, features: torch.Tensor, logits: torch.Tensor, pooled: dict | None = None) -> dict[str, np.ndarray]:
        """Every score from penultimate ``features``, ``logits`` and the layers' ``pooled`` features (from
        :func:`network_features` with this detector's layers; without them there is no "layers" score)."""
        if not len(features):
            return {name: np.empty(0) for name in SCORES}
        out = {"knn": knn_scores(normalize_rows(features), self.bank, self.k),
               "msp": msp_scores(logits, self.temperature), "energy": energy_scores(logits)}
        if pooled is not None and self.standardize:
            per_layer = {name: knn_scores(normalize_rows(pooled[name]), bank, self.layer_k)
                         for name, bank in self.layer_banks.items()}
            per_layer["penultimate"] = out["knn"]
            out["layers"] = min_z(per_layer, self.standardize)
        return out

    def nearest(self, features: torch.Tensor, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` training images nearest to each row of penultimate ``features`` (cosine similarity of
        L2-normalised features, the KNN score's own geometry): (similarities (Q, n), training indices (Q, n)),
        most similar first."""
        if self.bank_indices is None or not len(self.bank):
            raise OODError("this detector has no bank indices, so no nearest training images")
        n = max(1, min(int(n), len(self.bank)))
        with torch.inference_mode():
            sim = normalize_rows(features).to(self.bank.device) @ self.bank.T
            top = torch.topk(sim, n, dim=1, largest=True, sorted=True)
        return top.values.cpu(), self.bank_indices[top.indices.cpu()]

    def flag(self, images: torch.Tensor) -> np.ndarray:
        return self.flags_of(self.score(images)[FLAG_SCORE])

    def flags_of(self, score) -> np.ndarray:
        """``score``: values of the flag's score (:data:`FLAG_SCORE`)."""
        return np.asarray(score) < self.threshold

    def entry(self, score: float) -> dict:
        """The JSON entry of one image: {"score", "threshold", "flag", "method": "layers", "k", "layer_k"}."""
        return {"score": float(score), "threshold": self.threshold, "flag": bool(score < self.threshold),
                "method": FLAG_SCORE, "k": self.k, "layer_k": self.layer_k}


def _resolve(source):
    """(checkpoint, run folder or None) from a run folder, a checkpoint path or a loaded Checkpoint."""
    from .checkpoints import Checkpoint, load_checkpoint

    if isinstance(source, Checkpoint):
        return source, run_dir_of(source.path)
    ckpt = load_checkpoint(source)
    return ckpt, run_dir_of(source) or run_dir_of(ckpt.path)


def prepare(source, data, k: int = DEFAULT_K, log=print, run_dir=None, device=None) -> OODDetector:
    """The OOD detector of a run: its feature bank and threshold loaded from ``RUN/ood/`` when they match the
    checkpoint and the data, else built (and said why) and stored. ``source``: a run folder, a checkpoint
    path or a loaded :class:`~cifarlab.checkpoints.Checkpoint`; ``data``: the run's dataset
    (``cifarlab.data.load_stored(ckpt.meta["dataset"])``); ``run_dir``: where ``ood/`` goes when the
    checkpoint is not inside a run folder."""
    from .temperature import checkpoint_temperature
    from .transforms import Normalization

    ckpt, found = _resolve(source)
    run_dir = Path(run_dir) if run_dir is not None else found
    if run_dir is None:
        raise OODError(f"{ckpt.path}: not inside a run folder, so there is no place for its feature bank "
                       f"(pass the run folder: --run RUN)")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 10_000:
        raise OODError(f"k must be an integer in 1..10000, not {k!r}")
    model = ckpt.model.to(device) if device else ckpt.model
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    train = training_images(ckpt, data)
    bank_idx, hold_idx, what = bank_split(ckpt, len(train))
    layer_idx = layer_subset(bank_idx, ckpt)
    head = head_layer(model)
    layers = feature_layers(model)
    content_key = ((ckpt.meta.get("dataset") or {}).get("identity") or {}).get("content_sha256")
    expected = {"weights_sha256": ckpt.meta.get("weights_sha256"), "train_sha256": _tensor_sha256(train.images,
                                                                                                   train.labels),
                "content_key": content_key, "head": head, "normalization": normalization.to_dict(),
                "count": len(bank_idx), "layer_count": len(layer_idx)}
    folder = run_dir / OOD_DIR
    path = folder / BANK_FILE
    bank = None
    if os.path.lexists(path):
        try:
            bank = load_bank(path, expected)
            if not (torch.equal(bank.indices, bank_idx) and torch.equal(bank.holdout_indices, hold_idx)
                    and torch.equal(bank.layer_indices, layer_idx)):
                raise OODError(f"{path}: its images are not the run's bank/threshold split")
            if list(bank.layers) != layers:
                raise OODError(f"{path}: made for layers {list(bank.layers)[:4]}..., not the model's")
        except (OODError, V.ValidationError) as e:
            log(f"note: OOD feature bank not used, rebuilding it: {e}")
            bank = None
    if bank is None:
        bank = _build_bank(model, normalization, train, (bank_idx, hold_idx, layer_idx), layers, what, expected, k,
                           device, log)
        try:
            save_bank(path, bank)
        except OODError as e:  # a read-only run folder: the scores work, only the cache is lost
            log(f"note: {e}; the bank is used without being cached")
    else:
        log(f"OOD: feature bank {path} ({bank.info['count']:,} x {bank.info['dim']} training features) reused")
    if len(bank.features) < k:
        log(f"note: the feature bank holds {len(bank.features)} images, fewer than k = {k}; using k = "
            f"{len(bank.features)}")
        k = len(bank.features)
    bank_device = torch.device(device) if device else torch.device("cpu")
    features = bank.features.to(bank_device)
    layer_banks = {name: t.to(bank_device) for name, t in bank.layers.items()}
    layer_k = layer_k_for(k, len(bank.features), len(bank.layer_indices))
    threshold_info = _threshold(folder / THRESHOLD_FILE, bank, features, layer_banks, k, layer_k, log)
    return OODDetector(model=model, normalization=normalization, bank=features, k=k,
                       threshold=threshold_info["threshold"], temperature=checkpoint_temperature(ckpt.meta),
                       run_dir=run_dir, info=bank.info, threshold_info=threshold_info, device=device,
                       bank_indices=bank.indices, train=train, layer_banks=layer_banks, layer_k=layer_k,
                       standardize=threshold_info["standardize"])


def layer_subset(bank_idx: torch.Tensor, ckpt) -> torch.Tensor:
    """The per-layer banks' images: a seeded random :data:`LAYER_BANK_IMAGES` of the bank's (all of them when
    it holds fewer), in the bank's order."""
    if len(bank_idx) <= LAYER_BANK_IMAGES:
        return bank_idx.clone()
    seed = int((ckpt.meta.get("recipe") or {}).get("seed", 0) or 0)
    chosen = torch.randperm(len(bank_idx), generator=torch.Generator().manual_seed(seed))[:LAYER_BANK_IMAGES]
    return bank_idx[chosen.sort().values].clone()


def layer_k_for(k: int, bank_count: int, layer_count: int) -> int:
    """k scaled to the per-layer banks' size (the same fraction of the bank's neighbours), at least 1."""
    return max(1, min(layer_count, round(k * layer_count / max(1, bank_count))))


def _build_bank(model, normalization, train, split, layers, what, expected, k, device, log) -> Bank:
    import time

    bank_idx, hold_idx, layer_idx = split
    log(f"OOD: building the feature bank once: penultimate features of {len(bank_idx):,} training images, "
        f"{len(layers)} layers' pooled features of {len(layer_idx):,} of them, {len(hold_idx):,} held out for the "
        f"threshold ...")
    start = time.perf_counter()
    feats, pooled, _ = network_features(model, train.images, normalization, layers, device=device)
    if not bool(torch.isfinite(feats).all()) or not all(bool(torch.isfinite(p).all()) for p in pooled.values()):
        raise OODError("the model's features hold NaN or infinite values; no feature bank")
    feats = normalize_rows(feats)
    pooled = {name: normalize_rows(p) for name, p in pooled.items()}
    log(f"OOD: {len(train):,} images in {time.perf_counter() - start:.1f} s")
    info = dict(expected, dim=int(feats.shape[1]), k=k,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                holdout={"count": len(hold_idx), "what": what},
                layers=[{"name": name, "dim": int(p.shape[1])} for name, p in pooled.items()])
    return Bank(feats[bank_idx].contiguous(), bank_idx, feats[hold_idx].contiguous(), hold_idx, info, layer_idx,
                {name: p[layer_idx].contiguous() for name, p in pooled.items()},
                {name: p[hold_idx].contiguous() for name, p in pooled.items()})


def _threshold(path: Path, bank: Bank, features: torch.Tensor, layer_banks: dict, k: int, layer_k: int, log) -> dict:
    """The stored threshold if it is for this bank, k and TPR; else fitted on the held-out images (not in the
    bank): each layer's KNN scores standardized by their mean and sd there, the 5th percentile of min-z."""
    want = {"k": k, "layer_k": layer_k, "tpr": TPR, "weights_sha256": bank.info["weights_sha256"],
            "bank_sha256": bank.info["tensors_sha256"], "score": FLAG_SCORE}
    if os.path.lexists(path):
        try:
            stored = V.check_ood_threshold(V.load_json_file(path, "OOD threshold", OODError), path, OODError)
            if all(stored.get(key) == value for key, value in want.items()) and \
                    list(stored["standardize"]) == [*layer_banks, "penultimate"]:
                return stored
            changed = next((key for key, value in want.items() if stored.get(key) != value), "layers")
            log(f"note: {path} was fitted for another {changed}; fitting it again")
        except (OODError, V.ValidationError) as e:
            log(f"note: OOD threshold not used, fitting it again: {e}")
    per_layer = {name: knn_scores(bank.holdout_layers[name].to(b.device), b, layer_k) for name, b in layer_banks.items()}
    per_layer["penultimate"] = knn_scores(bank.holdout_features.to(features.device), features, k)
    standardize = {name: [float(v.mean()), max(float(v.std()), 1e-6)] for name, v in per_layer.items()}
    scores = min_z(per_layer, standardize)
    threshold = fit_threshold(scores)
    knn_threshold = fit_threshold(per_layer["penultimate"])
    entry = dict(want, format=THRESHOLD_FORMAT, threshold=threshold, accepted=float((scores >= threshold).mean()),
                 standardize=standardize, knn_threshold=knn_threshold,
                 fitted_on=len(scores), fitted_on_what=bank.info["holdout"]["what"],
                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    from .fsutil import atomic_write_json

    try:
        atomic_write_json(path, entry)
    except OSError as e:
        log(f"note: could not store the OOD threshold ({V.os_error_message(e, path)}); it is used without being "
            f"stored")
    log(f"OOD: all-layers KNN threshold {threshold:.4f} (k = {k} penultimate, {layer_k} per layer over "
        f"{len(layer_banks)} layers; accepts {100 * entry['accepted']:.1f}% of {len(scores):,} held-out images not "
        f"in the bank) -> {path}")
    return entry


# ---------------------------------------------------------------------------------------------------
# OOD test sets and the evaluation


def gaussian_noise(n: int, shape, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 images of i.i.d. Gaussian pixels, mean 0.5 and standard deviation 1 in 0..1 units,
    clipped to 0..1 (Hendrycks & Gimpel 2017's "Gaussian" set), seeded."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + torch.randn((n, *shape), generator=g, dtype=torch.float64)
    return torch.round(255 * x.clamp(0, 1)).to(torch.uint8)


def permuted_pixels(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Every image's pixel positions shuffled by one fixed (seeded) permutation; colours stay together."""
    n, c, h, w = images.shape
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
    return images.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w).contiguous()


def load_ood_set(spec: str, ckpt, data, seed: int = 0, download: bool = False,
                 log=print) -> tuple[str, str, torch.Tensor]:
    """(name, description, uint8 images) of one OOD set: ``noise``, ``permuted``, ``folder:PATH`` (or a
    folder's path: its photos, train and test, fitted like the run's data) or another dataset's name
    (its test images)."""
    from .data import load_dataset, parse_spec, stored_options
    from .data.base import user_path

    n = min(len(data.test), MAX_GENERATED)
    shape = tuple(data.test.images.shape[1:])
    if spec == "noise":
        return "noise", f"{n} Gaussian-noise images (mean 0.5, sd 1 in 0..1 units, clipped; seed {seed})", \
            gaussian_noise(n, shape, seed)
    if spec == "permuted":
        return "permuted", f"the first {n} test images with their pixels shuffled by one permutation (seed {seed})", \
            permuted_pixels(data.test.images[:n], seed)
    if ":" not in spec and user_path(spec, "--ood ").is_dir():
        spec = f"folder:{spec}"
    try:
        name, _ = parse_spec(spec)
    except DataError:
        raise OODError(f"unknown OOD set {spec!r}: use noise, permuted, folder:PATH (or a folder) or a dataset "
                       f"name") from None
    options = {}
    if name == "folder":
        fitted = stored_options(ckpt.meta.get("dataset") or {})
        options = {"image_size": fitted["image_size"], "fit": fitted["fit"], "log": log}
    ds = load_dataset(spec, download=download, progress=False, **options)
    for note in ds.notes[:5]:
        log(f"note: {note}")
    images = torch.cat([ds.train.images, ds.test.images]) if name == "folder" else ds.test.images
    if tuple(images.shape[1:]) != shape:
        raise OODError(f"{spec}: images are {tuple(images.shape[1:])}, the model takes {shape}")
    what = "photos (train and test), fitted like the run's data" if name == "folder" else "test images"
    return spec, f"{len(images)} {what}", images


def evaluate_ood(detector: OODDetector, test_images: torch.Tensor, sets, out_dir, seed: int = 0,
                 dataset: str = "", resamples: int = BOOTSTRAP_RESAMPLES, log=print) -> tuple[dict, dict]:
    """AUROC and FPR at 95% TPR of each score, in-distribution = ``test_images`` (positives), against each
    OOD set ``(name, description, images)``; bootstrap 95% intervals (``resamples``, seeded) for sets
    smaller than :data:`BOOTSTRAP_BELOW`. Writes ``ood.json`` and the score histograms (``ood_scores.png``)
    into ``out_dir``; returns (results, files)."""
    from .fsutil import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    id_scores = detector.score(test_images)
    results = {"in_distribution": {"dataset": dataset, "split": "test", "images": int(len(test_images)),
                                   "accepted_at_threshold": float((id_scores[FLAG_SCORE] >= detector.threshold).mean())},
               "positive": "in-distribution (higher score = more in-distribution)",
               "scores": {"layers": f"min over layers of the standardized KNN score (k = {detector.layer_k} per conv "
                                    f"layer or block, {detector.k} penultimate): the flag's score",
                          "knn": f"-(distance to the {detector.k}-th nearest normalised training feature)",
                          "msp": "max softmax probability" + (f" at T = {detector.temperature:.4f}"
                                                              if detector.temperature else ""),
                          "energy": "logsumexp(logits) (T = 1)"},
               "k": detector.k, "threshold": detector.threshold_info, "temperature": detector.temperature,
               "tta": 0, "sets": []}
    all_scores = [("test (in-distribution)", id_scores)]
    for name, description, images in sets:
        ood = detector.score(images)
        small = len(images) < BOOTSTRAP_BELOW
        entry = {"name": name, "description": description, "images": int(len(images)),
                 "flagged_at_threshold": float(detector.flags_of(ood[FLAG_SCORE]).mean()),
                 "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95} if small else None,
                 "metrics": {}}
        for score in SCORES:
            pos, neg = id_scores[score], ood[score]
            m = {"auroc": auroc(pos, neg), "fpr_at_95_tpr": fpr_at_tpr(pos, neg)}
            if small:
                m["auroc_ci95"] = bootstrap_ci(pos, neg, auroc, resamples, seed)
                m["fpr_at_95_tpr_ci95"] = bootstrap_ci(pos, neg, fpr_at_tpr, resamples, seed)
            entry["metrics"][score] = m
        results["sets"].append(entry)
        all_scores.append((name, ood))
        log(f"OOD {name}: " + ", ".join(f"{SCORE_NAMES[s]} AUROC {entry['metrics'][s]['auroc']:.4f}" for s in SCORES)
            + f"; {100 * entry['flagged_at_threshold']:.1f}% flagged")
    files = {"ood": out_dir / RESULTS_FILE,
             "ood_histograms": score_histograms(all_scores, detector.threshold, out_dir / HISTOGRAM_FILE)}
    results["histograms"] = HISTOGRAM_FILE
    atomic_write_json(files["ood"], results)
    return results, {key: str(value) for key, value in files.items()}


def score_histograms(named_scores, threshold: float, path) -> Path:
    """One panel per score: the in-distribution test set and each OOD set (density histograms)."""
    from .plots import pyplot, save_figure

    fig, axes = pyplot().subplots(1, len(SCORES), figsize=(5 * len(SCORES), 3.6))
    for ax, score in zip(axes, SCORES):
        values = np.concatenate([s[score] for _, s in named_scores])
        lo, hi = (float(v) for v in np.quantile(values, [0.002, 0.998]))  # a few outliers do not squash the rest
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
        for i, (name, s) in enumerate(named_scores):
            clipped = np.clip(s[score], bins[0], bins[-1])
            if i == 0:
                ax.hist(clipped, bins=bins, density=True, alpha=0.5, color="0.55", label=name)
            else:
                ax.hist(clipped, bins=bins, density=True, histtype="step", linewidth=1.6,
                        color=f"C{(i - 1) % 7}", label=name)
        if score == FLAG_SCORE:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold (95% TPR)")
        ax.set_title(f"{SCORE_NAMES[score]} score (higher = more in-distribution)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def summary(results: dict) -> str:
    lines = [f"OOD detection (in-distribution: {results['in_distribution']['images']:,} test images; the flag: "
             f"all-layers KNN, threshold {results['threshold']['threshold']:.4f} accepts "
             f"{100 * results['in_distribution']['accepted_at_threshold']:.1f}% of them):"]
    for s in results["sets"]:
        parts = []
        for score in SCORES:
            m = s["metrics"][score]
            ci = (f" [{m['auroc_ci95'][0]:.3f}, {m['auroc_ci95'][1]:.3f}]" if "auroc_ci95" in m else "")
            parts.append(f"{SCORE_NAMES[score]} AUROC {m['auroc']:.4f}{ci} FPR@95 {100 * m['fpr_at_95_tpr']:.1f}%")
        lines.append(f"  {s['name']} ({s['images']:,} images; {100 * s['flagged_at_threshold']:.1f}% flagged): "
                     + "; ".join(parts))
    return "\n".join(lines)
