"""EMA: validation and the final model use an exponential moving average of the weights (``--ema DECAY``).

Averaged: every floating-point entry of the model's state (weights and BatchNorm running statistics, as
timm's ModelEmaV2 does); integer buffers are copied. The decay warms up as TensorFlow's
ExponentialMovingAverage with ``num_updates`` does, ``min(decay, (1 + n) / (10 + n))`` after n updates,
so the first averages are not dominated by the random initial weights on short runs (the fast preset
takes ~600 steps; a plain 0.999 would still hold 55% of the initialization after them).
State in checkpoints: the averaged tensors and the update count, so a resumed run averages exactly as an
uninterrupted one.
"""
from __future__ import annotations

import copy

import torch

from ..loop import Callback
from ..statedict import checked_int, checked_tensor


class EMA(Callback):
    key = "ema"
    order = 0  # after lookahead (-10) has moved the weights, before early stopping snapshots them

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    def fit_start(self, t) -> None:
        # The live tensors are looked up now, after resume and any SyncBatchNorm conversion.
        live, averaged = t.model.state_dict(), self.model.state_dict()
        self.floats = [(averaged[k], v) for k, v in live.items() if v.is_floating_point()]
        self.others = [(averaged[k], v) for k, v in live.items() if not v.is_floating_point()]
        t.eval_model = self.model

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def after_step(self, t) -> None:
        weight = 1.0 - self.current_decay()
        self.updates += 1
        torch._foreach_lerp_([a for a, _ in self.floats], [v for _, v in self.floats], weight)
        for averaged, value in self.others:
            averaged.copy_(value)

    def state_dict(self) -> dict:
        return {"updates": self.updates, **{f"w.{k}": v for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = checked_int(state, "updates", 0, 1 << 62)
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                value.copy_(checked_tensor(state, f"w.{name}", value))
