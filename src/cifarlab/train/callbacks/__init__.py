"""Everything the training loop does besides batches, forward, loss, backward, step and evaluate: one
module per feature, each a :class:`~cifarlab.train.loop.Callback`, and one entry per feature in
:data:`CALLBACKS`, the registry that :func:`cifarlab.train.run.callbacks_for` goes through. An entry takes
the run's :class:`Context` and returns its callback, or None when the recipe or the options leave it off.
The order of events among callbacks is each callback's ``order``, not the registry's."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpointing import Checkpointer
from ..loop import Callback
from .adaptive_threads import AdaptiveThreadsCallback
from .calibrate import FitTemperature
from .console import ConsoleProgress
from .diagnosis import Diagnose
from .early_stopping import EarlyStopping
from .ema import EMA
from .freeze import FreezeBody
from .lookahead import Lookahead
from .metrics_csv import MetricsCSV
from .mix import MixBatches
from .pruning import ReportToTrial
from .stopping import MaxSteps, StopOnSignal
from .tensorboard import TensorBoard
from .whiten_bias import WhitenBiasEpochs, whitening_biases


@dataclass
class Context:
    """What a registry entry may look at to build its callback."""
    t: object  # the Trainer
    recipe: object
    options: object  # RunOptions
    run_dir: Path
    base_meta: dict
    data: object  # the Dataset
    adaptive: bool  # adaptive CPU threads chosen for this run
    log: Callable

    @property
    def mixed(self) -> bool:
        return bool(self.recipe.mixup or self.recipe.cutmix)


CALLBACKS: dict[str, Callable[[Context], Callback | None]] = {
    "signals": lambda c: StopOnSignal(),
    "console": lambda c: ConsoleProgress(c.log, bar=c.options.progress, mixed_batches=c.mixed),
    "metrics_csv": lambda c: MetricsCSV(c.run_dir / "metrics.csv"),
    "whiten_bias": lambda c: WhitenBiasEpochs(whitening_biases(c.t.model), c.recipe.whiten_bias_epochs)
    if whitening_biases(c.t.model) else None,
    "freeze": lambda c: FreezeBody(c.t.model, c.recipe.freeze_epochs, c.log) if c.recipe.freeze_epochs else None,
    "lookahead": lambda c: Lookahead(c.t.model, c.recipe.lookahead, c.recipe.epochs * c.t.spe)
    if c.recipe.lookahead else None,
    "mix": lambda c: MixBatches(c.data.num_classes, c.recipe.mixup, c.recipe.cutmix) if c.mixed else None,
    "ema": lambda c: EMA(c.t.model, c.recipe.ema) if c.recipe.ema else None,
    "early_stop": lambda c: EarlyStopping(c.t.model, c.recipe.early_stop, c.log) if c.recipe.early_stop else None,
    "adaptive_threads": lambda c: AdaptiveThreadsCallback(torch.get_num_threads(), c.log) if c.adaptive else None,
    "max_steps": lambda c: MaxSteps(c.options.max_steps) if c.options.max_steps else None,
    "tensorboard": lambda c: TensorBoard(c.run_dir / "tensorboard", c.log) if c.options.tensorboard else None,
    # Temperature scaling on the held-out training images, never the test set.
    "temperature": lambda c: FitTemperature(c.log) if c.recipe.val_split else None,
    "diagnosis": lambda c: Diagnose(c.t.val_source, c.mixed, c.log) if c.options.diagnose else None,
    # A hyperparameter search's trial: each epoch's validation accuracy reported; it may prune the run.
    "trial": lambda c: ReportToTrial(c.options.trial, c.run_dir, c.log) if c.options.trial is not None else None,
    "checkpoints": lambda c: Checkpointer(c.run_dir, c.base_meta, c.options.checkpoint_every,
                                          c.options.keep_checkpoints),
}
