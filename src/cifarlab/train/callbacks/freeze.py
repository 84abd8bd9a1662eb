"""fastai's freeze-then-unfreeze (``--freeze-epochs N``): during the first N epochs only the head and
BatchNorm learn (see :func:`cifarlab.finetune.body_parameters`); afterwards everything does. Frozen
parameters get no gradient, so the optimizer leaves them alone (no step, no weight decay, no momentum)."""
from __future__ import annotations

from ...finetune import body_parameters
from ..loop import Callback


class FreezeBody(Callback):
    def __init__(self, model, epochs: int, log=print):
        self.body, self.epochs, self.log = body_parameters(model), epochs, log

    def epoch_start(self, t) -> None:
        frozen = t.epoch < self.epochs
        if t.epoch == self.epochs and t.step == 0:
            self.log(f"  unfreezing: every layer trains from epoch {t.epoch + 1}")
        for p in self.body:
            p.requires_grad_(not frozen)
