"""The training loop: batches in, forward, loss, backward, step, evaluate. Everything else is a callback.

Events, in the order they fire (a callback overrides the methods it needs; lower ``order`` runs first):

    fit_start
      epoch_start
        batch_start     ``t.batch = (x, y)`` may be replaced (MixUp/CutMix: y becomes soft targets)
        after_loss      ``t.loss`` may be replaced
        after_step      the optimizer has stepped; ``t.step`` is the next step of the epoch
        checkpoint      mid-epoch: a resumable point (periodic, or a stop was asked for)
      eval_start
      eval_end          ``t.row`` holds the epoch's validation metrics (computed on rank 0)
      epoch_end         ``t.row`` is the last entry of ``t.history``
      checkpoint        the epoch's resumable point
    fit_end             always, also after an error or a stop; ``t.finished`` says whether the run is complete

A callback asks the loop to stop by setting ``t.stop``: "early_stop" ends a complete run at the next epoch
boundary, "max_steps" returns and "interrupt" raises :class:`TrainingInterrupted` at the next resumable
point (both resumable). Every rank stops at the same step. A callback with a ``key`` keeps its state in
every checkpoint under that key (``state_dict``/``load_state_dict``), so a resumed run is exact.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..errors import TrainingError
from ..evaluate import predict_logits
from ..precision import autocast, grad_scaler, resolve_precision
from ..transforms import Augment, alternating_flips
from .distributed import DistInfo, global_sums, max_over_ranks
from .parts import batch_indices, epoch_order, learning_rate, set_lr, steps_per_epoch

EVENTS = ("fit_start", "epoch_start", "batch_start", "after_loss", "after_step", "eval_start", "eval_end",
          "epoch_end", "checkpoint", "fit_end")
STOP_REASONS = (None, "max_steps", "early_stop", "interrupt")  # the strongest asked for on any rank wins


class Callback:
    """Base class: every event is a no-op; ``key`` names a stateful callback's entry in checkpoints."""

    key: str = ""
    order: int = 0

    def state_dict(self) -> dict:
        """Tensors and JSON values; tensors go into the checkpoint's safetensors file, the rest into its header."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``'s content; raise KeyError/ValueError/TypeError if it does not fit."""


for _event in EVENTS:
    setattr(Callback, _event, lambda self, t: None)


class TrainingInterrupted(Exception):
    def __init__(self, checkpoint):
        super().__init__(f"interrupted; checkpoint saved at {checkpoint}")
        self.checkpoint = checkpoint


