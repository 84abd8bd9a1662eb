"""Reporting each epoch's validation accuracy to a hyperparameter search, which may stop the run early.

``RunOptions.trial`` is anything with Optuna's trial interface, ``report(value, step)`` and
``should_prune()`` (an ``optuna.Trial``; this module does not import Optuna). After each epoch's validation
the accuracy is reported with the epoch as the step; when the search's pruner (successive halving,
Hyperband, median) says the trial is not worth finishing, the run stops at that epoch's checkpoint, as a
resumable stop (not a finished run: no ``final/``), and writes ``pruned.json`` into the run folder, so the
folder says why it has no final model. The search then records the trial as pruned
(``cifarlab.sweep`` raises ``optuna.TrialPruned``).
"""
from __future__ import annotations

from pathlib import Path

from ...fsutil import atomic_write_json
from ..loop import Callback

PRUNED_FILE = "pruned.json"


class ReportToTrial(Callback):
    order = 20  # after EMA and early stopping: the row holds the accuracy of the weights that are evaluated

    def __init__(self, trial, run_dir: Path, log=print):
        self.trial, self.run_dir, self.log = trial, Path(run_dir), log
        self.pruned_at: int | None = None

    def eval_end(self, t) -> None:
        if not t.dist.is_main or "val_acc" not in t.row:
            return
        epoch, accuracy = t.row["epoch"], float(t.row["val_acc"])
        self.trial.report(accuracy, epoch)
        if epoch < t.recipe.epochs and self.trial.should_prune():
            self.pruned_at = epoch
            self.log(f"  pruned by the search after epoch {epoch} (validation accuracy {accuracy:.4f})")
            # "max_steps" is the loop's resumable stop: it ends after this epoch's checkpoint, unfinished.
            t.stop = t.stop or "max_steps"

    def fit_end(self, t) -> None:
        if self.pruned_at is not None and t.dist.is_main:
            row = t.history[self.pruned_at - 1]
            atomic_write_json(self.run_dir / PRUNED_FILE, {"pruned_at_epoch": self.pruned_at,
                                                           "epochs": t.recipe.epochs, "val_acc": row["val_acc"]})
