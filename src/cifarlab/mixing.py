"""MixUp and CutMix: blend pairs of training images in a batch and give them soft (B, C) targets.

- MixUp (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"): x = lam x_i + (1 - lam) x_j,
  targets likewise, lam ~ Beta(alpha, alpha).
- CutMix (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
  Features"; the box as in its reference code, github.com/clovaai/CutMix-PyTorch ``rand_bbox``): a box of
  side ratio sqrt(1 - lam) at a uniformly random centre, clipped to the image, pasted from the partner;
  lam is then recomputed from the clipped box, so the targets weigh each image by its visible area.
- Both on: each batch uses one of the two with probability 0.5, as timm's ``Mixup`` does (its
  ``switch_prob``, default 0.5).

The partner of image i is image perm[i] of the same batch, perm a random permutation. Every draw (lam,
perm, box, switch) comes from torch's global CPU generator, whatever the batch's device: that is the
state training checkpoints save (``torch.get_rng_state``), so a resumed run mixes exactly as an
uninterrupted one, and the same seed mixes the same way on a CPU and a GPU.

``F.cross_entropy`` takes the soft targets directly and applies its label smoothing to them too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 labels (B,) -> float32 one-hot (B, C)."""
    return F.one_hot(y, num_classes).float()


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp: (lam x + (1 - lam) x[perm], the same blend of one-hot targets, lam)."""
    lam, perm = _beta(alpha), _partners(len(x), x.device)
    # A Python float keeps x's dtype (bf16 stays bf16) and elementwise ops keep its memory format.
    mixed = x * lam + x[perm] * (1.0 - lam)
    return mixed, _blend(y, perm, num_classes, lam), lam


def cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix: (x with a box of x[perm] pasted in, targets by area, lam = the fraction of x left)."""
    lam, perm = _beta(alpha), _partners(len(x), x.device)
    h, w = x.shape[-2:]
    top, bottom, left, right = _box(h, w, lam)
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)  # the clipped box, not the drawn one
    mixed = x.clone()  # clone keeps the memory format (channels_last stays channels_last)
    mixed[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
    return mixed, _blend(y, perm, num_classes, lam), lam


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as training feeds it: MixUp or CutMix (one of them per batch, chosen with probability 0.5,
    when both alphas are set), soft float (B, C) targets; ``(x, y)`` unchanged when both alphas are 0."""
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = bool(torch.rand(()) < 0.5)
    elif mixup_alpha > 0 or cutmix_alpha > 0:
        use_cutmix = cutmix_alpha > 0
    else:
        return x, y
    mixed, targets, _ = cutmix(x, y, num_classes, cutmix_alpha) if use_cutmix else \
        mixup(x, y, num_classes, mixup_alpha)
    return mixed, targets


def dominant_labels(targets: torch.Tensor) -> torch.Tensor:
    """The label with the largest weight in each row of soft targets (int64 labels pass through), for a
    training accuracy against the dominant label of each mixed image."""
    return targets if targets.ndim == 1 else targets.argmax(1)


def _beta(alpha: float) -> float:
    a = torch.tensor(float(alpha))
    return float(torch.distributions.Beta(a, a).sample())


def _partners(n: int, device: torch.device) -> torch.Tensor:
    return torch.randperm(n).to(device)  # drawn on the CPU: see the module docstring


def _box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of CutMix's box: side ratio sqrt(1 - lam), uniform centre, clipped."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = (int(v) for v in (torch.randint(h, ()), torch.randint(w, ())))
    return max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)


def _blend(y: torch.Tensor, perm: torch.Tensor, num_classes: int, lam: float) -> torch.Tensor:
    onehot = soft_targets(y, num_classes)
    return onehot * lam + onehot[perm] * (1.0 - lam)
