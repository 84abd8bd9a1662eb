"""airbench's whitening bias: trained during the first ``whiten_bias_epochs`` epochs, then frozen."""
from __future__ import annotations

from ..loop import Callback


class WhitenBiasEpochs(Callback):
    def __init__(self, biases: list, epochs: int):
        self.biases, self.epochs = biases, epochs

    def epoch_start(self, t) -> None:
        for bias in self.biases:
            bias.requires_grad_(t.epoch < self.epochs)


def whitening_biases(model) -> list:
    from ...models import Whiten

    return [m.bias for m in model.modules() if isinstance(m, Whiten)]
