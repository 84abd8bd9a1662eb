"""Training: a small loop (:mod:`.loop`) and one callback per feature (:mod:`.callbacks`), assembled by
:func:`train` (:mod:`.run`) from a :class:`~cifarlab.recipes.Recipe` (what is learnt) and
:class:`RunOptions` (how the run is carried out). Checkpoints and exact resume: :mod:`.checkpointing`."""
from ..precision import resolve_precision  # noqa: F401 (re-exported)
from ..recipes import PRESETS, Recipe, recipe_from, saved_recipe  # noqa: F401 (re-exported)
from .callbacks.lookahead import Lookahead  # noqa: F401
from .distributed import DistInfo, dist_info  # noqa: F401
from .loop import Callback, Trainer, TrainingInterrupted  # noqa: F401
from .options import RunOptions  # noqa: F401
from .parts import batch_indices, epoch_order, learning_rate, make_optimizer, set_lr, steps_per_epoch  # noqa: F401
from .run import TrainResult, prepare, train  # noqa: F401
