"""Stopping at a resumable point: Ctrl-C / SIGTERM (checkpoint, then stop; a second Ctrl-C gives up
waiting) and a step budget for this call (``max_steps``, for tests and benchmarks)."""
from __future__ import annotations

import signal

from ..loop import Callback


class StopOnSignal(Callback):
    def __init__(self):
        self._previous: dict = {}

    def fit_start(self, t) -> None:
        def handler(signum, frame):
            if t.interrupt_requested:  # second Ctrl-C: give up waiting
                raise KeyboardInterrupt
            t.interrupt_requested = True  # the loop stops at its next agreement point

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass

    def fit_end(self, t) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class MaxSteps(Callback):
    def __init__(self, steps: int):
        self.steps = steps

    def after_step(self, t) -> None:
        if t.steps_done >= self.steps and t.stop is None:
            t.stop = "max_steps"
