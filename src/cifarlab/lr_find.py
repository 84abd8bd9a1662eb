"""Learning-rate range test (fastai's ``lr_find``, after Leslie Smith): which lr to try first.

The recipe's own model, optimizer (with its parameter groups and their lr scales), data, augmentation,
precision and loss take ``steps`` training steps while the learning rate grows exponentially from
``start_lr`` to ``end_lr``. The loss is smoothed with an exponential moving average (beta 0.98, bias
corrected, as fastai does); the test stops early once the smoothed loss exceeds ``diverge`` (4) x the
best seen, or is not finite. Afterwards the model's weights, buffers and the torch RNG are put back as they
were: the test trains nothing.

Suggestion (:attr:`LRFinderResult.suggestion`): the lr where the smoothed loss is lowest, divided by 10
(fastai's "minimum" rule). The steepest descent of the smoothed loss against log10(lr) (fastai's "steep")
is reported too, as :attr:`LRFinderResult.steepest_lr`, but not suggested: the loss also falls because the
net is learning during the test, so the descent steepens with time and the steepest point lands late. On
the exercise net (bench/results/lr_find_exercise*) it said 0.018 (100 steps) and 0.027 (400 steps), and
10 epochs at 0.018 reached 75.6% test accuracy against 80.0% at the exercise's 5e-3; min-loss / 10 said
0.0047 at 400 steps.

Steps (:func:`default_steps`): enough that the net sees 12,800 images (400 steps at batch 32), at least
100: at 100 steps of batch 32 the exercise net had hardly started to learn and the curve was mostly noise.
The recipe's lr here is the base lr: each parameter group gets ``lr x its lr_scale``, as in training.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import Dataset
from .evaluate import default_device
from .fsutil import atomic_write_json
from .recipes import Recipe


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    steepest_lr: float
    min_loss_lr: float
    stopped_early: bool
    rule: str = "lr at the minimum of the smoothed loss / 10"
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


TEST_IMAGES = 12_800  # images the range test shows the net by default (400 steps at batch 32)


def default_steps(batch_size: int) -> int:
    """Steps for a range test at ``batch_size``: :data:`TEST_IMAGES` images' worth, at least 100."""
    return max(100, math.ceil(TEST_IMAGES / max(1, int(batch_size))))


