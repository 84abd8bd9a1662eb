"""Early stopping on the validation split (``--early-stop PATIENCE``), keeping the best epoch's weights.

The weights evaluated at the best epoch (the EMA's when ``--ema`` is on) are kept in memory and restored
at the end of every complete run, whether it stopped early or ran all its epochs (a restore that happens
only when the patience runs out leaves a run that peaked earlier with its last weights, a known trap of
early-stopping callbacks). ``best``, ``wait`` and the best weights are in every checkpoint, so a resumed
run counts patience exactly as an uninterrupted one. Improvement means a strictly higher validation
accuracy.
"""
from __future__ import annotations

import torch

from ..loop import Callback
from ..statedict import checked_float, checked_int, checked_tensor


class EarlyStopping(Callback):
    key = "early_stop"
    order = 10  # after EMA has updated the weights that are evaluated

    def __init__(self, model: torch.nn.Module, patience: int, log=print):
        self.patience, self.log = patience, log
        self.reference = {k: v.detach() for k, v in model.state_dict().items()}  # shapes and dtypes to check
        self.best: float | None = None
        self.best_epoch, self.wait = 0, 0
        self.weights: dict[str, torch.Tensor] | None = None

    def fit_start(self, t) -> None:
        t.same_tta_every_epoch = True  # the epochs it compares must be measured alike
        if self.best_epoch > len(t.history):
            raise ValueError(f"the checkpoint's early-stopping state is damaged: best epoch {self.best_epoch} is past "
                             f"the {len(t.history)} epochs run")
        if self.best is not None and self.wait >= self.patience:
            t.stop = "early_stop"  # it had stopped before the run was interrupted: finish, do not train on

    def eval_end(self, t) -> None:
        if not t.dist.is_main:
            return
        accuracy = t.row["val_acc"]
        if self.best is None or accuracy > self.best:
            self.best, self.best_epoch, self.wait = accuracy, t.row["epoch"], 0
            self.weights = {k: v.detach().clone() for k, v in t.eval_model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience and t.epoch + 1 < t.recipe.epochs:
            self.log(f"  early stop: validation accuracy has not improved for {self.wait} epochs (best "
                     f"{self.best:.4f} at epoch {self.best_epoch})")
            t.stop = t.stop or "early_stop"

    def fit_end(self, t) -> None:
        if not (t.finished and t.dist.is_main and self.weights is not None):
            return
        last = t.history[-1]["epoch"]
        if self.best_epoch != last:
            t.eval_model.load_state_dict(self.weights)
            self.log(f"restored the weights of epoch {self.best_epoch} (validation accuracy {self.best:.4f}; the last "
                     f"epoch, {last}, had {t.history[-1]['val_acc']:.4f})")
        t.final_meta["early_stopping"] = {"patience": self.patience, "best_epoch": self.best_epoch,
                                          "best_val_acc": self.best, "epochs_run": last,
                                          "stopped_early": last < t.recipe.epochs}
        t.final_meta["metrics"] = t.history[self.best_epoch - 1]

    def state_dict(self) -> dict:
        state = {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}
        return state | {f"w.{k}": v for k, v in (self.weights or {}).items()}

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state["best"] is None else checked_float(state, "best", 0.0, 1.0)
        self.best_epoch = checked_int(state, "best_epoch", 0, 1 << 31)
        self.wait = checked_int(state, "wait", 0, 1 << 31)
        self.weights = None if self.best is None else \
            {k: checked_tensor(state, f"w.{k}", v).clone() for k, v in self.reference.items()}
