"""Step budgets that fit the data: a preset tuned on 50,000 images must still train on 245 photos.

A preset's epochs and batch size mean nothing on their own: ``fast`` (3 epochs of batch 256) is 588
optimizer steps on CIFAR-10 but 3 steps on 245 photos, and a net that takes 3 steps has not learnt
anything (measured: 45% on ants vs bees, below the 54% majority class). So a preset may carry a budget:

- ``batch_fraction``: the batch is at most this fraction of the training images (rounded to a power of
  two, at least 8), so an epoch has several steps. With SGD the learning rate follows the batch
  linearly (Goyal et al. 2017), so each image moves the weights as much as before;
- ``min_steps``: at least this many optimizer steps in all, by adding epochs.

Only what the user did not ask for explicitly is adapted (an explicit ``--batch-size``, ``--epochs`` or
``--lr`` stands); a run with very few steps is then warned about instead. The adapted recipe is the
run's recipe (``recipe.json``, resume), so a resumed run keeps it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .recipes import Recipe
from .train.parts import steps_per_epoch

FEW_STEPS = 100  # below this many optimizer steps a net from scratch has hardly started to learn


@dataclass
class Plan:
    images: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    changes: list[str] = field(default_factory=list)  # what the budget adapted, and why

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def describe(self) -> str:
        text = (f"plan: {self.images:,} training images, batch {self.batch_size}, {self.epochs} epochs = "
                f"{self.steps:,} optimizer steps")
        return text + (f" ({'; '.join(self.changes)})" if self.changes else "")

    def warning(self) -> str | None:
        if self.steps >= FEW_STEPS:
            return None
        return (f"warning: only {self.steps} optimizer steps; a net trained from scratch hardly learns in fewer "
                f"than {FEW_STEPS}. Give more --epochs or a smaller --batch-size.")


def plan_for(recipe: Recipe, training_images: int, world: int = 1) -> Plan:
    """The plan of ``recipe`` as it stands on ``training_images`` (before any ``val_split`` hold-out)."""
    images = max(0, training_images - recipe.val_split)
    return Plan(images, recipe.batch_size, recipe.epochs, steps_per_epoch(images, recipe.batch_size, world))


def fit_budget(recipe: Recipe, training_images: int, explicit: frozenset[str] | set[str] = frozenset(),
               world: int = 1) -> tuple[Recipe, Plan]:
    """``recipe`` adapted to ``training_images`` by its budget (see the module docstring), and its plan.
    ``explicit``: the recipe fields the user gave; they are never changed. Idempotent."""
    images = max(1, training_images - recipe.val_split)
    changes, notes = {}, []
    if recipe.batch_fraction and "batch_size" not in explicit:
        cap = max(8, 2 ** round(math.log2(max(1.0, images * recipe.batch_fraction))))
        if cap < recipe.batch_size:
            changes["batch_size"] = cap
            notes.append(f"batch {recipe.batch_size} -> {cap}: at most {recipe.batch_fraction:g} of the images")
            if recipe.optimizer == "sgd" and "lr" not in explicit:
                changes["lr"] = recipe.lr * cap / recipe.batch_size
                notes.append(f"lr {recipe.lr:g} -> {changes['lr']:g} with the batch")
    batch = changes.get("batch_size", recipe.batch_size)
    spe = steps_per_epoch(images, batch, world)
    if recipe.min_steps and "epochs" not in explicit and spe and recipe.epochs * spe < recipe.min_steps:
        changes["epochs"] = math.ceil(recipe.min_steps / spe)
        notes.append(f"{recipe.epochs} -> {changes['epochs']} epochs: at least {recipe.min_steps} steps")
    adapted = replace(recipe, **changes).validate() if changes else recipe
    plan = plan_for(adapted, training_images, world)
    plan.changes = notes
    return adapted, plan
