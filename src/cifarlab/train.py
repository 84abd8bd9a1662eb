"""Training: recipes (presets), the loop, per-epoch metrics and resumable checkpoints.

The whole dataset stays in memory as uint8; a batch is an index into it, normalized and augmented as
one tensor. Every epoch (and optionally every N steps) a checkpoint holds the weights, optimizer, RNG
and data-order state, so ``resume=True`` continues exactly where the run stopped. Under ``torchrun``
the same loop runs data-parallel: ``batch_size`` is per process, rank 0 alone writes files.
"""
from __future__ import annotations

import csv
import io
import math
import signal
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoints as ckpts
from .data import CIFAR10, holdout_split
from .errors import CheckpointError, TrainingError
from .evaluate import default_device, predict_logits
from .fsutil import atomic_write_json, atomic_write_text
from .models import Net, Whiten, get_declaration
from .transforms import Augment, Normalization, alternating_flips


@dataclass
class Recipe:
    """Everything that decides what a run learns. Defaults are the exercise's recipe."""

    model: str = "exercise"
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamax"        # adamax | adam | adamw | sgd
    lr: float = 5e-3
    schedule: str = "exp"            # exp: lr * lr_decay**epoch | onecycle | linear | constant
    lr_decay: float = 0.9
    warmup: float = 0.0              # fraction of all steps, for onecycle / linear
    lr_start: float = 0.0            # onecycle / linear: the lr at step 0 and after the last step,
    lr_end: float = 0.0              # as fractions of the peak lr
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_all: bool = False          # sgd: weight decay on biases and BatchNorm too (default: weights only)
    bn_lr_scale: float = 1.0         # sgd: lr multiplier for BatchNorm parameters (their decay is divided by it)
    lookahead: int = 0               # every N steps pull the weights toward a slow copy (airbench; 0: off)
    whiten_bias_epochs: int = 0      # train the whitening layer's bias for this many first epochs
    label_smoothing: float = 0.0
    normalization: str = "exercise"  # exercise: x/255 - 0.5 | standard: per-channel mean/std
    flip: bool = False
    alt_flip: bool = False           # with flip: mirror a fixed half in even epochs, the other half in odd ones
    translate: int = 0
    translate_pad: str = "zeros"     # zeros | reflect
    cutout: int = 0
    tta: int = 0                     # test-time augmentation when evaluating: 0 none, 1 flip, 2 flip + translate
    seed: int = 0
    val_split: int = 0               # hold out this many training images for validation (0: use test)

    def __post_init__(self):
        self.tta = int(self.tta)  # True (older recipes, --tta) means level 1

    def validate(self) -> "Recipe":
        checks = [
            (self.epochs >= 1 and self.epochs <= 10_000, "epochs must be 1..10000"),
            (1 <= self.batch_size <= 65_536, "batch size must be 1..65536"),
            (self.optimizer in ("adamax", "adam", "adamw", "sgd"), "optimizer must be adamax, adam, adamw or sgd"),
            (math.isfinite(self.lr) and 0 < self.lr <= 100, "lr must be > 0 and <= 100"),
            (self.schedule in ("exp", "onecycle", "linear", "constant"), "schedule must be exp, onecycle, linear or constant"),
            (0 < self.lr_decay <= 1, "lr decay must be in (0, 1]"),
            (0 <= self.warmup < 1, "warmup must be in [0, 1)"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (0 <= self.weight_decay < 1, "weight decay must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
            (0 <= self.lr_start <= 1 and 0 <= self.lr_end <= 1, "lr start and end must be in [0, 1] (fractions of the peak)"),
            (math.isfinite(self.bn_lr_scale) and 0 < self.bn_lr_scale <= 1000, "bn lr scale must be in (0, 1000]"),
            (0 <= self.lookahead <= 10_000, "lookahead must be 0..10000 steps"),
            (0 <= self.whiten_bias_epochs <= self.epochs, "whiten bias epochs must be 0..epochs"),
            (self.translate_pad in ("zeros", "reflect"), "translate pad must be zeros or reflect"),
            (self.tta in (0, 1, 2), "tta must be 0 (none), 1 (flip) or 2 (flip + translate)"),
            (self.normalization in ("exercise", "standard"), "normalization must be exercise or standard"),
            (0 <= self.translate <= 16 and 0 <= self.cutout <= 32, "translate must be 0..16, cutout 0..32"),
            (0 <= self.val_split < 50_000, "val split must be 0..49999"),
            (0 <= self.seed < 2 ** 63, "seed must be a non-negative 64-bit integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        get_declaration(self.model)  # fails early for an unknown or broken model
        return self


# airbench-style small net for a 2-core CPU; tuned with --val-split 5000 (never on the test set).
# 3 epochs: about 84% on the held-out split in under a minute of training on 2 cores (bench/).
_FAST = Recipe(model="fast", epochs=3, batch_size=256, optimizer="sgd", lr=0.2, schedule="onecycle", warmup=0.15,
               momentum=0.85, nesterov=True, weight_decay=5e-4, label_smoothing=0.2, normalization="standard",
               flip=True, translate=2, tta=1)

PRESETS: dict[str, Recipe] = {
    # The exercise: Adamax 5e-3 x 0.9 per epoch, batch 32, 10 epochs, no augmentation.
    "exercise": Recipe(),
    "fast": _FAST,
    # The same net and recipe, trained longer: about 90% in a few minutes on 2 cores (bench/).
    "fast-long": replace(_FAST, epochs=24),
    # airbench94 (Keller Jordan) for GPUs: its net and its recipe, 10 epochs instead of 9.9. Its
    # hyperparameters are per summed loss (lr 11.5 and decay 0.0153 per 1024 images, scaled by
    # 1 / (1024 (1 + 1 / (1 - momentum)))); ours is a mean loss, so lr = 11.5 x 1024 / 7851.5 = 1.4998 and
    # decay = 0.0153 / 11.5 (the same step). BatchNorm biases: 64x the lr, the same decay per step.
    "airbench94": Recipe(model="airbench94", epochs=10, batch_size=1024, optimizer="sgd", lr=11.5 * 1024 / 7851.5,
                         schedule="onecycle", warmup=0.23, lr_start=0.2, lr_end=0.07, momentum=0.85,
                         nesterov=True, weight_decay=0.0153 / 11.5, decay_all=True, bn_lr_scale=64.0,
                         lookahead=5, whiten_bias_epochs=3, label_smoothing=0.2, normalization="standard",
                         flip=True, alt_flip=True, translate=2, translate_pad="reflect", tta=2),
}


def recipe_from(preset: str = "exercise", **overrides) -> Recipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(Recipe)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown recipe field(s) {sorted(unknown)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}).validate()


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop


def make_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(_sgd_groups(recipe, model), lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov)
    cls = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[recipe.optimizer]
    # eps=1e-8: Keras 2.0.6's Adamax default, the exercise's (and PyTorch's) value.
    return cls(params, lr=recipe.lr, weight_decay=recipe.weight_decay, eps=1e-8)


def _sgd_groups(recipe: Recipe, model: torch.nn.Module) -> list[dict]:
    """Parameter groups: weights; other biases; BatchNorm parameters (lr x bn_lr_scale). By default only
    weights decay (the usual practice); ``decay_all`` decays everything, as airbench does, dividing the
    BatchNorm group's decay by its lr scale so every parameter shrinks by the same factor per step."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = [p for p in trainable if id(p) in norm_ids]
    weights = [p for p in trainable if id(p) not in norm_ids and p.ndim > 1]
    biases = [p for p in trainable if id(p) not in norm_ids and p.ndim <= 1]
    wd = recipe.weight_decay
    groups = [{"params": weights, "weight_decay": wd, "lr_scale": 1.0},
              {"params": biases, "weight_decay": wd if recipe.decay_all else 0.0, "lr_scale": 1.0},
              {"params": norm, "weight_decay": wd / recipe.bn_lr_scale if recipe.decay_all else 0.0,
               "lr_scale": recipe.bn_lr_scale}]
    return [g for g in groups if g["params"]]


def learning_rate(recipe: Recipe, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate for (epoch, step-in-epoch): Keras-style per-epoch decay or per-step schedules."""
    if recipe.schedule == "exp":
        return recipe.lr * recipe.lr_decay ** epoch
    if recipe.schedule == "constant":
        return recipe.lr
    total = recipe.epochs * steps_per_epoch
    t = (epoch * steps_per_epoch + step) / total
    warm, start, end = recipe.warmup, recipe.lr_start, recipe.lr_end
    if warm > 0 and t < warm:
        return recipe.lr * (start + (1 - start) * t / warm)
    frac = min(1.0, (t - warm) / (1 - warm))
    return recipe.lr * (1 + (end - 1) * frac)  # linear decay to lr_end (onecycle's triangle)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch), so resume can rebuild it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return DistInfo()


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    # Single process keeps the last partial batch as Keras does; data-parallel runs drop it so every rank
    # takes the same number of equal-sized steps.
    return math.ceil(n / batch_size) if world == 1 else n // (batch_size * world)


def batch_indices(order: torch.Tensor, step: int, batch_size: int, dist: DistInfo) -> torch.Tensor:
    """Rank r takes slice r of each global batch, so N ranks x batch B == 1 process x batch N*B."""
    start = step * batch_size * dist.world + dist.rank * batch_size
    return order[start:start + batch_size]


# ---------------------------------------------------------------------------------------------------
# Run folder helpers


CSV_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """Rewritten whole and atomically from the history kept in the checkpoint: never a duplicate row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to checkpoint at the next step and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # second Ctrl-C: give up waiting
                raise KeyboardInterrupt
            self.requested = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


class TrainingInterrupted(Exception):
    def __init__(self, checkpoint: Path):
        super().__init__(f"interrupted; checkpoint saved at {checkpoint}")
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    model: Net
    history: list[dict]
    normalization: Normalization
    classes: list[str]
    val_source: str
    seconds: float
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# The loop


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (for the header)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                plain[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, info: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in info["plain"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def _set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class Lookahead:
    """airbench's lookahead: every few steps the weights (and BatchNorm statistics) move to a slow copy
    that has been pulled toward them by ``1 - decay``; decay grows as 0.95**5 * progress**3, so early
    training is untouched and the end averages over the last steps. The last step adopts the slow copy."""

    PREFIX = "lookahead."

    def __init__(self, model: torch.nn.Module, every: int, total_steps: int):
        self.every, self.total_steps = every, total_steps
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def step(self, model: torch.nn.Module, global_step: int) -> None:
        if global_step % self.every == 0:
            self._pull(model, 0.95 ** 5 * min(1.0, global_step / self.total_steps) ** 3)
        if global_step == self.total_steps:
            self._pull(model, 1.0)

    @torch.no_grad()
    def _pull(self, model: torch.nn.Module, decay: float) -> None:
        for name, value in model.state_dict().items():
            if name in self.slow:
                self.slow[name].lerp_(value, 1 - decay)
                value.copy_(self.slow[name])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {self.PREFIX + k: v for k, v in self.slow.items()}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in self.slow:
            self.slow[k].copy_(tensors[self.PREFIX + k])


def train(recipe: Recipe, data: CIFAR10, run_dir: str | Path, device: str | torch.device | None = None,
          resume: bool = False, checkpoint_every: int = 0, keep_checkpoints: int = 2, progress: bool = True,
          compile: bool = False, channels_last: bool | None = None, log=print, max_steps: int | None = None,
          tensorboard: bool = False, precision: str = "auto") -> TrainResult:
    """Train ``recipe`` on ``data``, writing checkpoints and metrics.csv into ``run_dir``.

    ``precision``: "fp32", "bf16" (autocast: bf16 matrix multiplies and convolutions, fp32 weights,
    optimizer and loss) or "auto": bf16 on CUDA and on CPUs with native bf16 arithmetic, else fp32.
    ``max_steps`` stops after that many optimizer steps in this call (for tests and benchmarks).
    """
    recipe.validate()
    run_dir = Path(run_dir)
    dist = dist_info()
    device = torch.device(device) if device else default_device()
    if channels_last is None:
        channels_last = device.type == "cpu"  # measured faster on CPU for these convs (bench/)
    precision = resolve_precision(precision, device)
    normalization = Normalization.named(recipe.normalization)
    # Alternating flips are applied by the loop from a per-image mask; Augment does the random ones.
    augment = Augment(recipe.flip and not recipe.alt_flip, recipe.translate, recipe.cutout, recipe.translate_pad)

    train_split, val_split, val_source = data.train, data.test, "test set (as in the exercise)"
    if recipe.val_split:
        train_split, val_split = holdout_split(data.train, recipe.val_split, seed=recipe.seed)
        val_source = f"{recipe.val_split} images held out from the training set"

    torch.manual_seed(recipe.seed)
    decl = get_declaration(recipe.model)
    model = Net(decl)
    if any(layer["type"] == "whiten" for layer in decl["layers"]):
        sample = train_split.images[epoch_order(recipe.seed, -1, len(train_split))[:5000]]
        model.init_from_data(normalization(sample))
    whiten_biases = [m.bias for m in model.modules() if isinstance(m, Whiten)]
    for bias in whiten_biases:  # in the optimizer from the start; frozen again after whiten_bias_epochs
        bias.requires_grad_(recipe.whiten_bias_epochs > 0)
    if dist.world > 1:
        torch.manual_seed(recipe.seed + 1_000_003 * dist.rank)  # same init, different dropout per rank
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(recipe, model)

    history: list[dict] = []
    n = len(train_split)
    spe = steps_per_epoch(n, recipe.batch_size, dist.world)
    if spe == 0:
        raise ValueError(f"batch size {recipe.batch_size} x {dist.world} processes is larger than the {n} training images")
    lookahead = Lookahead(model, recipe.lookahead, recipe.epochs * spe) if recipe.lookahead else None
    start_epoch, start_step, partial = 0, 0, {}
    if resume:
        loaded = _try_resume(run_dir, recipe, log)
        if loaded is not None:
            ckpt = loaded
            model.load_state_dict(ckpt.model.state_dict())
            if lookahead is not None:
                lookahead.restore({k: ckpt.optimizer_tensors.pop(k) for k in list(ckpt.optimizer_tensors)
                                   if k.startswith(Lookahead.PREFIX)})
            _restore_optimizer(optimizer, ckpt.optimizer_tensors, ckpt.train_state["optimizer"])
            torch.set_rng_state(ckpt.optimizer_tensors_rng)
            history = ckpt.meta.get("history", [])
            start_epoch, start_step = ckpt.train_state["epoch"], ckpt.train_state["step_in_epoch"]
            partial = ckpt.train_state.get("partial_epoch", {})
            log(f"resuming from {ckpt.path} (epoch {start_epoch + 1}, step {start_step})")

    images = train_split.images.to(device)
    labels = train_split.labels.to(device)

    train_model = model
    if dist.world > 1 and device.type == "cuda":
        # Batch statistics over the global batch, as one process would compute them. (On CPU, PyTorch's
        # SyncBatchNorm does not run, so each rank normalizes with its own shard's statistics.)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = model
    if dist.world > 1:
        # find_unused_parameters: the whitening bias stops receiving gradients after whiten_bias_epochs.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=recipe.whiten_bias_epochs > 0)
    if compile:
        train_model = _maybe_compile(train_model, log)
    autocast = _train_autocast(device, precision)

    base_meta = {
        "architecture": decl, "classes": list(data.classes), "normalization": normalization.to_dict(),
        "recipe": asdict(recipe), "seed": recipe.seed, "val_source": val_source, "world_size": dist.world,
        "precision": precision,
    }
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "recipe.json", asdict(recipe))
        except OSError as e:
            raise TrainingError(f"{run_dir}: cannot create or write the run folder ({e.strerror or e}).") from None
    writer = _tensorboard_writer(run_dir, tensorboard and dist.is_main, log)

    def save_on_main(epoch: int, step_in_epoch: int, global_step: int, partial: dict | None) -> Path | None:
        # Every rank's RNG state (its dropout and augmentation stream) goes into rank 0's checkpoint.
        rng_states = [torch.get_rng_state()]
        if dist.world > 1:
            rng_states = [None] * dist.world
            torch.distributed.all_gather_object(rng_states, torch.get_rng_state())
        if not dist.is_main:
            return None
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingError("weights became NaN/inf; not saving them. The last good checkpoint is kept.")
        opt_tensors, opt_info = _optimizer_tensors(optimizer)
        for rank, rng in enumerate(rng_states):
            opt_tensors[f"rng.torch.rank{rank}"] = rng
        if lookahead is not None:
            opt_tensors.update(lookahead.tensors())
        meta = dict(base_meta, epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                    history=history, metrics=history[-1] if history else {})
        state = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                 "optimizer": opt_info, "recipe": asdict(recipe), "world_size": dist.world,
                 "partial_epoch": partial or {}}
        path = ckpts.save_checkpoint(run_dir / ckpts.CKPT_DIR / ckpts.checkpoint_name(global_step), model, meta,
                                     train_state=state, optimizer_tensors=opt_tensors)
        ckpts.prune_checkpoints(run_dir, keep=keep_checkpoints)
        return path

    def save(epoch: int, step_in_epoch: int, global_step: int, partial: dict | None = None) -> Path | None:
        path = save_on_main(epoch, step_in_epoch, global_step, partial)
        if dist.world > 1:
            torch.distributed.barrier()  # no rank runs ahead of (or resumes before) the finished checkpoint
        return path

    log(f"training {decl['name']} ({model.num_parameters():,} parameters) on {device}, "
        f"{torch.get_num_threads()} threads, {precision}; {n:,} images, batch {recipe.batch_size}"
        f"{f' x {dist.world} processes' if dist.world > 1 else ''}, {recipe.epochs} epochs; "
        f"validation: {val_source}")
    started = time.perf_counter()
    steps_done = 0
    with _StopFlag() as stop:
        for epoch in range(start_epoch, recipe.epochs):
            order = epoch_order(recipe.seed, epoch, n).to(device)
            flips = alternating_flips(recipe.seed, n, epoch).to(device) if recipe.flip and recipe.alt_flip else None
            for bias in whiten_biases:
                bias.requires_grad_(epoch < recipe.whiten_bias_epochs)
            lr = learning_rate(recipe, epoch, start_step, spe)
            log(f"Epoch {epoch + 1}/{recipe.epochs}  learning rate: {lr:.6g}")
            model.train()
            # Running sums of a partly done epoch come back from the checkpoint, so resumed metrics match.
            # (They are sums over all ranks, restored on rank 0 only.)
            partial = partial if dist.is_main else {}
            loss_sum = torch.tensor(partial.get("loss_sum", 0.0), device=device, dtype=torch.float64)
            correct = torch.tensor(partial.get("correct", 0), device=device, dtype=torch.int64)
            seen = partial.get("seen", 0)
            epoch_start = time.perf_counter() - partial.get("seconds", 0.0)
            partial = {}
            bar = _bar(spe, start_step, f"epoch {epoch + 1}/{recipe.epochs}", progress and dist.is_main)
            for step in range(start_step, spe):
                idx = batch_indices(order, step, recipe.batch_size, dist)
                x = images[idx]
                if flips is not None:
                    x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(3), x)
                x = normalization(x)
                if augment.active:
                    x = augment(x)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = labels[idx]
                if recipe.schedule not in ("exp", "constant"):
                    _set_lr(optimizer, learning_rate(recipe, epoch, step, spe))
                else:
                    _set_lr(optimizer, lr)
                with autocast:
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if lookahead is not None:
                    lookahead.step(model, epoch * spe + step + 1)
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                steps_done += 1
                if bar is not None and (step % 20 == 0 or step == spe - 1):
                    _check_finite(loss_sum, epoch, step)
                    elapsed = time.perf_counter() - epoch_start
                    bar.set_postfix_str(f"loss {float(loss_sum) / seen:.4f} acc {float(correct) / seen:.4f} "
                                        f"{seen * dist.world / max(elapsed, 1e-9):.0f} img/s", refresh=False)
                if bar is not None:
                    bar.update(1)
                global_step = epoch * spe + step + 1
                stop_now = _any_rank(stop.requested, dist)  # every rank stops at the same step
                interrupted = stop_now or (max_steps is not None and steps_done >= max_steps)
                if checkpoint_every and global_step % checkpoint_every == 0 and step != spe - 1 or \
                        interrupted and step != spe - 1:
                    _check_finite(loss_sum, epoch, step)
                    total_loss, total_correct, total_seen = _global_sums(loss_sum, correct, seen, dist)
                    path = save(epoch, step + 1, global_step, {
                        "loss_sum": total_loss, "correct": total_correct, "seen": total_seen,
                        "seconds": time.perf_counter() - epoch_start})
                    if interrupted:
                        if bar is not None:
                            bar.close()
                        if stop_now:
                            raise TrainingInterrupted(path or run_dir)
                        return _result(run_dir, model, history, normalization, data, val_source, started, base_meta)
            if bar is not None:
                bar.close()
            start_step = 0
            _check_finite(loss_sum, epoch, spe)
            seconds = time.perf_counter() - epoch_start
            total_loss, total_correct, total_seen = _global_sums(loss_sum, correct, seen, dist)
            row = {"epoch": epoch + 1, "train_loss": total_loss / max(total_seen, 1),
                   "train_acc": total_correct / max(total_seen, 1), "lr": lr, "seconds": seconds,
                   "images_per_s": total_seen / max(seconds, 1e-9)}
            if dist.is_main:
                # TTA level 2 costs six passes per image: the per-epoch check uses at most flip TTA, the
                # last epoch the recipe's own level (so the final row is the final model's accuracy).
                tta = recipe.tta if epoch + 1 == recipe.epochs else min(recipe.tta, 1)
                val_logits = predict_logits(model, val_split.images, normalization, device=device, tta=tta,
                                            channels_last=channels_last)
                row["val_loss"] = float(F.cross_entropy(val_logits, val_split.labels))
                row["val_acc"] = float((val_logits.argmax(1) == val_split.labels).float().mean())
                log(f"  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | val loss {row['val_loss']:.4f} "
                    f"acc {row['val_acc']:.4f} | {seconds:.1f} s, {row['images_per_s']:.0f} img/s")
            history.append(row)
            if dist.is_main:
                write_metrics_csv(run_dir / "metrics.csv", history)
                if writer is not None:
                    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
                        writer.add_scalar(key.replace("_", "/", 1), row[key], epoch + 1)
                    writer.flush()
            path = save(epoch + 1, 0, (epoch + 1) * spe)
            if _any_rank(stop.requested, dist):
                raise TrainingInterrupted(path or run_dir)
            if max_steps is not None and steps_done >= max_steps:
                break
    if writer is not None:
        writer.close()
    result = _result(run_dir, model, history, normalization, data, val_source, started, base_meta)
    if dist.is_main and history and len(history) == recipe.epochs:
        meta = dict(base_meta, epoch=recipe.epochs, history=history, metrics=history[-1],
                    train_seconds=result.seconds)
        ckpts.save_checkpoint(run_dir / "final", model, meta)
    return result


def _result(run_dir, model, history, normalization, data, val_source, started, base_meta) -> TrainResult:
    return TrainResult(run_dir=run_dir, model=model, history=history, normalization=normalization,
                       classes=list(data.classes), val_source=val_source,
                       seconds=time.perf_counter() - started, meta=base_meta)


def _global_sums(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, dist: DistInfo) -> tuple[float, int, int]:
    """Loss sum, correct count and images seen, summed over all ranks (an all-reduce under DDP)."""
    if dist.world == 1:
        return float(loss_sum), int(correct), seen
    totals = torch.tensor([float(loss_sum), float(correct), float(seen)], dtype=torch.float64,
                          device=_collective_device())
    torch.distributed.all_reduce(totals)
    return float(totals[0]), int(totals[1]), int(totals[2])


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool, dist: DistInfo) -> bool:
    """True on every rank if it is true on any rank (a signal may reach only some processes)."""
    if dist.world == 1:
        return flag
    t = torch.tensor(int(flag), device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t)


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss_sum):
        raise TrainingError(f"the loss became NaN or infinite in epoch {epoch + 1} (by step {step + 1}); "
                            f"stopping. The last good checkpoint is kept; start a new run with a lower learning rate "
                            f"(--resume keeps the recipe).")


def _try_resume(run_dir: Path, recipe: Recipe, log):
    if not ckpts.checkpoint_dirs(run_dir):
        log(f"no checkpoint in {run_dir}; starting from scratch")
        return None
    ckpt = ckpts.load_latest(run_dir, with_train_state=True, report=log)
    saved = ckpt.train_state.get("recipe", {})
    if saved and saved != asdict(recipe):
        diff = {k: (saved.get(k), v) for k, v in asdict(recipe).items() if saved.get(k) != v}
        raise CheckpointError(f"{ckpt.path}: --resume with a different recipe {diff} (saved, asked); "
                              f"resume with the same settings or start a new run.")
    world = dist_info().world
    if ckpt.train_state.get("world_size", 1) != world:
        raise CheckpointError(f"{ckpt.path}: saved with {ckpt.train_state.get('world_size')} processes, resumed "
                              f"with {world}; resume with the same number of processes.")
    rank = dist_info().rank
    rngs = {k: ckpt.optimizer_tensors.pop(k) for k in list(ckpt.optimizer_tensors) if k.startswith("rng.torch")}
    ckpt.optimizer_tensors_rng = rngs.get(f"rng.torch.rank{rank}", rngs.get("rng.torch"))
    return ckpt


def _bar(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu":
        # Native bf16 dot products (AVX512-BF16, AMX) run the convolutions ~2x faster than fp32 (bench/);
        # without them oneDNN emulates bf16 and fp32 is the faster choice.
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return "bf16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "fp32"
    return "fp32"


def _train_autocast(device: torch.device, precision: str):
    # bf16 autocast needs no gradient scaler: weights, optimizer and loss stay fp32.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _maybe_compile(model, log):
    try:
        return torch.compile(model)
    except Exception as e:  # unsupported platform or Python: eager is always correct
        log(f"torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")
        return model


def _tensorboard_writer(run_dir: Path, enabled: bool, log):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("--tensorboard needs the 'tensorboard' package (pip install 'cifarlab[tensorboard]'); skipping")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
