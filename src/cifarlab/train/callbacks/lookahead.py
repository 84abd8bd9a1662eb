"""airbench's lookahead as a callback (the ``lookahead`` recipe setting)."""
from __future__ import annotations

import torch

from ..loop import Callback
from ..statedict import checked_tensor


class Lookahead(Callback):
    """Every few steps the weights (and BatchNorm statistics) move to a slow copy that has been pulled toward
    them by ``1 - decay``; decay grows as 0.95**5 * progress**3, so early training is untouched and the end
    averages over the last steps. The last step adopts the slow copy. Its state: the slow copy."""

    key = "lookahead"
    order = -10  # before EMA and everything that reads the weights after a step

    def __init__(self, model: torch.nn.Module, every: int, total_steps: int):
        self.every, self.total_steps = every, total_steps
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def after_step(self, t) -> None:
        self.step(t.model, t.global_step)

    def step(self, model: torch.nn.Module, global_step: int) -> None:
        if global_step % self.every == 0:
            self._pull(model, 0.95 ** 5 * min(1.0, global_step / self.total_steps) ** 3)
        if global_step == self.total_steps:
            self._pull(model, 1.0)

    @torch.no_grad()
    def _pull(self, model: torch.nn.Module, decay: float) -> None:
        for name, value in model.state_dict().items():
            if name in self.slow:
                self.slow[name].lerp_(value, 1 - decay)
                value.copy_(self.slow[name])

    def state_dict(self) -> dict:
        return dict(self.slow)

    def load_state_dict(self, state: dict) -> None:
        for name, value in self.slow.items():
            value.copy_(checked_tensor(state, name, value))