class Trainer:
    """What the loop trains and where it stands; built by :func:`cifarlab.train.setup.prepare`."""

    def __init__(self, *, recipe, model, optimizer, train_split, val_split, normalization, device, precision,
                 channels_last: bool, dist: DistInfo, log=print):
        self.recipe, self.model, self.train_model, self.optimizer = recipe, model, model, optimizer
        self.eval_model = model  # what validation and the final checkpoint use (EMA replaces it)
        self.val_split, self.normalization, self.device = val_split, normalization, device
        self.dist, self.log = dist, log
        self.precision, self.channels_last = precision, channels_last
        self.images, self.labels = train_split.images.to(device), train_split.labels.to(device)
        self.n = len(train_split)
        self.spe = steps_per_epoch(self.n, recipe.batch_size, dist.world)
        if self.spe == 0:
            raise ValueError(f"batch size {recipe.batch_size} x {dist.world} processes is larger than the "
                             f"{self.n} training images")
        self.augment = Augment.from_recipe(recipe)
        self.autocast = autocast(device, precision)
        self.scaler = grad_scaler(device, precision)  # fp16 only (GPUs before compute capability 8.0)
        self.callbacks: list[Callback] = []
        self._handlers: dict[str, list] = {event: [] for event in EVENTS}
        # Where the run stands: the next step to take (a checkpoint restores all of these).
        self.epoch, self.step, self.history, self.partial = 0, 0, [], {}
        self.train_seconds = 0.0
        self.stop, self.finished, self.checkpoint_now = None, False, False
        self.interrupt_requested = False  # set by a signal handler; folded into stop where ranks agree
        self.same_tta_every_epoch = False  # early stopping compares epochs: validate all at the recipe's TTA
        self.steps_done, self.started = 0, time.perf_counter()
        self.batch = self.loss = self.logits = self.row = self.checkpoint_path = None
        self.partial_sums: dict = {}
        self.final_meta: dict = {}  # what fit_end's callbacks add to the final checkpoint's meta

    # -- callbacks -------------------------------------------------------------------------------------

    def add_callbacks(self, callbacks) -> None:
        self.callbacks = sorted([*self.callbacks, *callbacks], key=lambda cb: cb.order)
        keys = [cb.key for cb in self.callbacks if cb.key]
        if len(keys) != len(set(keys)):
            raise ValueError(f"two callbacks share a checkpoint key: {keys}")
        # Only the methods a callback overrides are called: a step costs no empty calls.
        self._handlers = {event: [getattr(cb, event) for cb in self.callbacks
                                  if getattr(type(cb), event) is not getattr(Callback, event)] for event in EVENTS}

    def fire(self, event: str) -> None:
        for handler in self._handlers[event]:
            handler(self)

    # -- the step API (lr_find uses it too) ------------------------------------------------------------

    @property
    def global_step(self) -> int:
        return self.epoch * self.spe + self.step

    def order(self, epoch: int) -> torch.Tensor:
        return epoch_order(self.recipe.seed, epoch, self.n).to(self.device)

    def flips(self, epoch: int) -> torch.Tensor | None:
        recipe = self.recipe
        return alternating_flips(recipe.seed, self.n, epoch).to(self.device) if recipe.flip and recipe.alt_flip \
            else None

    def make_batch(self, order: torch.Tensor, flips: torch.Tensor | None, step: int):
        idx = batch_indices(order, step, self.recipe.batch_size, self.dist.rank, self.dist.world)
        x = self.normalization(self.images[idx])
        if self.augment.active:
            x = self.augment(x, flip_mask=None if flips is None else flips[idx], normalization=self.normalization)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """Forward, loss (``after_loss`` may replace it), backward, optimizer step. ``y``: class indices or
        soft targets (rows of class probabilities); the loss is the same cross-entropy for both."""
        with self.autocast:
            logits = self.train_model(x)
            self.loss = F.cross_entropy(logits.float(), y, label_smoothing=self.recipe.label_smoothing)
        self.logits = logits
        self.fire("after_loss")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            self.loss.backward()
            self.optimizer.step()
        else:  # fp16: scaled loss, unscaled gradients, steps with inf/NaN gradients skipped
            self.scaler.scale(self.loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return self.loss, logits

    def seconds(self) -> float:
        """Seconds since this call's fit() started."""
        return time.perf_counter() - self.started

    def lr_at(self, epoch: int, step: int) -> float:
        return learning_rate(self.recipe, epoch, step, self.spe)

    # -- the loop --------------------------------------------------------------------------------------

    def fit(self) -> None:
        self.started = time.perf_counter()
        try:
            self.fire("fit_start")
            while self.epoch < self.recipe.epochs and self.stop is None:
                if not self._train_epoch():
                    break  # stopped part-way through the epoch, at a checkpoint
                self._evaluate()
                self.fire("epoch_end")
                self.epoch, self.step = self.epoch + 1, 0
                self._agree_on_stop()
                self._checkpoint({})
            self.finished = self.stop != "interrupt" and (self.epoch == self.recipe.epochs
                                                          or self.stop == "early_stop")
        finally:
            self.train_seconds = self.seconds()  # the loop's time, before fit_end's work (temperature, saving)
            self.fire("fit_end")
        if self.stop == "interrupt" and not self.finished:
            raise TrainingInterrupted(self.checkpoint_path)

    def _train_epoch(self) -> bool:
        """The epoch's remaining steps; False when a stop ended it part-way (after a checkpoint)."""
        recipe, epoch, spe = self.recipe, self.epoch, self.spe
        order, flips = self.order(epoch), self.flips(epoch)
        self.model.train()
        self.fire("epoch_start")
        # A partly done epoch's running sums come back from the checkpoint, so resumed metrics match.
        # (They are sums over all ranks, restored on rank 0 only.)
        partial, self.partial = (self.partial if self.dist.is_main else {}), {}
        self.loss_sum = torch.tensor(partial.get("loss_sum", 0.0), device=self.device, dtype=torch.float64)
        self.correct = torch.tensor(partial.get("correct", 0), device=self.device, dtype=torch.int64)
        self.seen = partial.get("seen", 0)
        self.epoch_started = time.perf_counter() - partial.get("seconds", 0.0)
        for step in range(self.step, spe):
            self.batch = self.make_batch(order, flips, step)
            self.fire("batch_start")
            set_lr(self.optimizer, self.lr_at(epoch, step), (epoch * spe + step) / (recipe.epochs * spe))
            x, y = self.batch
            loss, logits = self.train_step(x, y)
            labels = y if y.ndim == 1 else y.argmax(1)  # mixed batches: the dominant label of each image
            self.loss_sum += loss.detach() * len(y)
            self.correct += (logits.detach().argmax(1) == labels).sum()
            self.seen += len(y)
            self.step, self.steps_done = step + 1, self.steps_done + 1
            self.fire("after_step")
            self._agree_on_stop()
            if step != spe - 1 and (self.checkpoint_now or self.stop):
                self.check_finite()
                loss_sum, correct, seen = global_sums(self.loss_sum, self.correct, self.seen, self.dist)
                self._checkpoint({"loss_sum": loss_sum, "correct": correct, "seen": seen,
                                  "seconds": time.perf_counter() - self.epoch_started})
                if self.stop:
                    return False
        self.check_finite()
        return True

    def _evaluate(self) -> None:
        """The epoch's row: training sums over all ranks, validation on rank 0 (the eval model, in eval mode)."""
        loss_sum, correct, seen = global_sums(self.loss_sum, self.correct, self.seen, self.dist)
        seconds = time.perf_counter() - self.epoch_started
        self.row = {"epoch": self.epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                    "lr": self.lr_at(self.epoch, 0), "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
        self.fire("eval_start")
        if self.dist.is_main:
            # TTA level 2 costs six passes per image: each epoch's check uses at most flip TTA, the last
            # epoch the recipe's own level (so the final row is the final model's accuracy).
            last = self.epoch + 1 == self.recipe.epochs or self.same_tta_every_epoch
            logits = self.validation_logits(self.recipe.tta if last else min(self.recipe.tta, 1))
            self.row["val_loss"] = float(F.cross_entropy(logits, self.val_split.labels))
            self.row["val_acc"] = float((logits.argmax(1) == self.val_split.labels).float().mean())
        self.fire("eval_end")
        self.history.append(self.row)

    def validation_logits(self, tta: int) -> torch.Tensor:
        return predict_logits(self.eval_model, self.val_split.images, self.normalization, device=self.device, tta=tta,
                              channels_last=self.channels_last,
                              precision=resolve_precision("auto", self.device, training=False))

    def _agree_on_stop(self) -> None:
        """The only place ``stop`` changes after a signal: every rank takes the strongest stop any rank asked
        for (a signal may reach only some), so all ranks leave the loop at the same step."""
        local = "interrupt" if self.interrupt_requested else self.stop
        self.stop = STOP_REASONS[max_over_ranks(STOP_REASONS.index(local), self.dist)]

    def _checkpoint(self, partial: dict) -> None:
        self.partial_sums = partial
        self.fire("checkpoint")
        self.checkpoint_now = False

    def check_finite(self) -> None:
        if not torch.isfinite(self.loss_sum):
            raise TrainingError(f"the loss became NaN or infinite in epoch {self.epoch + 1} (by step {self.step}); "
                                f"stopping. The last good checkpoint is kept; start a new run with a lower learning "
                                f"rate (--resume keeps the recipe).")
