"""Adaptive CPU thread count for training: hold up when something else runs on the machine.

PyTorch's CPU kernels split each op across ``torch.get_num_threads()`` OpenMP workers that wait for each
other at the end of every op. When another process takes one of the cores, the worker sharing it runs at
half speed and every op waits for it: on 2 cores with one competing busy loop, the exercise net trained
at 36% of its quiet rate with 2 threads, while one thread was not slowed down at all (issue 13).

:class:`AdaptiveThreads` measures what each thread count achieves and keeps the fastest:

1. after a few warm-up steps (at one thread) it times every count of the ladder (1, 2, ..., all cores)
   for a few steps each (the mean time per image, so stalls count; the first steps after a switch are
   discarded) and keeps the fastest; more threads win ties within ``margin``. A count whose first
   ``early`` steps are already ``abandon`` x slower than the best count timed so far is dropped at once:
   under load the slow count costs 3 steps, not 8;
2. it then watches the median time per image over a window of steps. A median above ``jump`` x the best
   seen at this count (something started running) triggers a re-probe of the neighbouring counts;
3. every ``recheck`` steps it re-probes the neighbours anyway (the competitor may have stopped: one
   thread is not faster when the machine gets quiet, so only trying more threads finds out). A re-probe
   that confirms the current count doubles the interval (up to ``max_recheck``); a switch resets it.

Cost on a quiet machine: the probes of the slower count, about 10 steps at ~1.4x per re-check (well under
1% of a run). The policy is pure logic over a clock and a setter, so it is tested with a fake clock.

Thread count does change floating-point reduction order: the exercise net's gradients with 1 and 2
threads differ in the last bits (tests/test_threads.py). So adaptive threads trade bitwise
reproducibility across runs for speed; it is the command line's default for CPU training without
``--threads`` (measured: bench/results/contention*.txt), and off when ``--threads N`` or
``--no-adaptive-threads`` is given (a fixed count is bitwise reproducible) and in the library's ``train()``
unless asked for.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable


def ladder(max_threads: int) -> list[int]:
    """Candidate counts, most first: n, n/2, n/4, ..., 1."""
    counts, n = [], max(1, int(max_threads))
    while n >= 1:
        counts.append(n)
        if n == 1:
            break
        n //= 2
    return counts


class AdaptiveThreads:
    def __init__(self, max_threads: int, set_threads: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, log: Callable[[str], None] | None = None,
                 warmup: int = 5, settle: int = 2, probe: int = 8, window: int = 30, jump: float = 1.3,
                 margin: float = 0.05, recheck: int = 400, max_recheck: int = 3200, early: int = 3,
                 abandon: float = 1.5):
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.candidates = ladder(max_threads)
        self._set, self.clock, self.log = set_threads, clock, log or (lambda message: None)
        self.warmup, self.settle, self.probe, self.window = warmup, settle, probe, window
        self.jump, self.margin, self.base_recheck, self.max_recheck = jump, margin, recheck, max_recheck
        self.early, self.abandon = min(early, probe), abandon
        self.recheck = recheck
        # Warm-up steps run at one thread: under load a many-thread step can take 20x longer (measured with
        # two busy loops on 2 cores: 17.5 s per 1,000 images at 2 threads vs 1.3 at 1), on a quiet machine
        # five slower steps cost ~0.05 s.
        self.threads = self.candidates[-1]
        self.best: dict[int, float] = {}   # best (lowest) window median of seconds per image seen per count
        self.steps = 0                      # steps observed
        self.switches = 0
        self.steps_at: dict[int, int] = {}  # steps run at each count
        self._last: float | None = None
        self._queue: list[int] = []         # counts still to probe
        self._probe_times: list[float] = []
        self._probe_results: dict[int, float] = {}
        self._probing: int | None = None    # count being probed
        self._skip = 0
        self._recent: deque[float] = deque(maxlen=window)
        self._since_check = 0
        self._set(self.threads)

    # -- what the training loop calls -----------------------------------------------------------------

    def step_done(self, images: int) -> None:
        """After each training step (``images`` in it): time it and maybe change the thread count."""
        now = self.clock()
        last, self._last = self._last, now
        self.steps += 1
        self.steps_at[self.threads] = self.steps_at.get(self.threads, 0) + 1
        if last is None or images <= 0:
            return
        per_image = (now - last) / images
        if self.steps <= self.warmup:
            return
        if self._skip:
            self._skip -= 1
            return
        if self._probing is not None:
            self._probe_step(per_image)
        elif not self.best:
            # the first measurement of every count, fewest threads first: under load the slow counts
            # (the many-thread ones) are then recognized early against a fast reference
            self._start_probe(list(reversed(self.candidates)), keep=None)
        else:
            self._run_step(per_image)
        # (the last timestamp is taken after any switch: its cost lands in the discarded settle steps)
        self._last = self.clock()

    def pause(self) -> None:
        """Before anything that is not a training step (validation, a checkpoint): the next interval is
        not timed."""
        self._last = None

    def describe(self) -> str:
        at = ", ".join(f"{n} thread{'s' if n > 1 else ''}: {s} steps" for n, s in sorted(self.steps_at.items(),
                                                                                         reverse=True))
        return f"adaptive threads, now {self.threads} ({self.switches} switches; {at})"

    # -- internals -----------------------------------------------------------------------------------

    def _switch(self, n: int) -> None:
        if n != self.threads:
            self.threads = n
            self._set(n)
        self._skip = self.settle

    def _start_probe(self, counts: list[int], keep: float | None) -> None:
        """Time each of ``counts`` for ``probe`` steps; ``keep``: the current count's recent median."""
        self._probe_results = {} if keep is None else {self.threads: keep}
        self._queue = [n for n in counts if n not in self._probe_results]
        # the first probe decides against the default (all cores), whatever count warmed up
        self._origin = self.threads if keep is not None else self.candidates[0]
        self._next_probe()

    def _next_probe(self) -> None:
        if not self._queue:
            self._probing = None
            self._finish_probe()
            return
        self._probing = self._queue.pop(0)
        self._probe_times = []
        self._switch(self._probing)

    def _probe_step(self, per_image: float) -> None:
        self._probe_times.append(per_image)
        done = len(self._probe_times) >= self.probe
        if not done and len(self._probe_times) == self.early and self._probe_results:
            done = statistics.fmean(self._probe_times) > self.abandon * min(self._probe_results.values())
        if done:
            # The mean, not the median: throughput is total images / total time, and under load the cost of
            # many threads is in the stalls (a step whose barrier waits for a descheduled thread), which a
            # median hides: with two busy loops a median said 2 threads beat 1, and the run then went at
            # 60% of one thread's speed.
            mean = statistics.fmean(self._probe_times)
            self._probe_results[self._probing] = mean
            self.best[self._probing] = min(self.best.get(self._probing, mean), mean)
            self._next_probe()

    def _finish_probe(self) -> None:
        results = self._probe_results
        fastest = min(results.values())
        # the most threads within `margin` of the fastest (ties go to more threads)
        choice = max(n for n, t in results.items() if t <= fastest * (1 + self.margin))
        origin = self._origin
        if origin in results and results[origin] <= results[choice] * (1 + self.margin):
            choice = origin  # hysteresis: stay unless clearly faster elsewhere
        if choice != origin:
            self.switches += 1
            self.recheck = self.base_recheck
            self.log(f"threads: {origin} -> {choice} (seconds per 1,000 images: "
                     + ", ".join(f"{n} threads {t * 1000:.3g}" for n, t in sorted(results.items(), reverse=True))
                     + ")")
        else:
            self.recheck = min(self.recheck * 2, self.max_recheck)
        for n, t in results.items():  # the new reference: what each count achieves now
            self.best[n] = t
        self._recent.clear()
        self._since_check = 0
        self._switch(choice)

    def _neighbours(self) -> list[int]:
        i = self.candidates.index(self.threads)
        return [self.candidates[j] for j in (i + 1, i - 1) if 0 <= j < len(self.candidates)]

    def _run_step(self, per_image: float) -> None:
        self._recent.append(per_image)
        self._since_check += 1
        if len(self._recent) < self.window:
            if self._since_check >= self.recheck and self._recent:
                self._start_probe(self._neighbours(), keep=statistics.median(self._recent))
            return
        median = statistics.median(self._recent)
        reference = self.best.get(self.threads, median)
        if median > self.jump * reference:  # slower than this count was: something else runs now
            self._start_probe(self._neighbours(), keep=median)
        elif self._since_check >= self.recheck:
            self._start_probe(self._neighbours(), keep=median)
        else:
            self.best[self.threads] = min(reference, median)
            if self._since_check % self.window == 0:
                self._recent.clear()  # non-overlapping windows: a jump is judged on fresh steps