def lr_schedule(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """``steps`` learning rates from ``start_lr`` to ``end_lr``, evenly spaced in log scale."""
    if not (0 < start_lr < end_lr) or steps < 2:
        raise ValueError(f"need 0 < start_lr < end_lr and at least 2 steps, not {start_lr}, {end_lr}, {steps}")
    return [start_lr * (end_lr / start_lr) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average (fastai's)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(steepest-descent lr, min-loss lr) of a smoothed range-test curve."""
    if len(lrs) < 3:
        return lrs[0], lrs[int(np.argmin(smoothed))]
    y = np.asarray(smoothed, dtype=np.float64)
    x = np.log10(np.asarray(lrs, dtype=np.float64))
    lowest = int(np.nanargmin(y))
    start = max(1, len(y) // 10)
    stop = max(lowest, start + 2)  # the descent before the minimum (at least 2 points)
    slopes = np.gradient(y, x)[start:stop + 1]
    steepest = start + int(np.nanargmin(slopes)) if len(slopes) else lowest
    return float(lrs[steepest]), float(lrs[lowest])


def lr_find(recipe: Recipe, data: Dataset, model: torch.nn.Module | None = None, device=None,
            start_lr: float = 1e-7, end_lr: float = 10.0, steps: int | None = None, beta: float = 0.98,
            diverge: float = 4.0, precision: str = "auto", channels_last: bool | None = None,
            log=print) -> LRFinderResult:
    """Run the range test with ``recipe`` (its model unless ``model`` is given) on ``data``'s training set."""
    from .train import make_optimizer, prepare, resolve_precision, set_lr

    recipe.validate()
    steps = default_steps(recipe.batch_size) if steps is None else steps
    device = torch.device(device) if device else default_device()
    if channels_last is None:
        channels_last = device.type == "cpu"
    lrs = lr_schedule(start_lr, end_lr, steps)
    saved_rng = torch.get_rng_state()  # (building the recipe's model seeds the RNG)
    # The recipe's trainer with no callbacks: no lookahead (the range test measures the optimizer alone),
    # no checkpoints, no folder.
    trainer = prepare(recipe, data, device, resolve_precision(precision, device), channels_last)
    if model is not None:
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        trainer.model = trainer.train_model = model
        trainer.optimizer = make_optimizer(recipe, model)
    saved_weights = copy.deepcopy(trainer.model.state_dict())
    torch.manual_seed(recipe.seed)  # the same dropout and augmentation draws on every call
    losses: list[float] = []
    stopped_early = False
    best = math.inf
    was_training = trainer.model.training
    trainer.model.train()
    try:
        for i, lr in enumerate(lrs):
            epoch, step = divmod(i, trainer.spe)
            if step == 0:
                order = trainer.order(epoch)
            x, y = trainer.make_batch(order, None, step)
            set_lr(trainer.optimizer, lr)
            loss, _ = trainer.train_step(x, y)
            value = loss.item()
            losses.append(value)
            current = smooth(losses, beta)[-1]
            best = min(best, current)
            if not math.isfinite(value) or (i > 0 and current > diverge * best):
                stopped_early = i < steps - 1
                break
    finally:
        trainer.model.load_state_dict(saved_weights)  # the test trains nothing
        trainer.model.train(was_training)
        torch.set_rng_state(saved_rng)
    tested = lrs[:len(losses)]
    finite = [(lr, v) for lr, v in zip(tested, losses) if math.isfinite(v)]
    if len(finite) < 2:
        raise ValueError(f"the loss was not finite from the first steps (lr {start_lr:g}); lower --start-lr")
    tested, values = [lr for lr, _ in finite], [v for _, v in finite]
    smoothed = smooth(values, beta)
    steepest, lowest = suggest(tested, smoothed)
    result = LRFinderResult(lrs=tested, losses=values, smoothed=smoothed, suggestion=lowest / 10, steepest_lr=steepest,
                            min_loss_lr=lowest, stopped_early=stopped_early,
                            meta={"model": trainer.model.declaration["name"] if hasattr(trainer.model, "declaration")
                                  else type(trainer.model).__name__, "optimizer": recipe.optimizer,
                                  "batch_size": recipe.batch_size, "start_lr": start_lr, "end_lr": end_lr,
                                  "steps": steps, "beta": beta, "diverge": diverge, "precision": trainer.precision,
                                  "recipe": asdict(recipe)})
    log(f"lr-find: {len(losses)} of {steps} steps{' (stopped: the loss diverged)' if stopped_early else ''}; "
        f"suggested lr {lowest / 10:.3g} (min-loss lr {lowest:.3g} / 10); steepest descent at {steepest:.3g}")
    return result


def plot(result: LRFinderResult, path: str | Path) -> Path:
    from .plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", lw=2, label="smoothed (EMA 0.98)")
    ax.set_xscale("log")
    nearest = int(np.argmin(np.abs(np.log(result.lrs) - math.log(result.suggestion))))
    ax.plot([result.suggestion], [result.smoothed[nearest]], "o", color="tab:red", ms=9,
            label=f"suggestion {result.suggestion:.2g} (min-loss lr / 10)")
    ax.axvline(result.min_loss_lr, color="0.4", ls=":", lw=1, label=f"min-loss lr {result.min_loss_lr:.2g}")
    ax.axvline(result.steepest_lr, color="tab:green", ls="--", lw=1,
               label=f"steepest descent {result.steepest_lr:.2g} (not suggested: lands late)")
    low, high = min(result.smoothed), result.smoothed[0]
    ax.set_ylim(low - 0.1 * abs(high - low) - 1e-3, max(high, low) + 0.6 * abs(high - low) + 1e-3)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    meta = result.meta
    ax.set_title(f"LR range test: {meta.get('model')}, {meta.get('optimizer')}, batch {meta.get('batch_size')}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def check_out_folder(folder: str | Path) -> Path:
    """``folder`` can hold the results: it is a folder or can be made one (no file in its way). Called before
    the search too, so a bad ``--out`` is refused before minutes of training, not after."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.is_dir():
            break
        if path.exists() or path.is_symlink():
            raise ValueError(f"{path}: exists and is not a folder; choose another --out for the lr finder's "
                             f"results")
    return folder


def save(result: LRFinderResult, folder: str | Path) -> dict[str, Path]:
    """``lr_find.json`` and ``lr_find.png`` in ``folder``."""
    folder = check_out_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "lr_find.json"
    atomic_write_json(json_path, result.to_dict())
    return {"json": json_path, "png": plot(result, folder / "lr_find.png")}
