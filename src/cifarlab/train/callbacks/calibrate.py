"""Temperature scaling at the end of a complete run, on its held-out training images (``--val-split``),
never on the test set; the entry goes into the final checkpoint's meta (see :mod:`cifarlab.temperature`)."""
from __future__ import annotations

from ...temperature import fit_on_logits
from ..loop import Callback


class FitTemperature(Callback):
    order = 80  # after early stopping has restored the best weights

    def __init__(self, log=print):
        self.log = log

    def fit_end(self, t) -> None:
        if not (t.finished and t.dist.is_main):
            return
        logits = t.validation_logits(t.recipe.tta)
        entry = fit_on_logits(logits, t.val_split.labels, t.recipe.tta)
        self.log(f"temperature {entry['temperature']:.3f} fitted on {entry['fitted_on']}: ECE "
                 f"{100 * entry['ece_before']:.2f}% -> {100 * entry['ece_after']:.2f}%, NLL "
                 f"{entry['nll_before']:.4f} -> {entry['nll_after']:.4f}")
        t.final_meta["calibration"] = entry
