"""The console: a line per epoch (learning rate, then losses and accuracies) and, on a terminal, a progress bar."""
from __future__ import annotations

import sys
import time

from ..loop import Callback


class ConsoleProgress(Callback):
    order = 90  # after the callbacks that change the row (early stopping notes, EMA)

    def __init__(self, log=print, bar: bool = True, mixed_batches: bool = False):
        self.log, self.want_bar, self.bar = log, bar, None
        # MixUp/CutMix: training accuracy is against each mixed image's dominant label; say so.
        self.acc_label = "acc (mixed)" if mixed_batches else "acc"

    def epoch_start(self, t) -> None:
        self.log(f"Epoch {t.epoch + 1}/{t.recipe.epochs}  learning rate: {t.lr_at(t.epoch, t.step):.6g}")
        self.bar = _bar(t.spe, t.step, f"epoch {t.epoch + 1}/{t.recipe.epochs}",
                        self.want_bar and t.dist.is_main)

    def after_step(self, t) -> None:
        if self.bar is None:
            return
        step = t.step - 1
        if step % 20 == 0 or t.step == t.spe:
            t.check_finite()
            rate = t.seen * t.dist.world / max(time.perf_counter() - t.epoch_started, 1e-9)
            self.bar.set_postfix_str(f"loss {float(t.loss_sum) / t.seen:.4f} {self.acc_label} "
                                     f"{float(t.correct) / t.seen:.4f} {rate:.0f} img/s", refresh=False)
        self.bar.update(1)

    def eval_start(self, t) -> None:
        self._close()

    def eval_end(self, t) -> None:
        row = t.row
        if "val_acc" in row:
            self.log(f"  train loss {row['train_loss']:.4f} {self.acc_label} {row['train_acc']:.4f} | val loss "
                     f"{row['val_loss']:.4f} acc {row['val_acc']:.4f} | {row['seconds']:.1f} s, "
                     f"{row['images_per_s']:.0f} img/s")

    def fit_end(self, t) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _bar(total: int, initial: int, desc: str, enabled: bool):
    # In a log file (stderr not a terminal) a bar is hundreds of \r frames: the per-epoch lines say it all.
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)
