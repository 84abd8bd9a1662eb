"""MixUp and CutMix (``--mixup ALPHA``, ``--cutmix ALPHA``): each training batch is replaced by a mixed
one with soft targets (see :mod:`cifarlab.mixing`). The loss's label smoothing applies on top of them.
Draws come from torch's global RNG, whose state every checkpoint keeps: a resumed run mixes the same way."""
from __future__ import annotations

from ...mixing import mix_batch
from ..loop import Callback


class MixBatches(Callback):
    def __init__(self, num_classes: int, mixup: float, cutmix: float):
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix

    def batch_start(self, t) -> None:
        x, y = t.batch
        t.batch = mix_batch(x, y, self.num_classes, mixup_alpha=self.mixup, cutmix_alpha=self.cutmix)
