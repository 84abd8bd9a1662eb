"""Adaptive CPU threads during training (see :mod:`cifarlab.threads`): only training steps are timed;
validation and checkpoints pause the clock. The thread count the run started with comes back at the end."""
from __future__ import annotations

import torch

from ...threads import AdaptiveThreads
from ..loop import Callback


class AdaptiveThreadsCallback(Callback):
    def __init__(self, max_threads: int, log=print):
        self.max_threads, self.log, self.policy = max_threads, log, None

    def fit_start(self, t) -> None:
        # Built here, not before: the policy starts at one thread, and resume and set-up should not.
        self.policy = AdaptiveThreads(self.max_threads, log=self.log)

    def after_step(self, t) -> None:
        self.policy.step_done(len(t.batch[1]))

    def checkpoint(self, t) -> None:
        self.policy.pause()

    def eval_start(self, t) -> None:
        self.policy.pause()

    def fit_end(self, t) -> None:
        if self.policy is not None:
            self.log(self.policy.describe())
        torch.set_num_threads(self.max_threads)
