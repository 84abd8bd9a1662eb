"""Training: recipes (presets), the loop, per-epoch metrics and resumable checkpoints.

The whole dataset stays in memory as uint8; a batch is an index into it, normalized and augmented as
one tensor. Every epoch (and optionally every N steps) a checkpoint holds the weights, optimizer, RNG
and data-order state, so ``resume=True`` continues exactly where the run stopped. Under ``torchrun``
the same loop runs data-parallel: ``batch_size`` is per process, rank 0 alone writes files.
"""
from __future__ import annotations

import contextlib
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
from . import memory, rundir
from .devices import resolve_device
from .data import Dataset, holdout_split
from .errors import CheckpointError, TrainingError
from .evaluate import predict_logits
from .fsutil import atomic_write_json, atomic_write_text
from .models import Net, Whiten, get_declaration
from .optimizers import make_muon
from .precision import autocast, grad_scaler, resolve_precision  # noqa: F401 (resolve_precision re-exported)
from .recipes import PRESETS, Recipe, recipe_from, saved_recipe  # noqa: F401 (re-exported)
from .threads import AdaptiveThreads
from .validation import check_position
from .transforms import Augment, Normalization, alternating_flips


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop


def make_optimizer(recipe: Recipe, model: torch.nn.Module, foreach: bool = True) -> torch.optim.Optimizer:
    """The recipe's optimizer. ``foreach``: PyTorch's multi-tensor implementation (one kernel per operation
    for all parameters instead of one per parameter; PyTorch picks it on CUDA only). Bitwise the same
    updates as the per-parameter loop (tests/test_optimizers_foreach.py) with fewer small ops per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "muon":  # Muon on the conv filters, SGD on the rest (airbench94_muon)
        return make_muon(recipe, model)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(_sgd_groups(recipe, model), lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov, foreach=foreach)
    cls = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[recipe.optimizer]
    # eps=1e-8: Keras 2.0.6's Adamax default, the exercise's (and PyTorch's) value.
    return cls(params, lr=recipe.lr, weight_decay=recipe.weight_decay, eps=1e-8, foreach=foreach)


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


def _set_lr(optimizer, lr, progress: float | None = None):
    """Every group's lr: the schedule's ``lr`` x the group's lr_scale; a group with ``zero_at`` (a fraction of
    training) instead falls linearly from its ``peak_lr`` to 0 at that point (airbench94_muon's whitening bias)."""
    for group in optimizer.param_groups:
        if progress is not None and group.get("zero_at"):
            group["lr"] = group["peak_lr"] * max(0.0, 1.0 - progress / group["zero_at"])
        else:
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


def train(recipe: Recipe, data: Dataset, run_dir: str | Path, device: str | torch.device | None = None,
          resume: bool = False, checkpoint_every: int = 0, keep_checkpoints: int = 2, progress: bool = True,
          compile: bool = False, channels_last: bool | None = None, log=print, max_steps: int | None = None,
          tensorboard: bool = False, precision: str = "auto", adaptive_threads: bool = False) -> TrainResult:
    """Train ``recipe`` on ``data``, writing checkpoints and metrics.csv into ``run_dir``.

    ``precision``: "fp32", "bf16" (autocast: bf16 matrix multiplies and convolutions, fp32 weights,
    optimizer and loss) or "auto": bf16 on CUDA and on CPUs with native bf16 arithmetic, else fp32.
    ``max_steps`` stops after that many optimizer steps in this call (for tests and benchmarks).
    ``adaptive_threads``: on a CPU, in one process, pick the thread count by measuring (fewer threads when
    other processes compete for the cores; see :mod:`cifarlab.threads`). Results then depend on the counts
    used, in the last bits: leave it off where runs must be bitwise reproducible.
    """
    recipe.validate()
    if data.eval_only:
        raise TrainingError(f"{data.spec or data.name} is an evaluation-only dataset (no training images); train on "
                            f"another dataset and evaluate on this one (cifarlab evaluate RUN --on {data.spec}).")
    device = resolve_device(device)  # one-line error for a device this machine does not have
    memory.check_fits(get_declaration(recipe.model, data.num_classes, data.image_shape), recipe.batch_size,
                      device)  # before allocating anything
    if channels_last is None:
        channels_last = device.type == "cpu"  # measured faster on CPU for these convs (bench/)
    # Rank 0 owns the folder (an exclusive lock for the whole run); a new run needs it missing or empty.
    with rundir.claim(run_dir, resume) if dist_info().is_main else contextlib.nullcontext():
        run = _Run(recipe, data, Path(run_dir), device, channels_last, resolve_precision(precision, device),
                   keep_checkpoints, log)
        if resume:
            run.resume()
        run.parallelize(compile)
        run.create_folder(tensorboard)
        threads_before = torch.get_num_threads()
        if adaptive_threads and device.type == "cpu" and run.dist.world == 1 and threads_before > 1:
            run.threads = AdaptiveThreads(threads_before, log=log)
            run.base_meta["threads"] = "adaptive"
        try:
            return run.loop(progress, checkpoint_every, max_steps)
        finally:
            if run.threads is not None:
                log(run.threads.describe())
                torch.set_num_threads(threads_before)
            if run.writer is not None:
                run.writer.close()


class _Run:
    """One call of train(): model, optimizer and data on the device, and where the loop stands."""

    def __init__(self, recipe: Recipe, data: Dataset, run_dir: Path, device: torch.device, channels_last: bool,
                 precision: str, keep_checkpoints: int, log):
        self.recipe, self.data, self.run_dir, self.device, self.log = recipe, data, run_dir, device, log
        self.channels_last, self.precision, self.keep_checkpoints = channels_last, precision, keep_checkpoints
        self.dist = dist_info()
        self.augment = Augment(recipe.flip, recipe.translate, recipe.cutout, recipe.translate_pad)
        self.train_split, self.val_split = data.train, data.test
        self.val_source = "test set (as in the exercise)"
        if recipe.val_split:
            self.train_split, self.val_split = holdout_split(data.train, recipe.val_split, seed=recipe.seed)
            self.val_source = f"{recipe.val_split} images held out from the training set"
        # "standard": the mean and std of the images this run trains on, whatever the dataset.
        self.normalization = Normalization.for_training(recipe.normalization, self.train_split.images)
        self.n = len(self.train_split)
        self.spe = steps_per_epoch(self.n, recipe.batch_size, self.dist.world)
        if self.spe == 0:
            raise ValueError(f"batch size {recipe.batch_size} x {self.dist.world} processes is larger than the "
                             f"{self.n} training images")
        self.model = self._build_model()
        self.train_model = self.model
        self.whiten_biases = [m.bias for m in self.model.modules() if isinstance(m, Whiten)]
        for bias in self.whiten_biases:  # in the optimizer from the start; frozen after whiten_bias_epochs
            bias.requires_grad_(recipe.whiten_bias_epochs > 0)
        self.optimizer = make_optimizer(recipe, self.model)
        self.lookahead = Lookahead(self.model, recipe.lookahead, recipe.epochs * self.spe) if recipe.lookahead else None
        self.images = self.train_split.images.to(device)
        self.labels = self.train_split.labels.to(device)
        self.autocast = autocast(device, precision)
        self.scaler = grad_scaler(device, precision)  # fp16 only (GPUs before compute capability 8.0)
        self.history: list[dict] = []
        self.start_epoch, self.start_step, self.partial = 0, 0, {}
        self.writer = None
        self.base_meta = {
            "architecture": self.model.declaration, "classes": list(data.classes), "dataset": data.describe(),
            "normalization": self.normalization.to_dict(), "recipe": asdict(recipe), "seed": recipe.seed,
            "val_source": self.val_source, "world_size": self.dist.world, "precision": precision,
            "threads": torch.get_num_threads(),
        }
        self.threads: AdaptiveThreads | None = None  # set by train() for adaptive_threads
        self.base_meta["data_identity"] = rundir.data_identity(data)  # compared on resume

    # -- set-up --------------------------------------------------------------------------------------

    def _build_model(self) -> Net:
        recipe = self.recipe
        torch.manual_seed(recipe.seed)
        model = Net(get_declaration(recipe.model, self.data.num_classes, self.data.image_shape))
        if any(isinstance(m, Whiten) for m in model.modules()):  # blocks included
            sample = self.train_split.images[epoch_order(recipe.seed, -1, self.n)[:5000]]
            model.init_from_data(self.normalization(sample))
        if self.dist.world > 1:
            torch.manual_seed(recipe.seed + 1_000_003 * self.dist.rank)  # same init, different dropout per rank
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def resume(self) -> None:
        ckpt = _try_resume(self.run_dir, self.recipe, self.log, self.model.declaration,
                           self.base_meta["data_identity"])
        if ckpt is None:
            return
        check_position(ckpt.train_state, self.recipe.epochs, self.spe, ckpt.path, CheckpointError)
        self.model.load_state_dict(ckpt.model.state_dict())
        if "normalization" in ckpt.meta:  # exactly the statistics the run started with
            self.normalization = Normalization.from_dict(ckpt.meta["normalization"])
            self.base_meta["normalization"] = self.normalization.to_dict()
        try:
            if self.lookahead is not None:
                self.lookahead.restore({k: ckpt.optimizer_tensors.pop(k) for k in list(ckpt.optimizer_tensors)
                                        if k.startswith(Lookahead.PREFIX)})
            _restore_optimizer(self.optimizer, ckpt.optimizer_tensors, ckpt.train_state["optimizer"])
            if self.scaler is not None and ckpt.train_state.get("grad_scaler"):
                self.scaler.load_state_dict(ckpt.train_state["grad_scaler"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt.path}: the optimizer state does not fit this model ({type(e).__name__}: "
                                  f"{str(e)[:200]}); the training state is damaged.") from None
        torch.set_rng_state(ckpt.optimizer_tensors_rng)
        self.history = ckpt.meta.get("history", [])
        self.start_epoch, self.start_step = ckpt.train_state["epoch"], ckpt.train_state["step_in_epoch"]
        self.partial = ckpt.train_state.get("partial_epoch", {})
        self.log(f"resuming from {ckpt.path} (epoch {self.start_epoch + 1}, step {self.start_step})")

    def parallelize(self, compile: bool) -> None:
        if self.dist.world > 1 and self.device.type == "cuda":
            # Batch statistics over the global batch, as one process would compute them. (On CPU, PyTorch's
            # SyncBatchNorm does not run, so each rank normalizes with its own shard's statistics.)
            self.model = self.train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.dist.world > 1:
            # find_unused_parameters: the whitening bias stops receiving gradients after whiten_bias_epochs.
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.recipe.whiten_bias_epochs > 0)
        if compile:
            self.train_model = _maybe_compile(self.train_model, self.log)

    def create_folder(self, tensorboard: bool) -> None:
        if self.dist.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.run_dir / "recipe.json", asdict(self.recipe))
                # The data this run learns from; for a photo folder, also which file is in which split.
                atomic_write_json(self.run_dir / "dataset.json", dict(self.data.describe(), files=self.data.files))
            except OSError as e:
                raise TrainingError(f"{self.run_dir}: cannot create or write the run folder "
                                    f"({e.strerror or e}).") from None
        self.writer = _tensorboard_writer(self.run_dir, tensorboard and self.dist.is_main, self.log)

    # -- checkpoints ---------------------------------------------------------------------------------

    def save(self, epoch: int, step_in_epoch: int, partial: dict | None = None) -> Path | None:
        path = self._save_on_main(epoch, step_in_epoch, epoch * self.spe + step_in_epoch, partial)
        if self.dist.world > 1:
            torch.distributed.barrier()  # no rank runs ahead of (or resumes before) the finished checkpoint
        return path

    def _save_on_main(self, epoch: int, step_in_epoch: int, global_step: int, partial: dict | None) -> Path | None:
        # Every rank's RNG state (its dropout and augmentation stream) goes into rank 0's checkpoint.
        rng_states = [torch.get_rng_state()]
        if self.dist.world > 1:
            rng_states = [None] * self.dist.world
            torch.distributed.all_gather_object(rng_states, torch.get_rng_state())
        if not self.dist.is_main:
            return None
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingError("weights became NaN/inf; not saving them. The last good checkpoint is kept.")
        opt_tensors, opt_info = _optimizer_tensors(self.optimizer)
        for rank, rng in enumerate(rng_states):
            opt_tensors[f"rng.torch.rank{rank}"] = rng
        if self.lookahead is not None:
            opt_tensors.update(self.lookahead.tensors())
        meta = dict(self.base_meta, epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                    history=self.history, metrics=self.history[-1] if self.history else {})
        state = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                 "optimizer": opt_info, "recipe": asdict(self.recipe), "world_size": self.dist.world,
                 "partial_epoch": partial or {}}
        if self.scaler is not None:
            state["grad_scaler"] = {k: float(v) if isinstance(v, torch.Tensor) else v
                                    for k, v in self.scaler.state_dict().items()}
        path = ckpts.save_checkpoint(self.run_dir / ckpts.CKPT_DIR / ckpts.checkpoint_name(global_step), self.model,
                                     meta, train_state=state, optimizer_tensors=opt_tensors)
        ckpts.prune_checkpoints(self.run_dir, keep=self.keep_checkpoints)
        return path

    # -- the loop ------------------------------------------------------------------------------------

    def loop(self, progress: bool, checkpoint_every: int, max_steps: int | None) -> TrainResult:
        recipe = self.recipe
        self.log(f"training {self.model.declaration['name']} ({self.model.num_parameters():,} parameters) on "
                 f"{self.device}, {torch.get_num_threads()} threads{' (adaptive)' if self.threads else ''}, "
                 f"{self.precision}; {self.n:,} images, batch "
                 f"{recipe.batch_size}{f' x {self.dist.world} processes' if self.dist.world > 1 else ''}, "
                 f"{recipe.epochs} epochs; validation: {self.val_source}")
        self.started = time.perf_counter()
        self.steps_done = 0
        with _StopFlag() as stop:
            for epoch in range(self.start_epoch, recipe.epochs):
                sums = self._train_epoch(epoch, stop, progress, checkpoint_every, max_steps)
                if sums is None:  # max_steps reached inside the epoch (checkpoint written)
                    return self._result()
                self._end_epoch(epoch, *sums)
                path = self.save(epoch + 1, 0)
                if _any_rank(stop.requested, self.dist):
                    raise TrainingInterrupted(path or self.run_dir)
                if max_steps is not None and self.steps_done >= max_steps:
                    break
        result = self._result()
        if self.dist.is_main and len(self.history) == recipe.epochs:
            meta = dict(self.base_meta, epoch=recipe.epochs, history=self.history, metrics=self.history[-1],
                        train_seconds=result.seconds)
            if recipe.val_split:  # temperature scaling on the held-out training images, never the test set
                meta["calibration"] = self._fit_temperature()
            ckpts.save_checkpoint(self.run_dir / "final", self.model, meta)
        return result

    def _train_epoch(self, epoch: int, stop: _StopFlag, progress: bool, checkpoint_every: int,
                     max_steps: int | None) -> tuple | None:
        """Run the epoch's remaining steps; return (loss sum, correct, seen, seconds) summed over ranks,
        or None when max_steps stopped it part-way. Raises TrainingInterrupted on Ctrl-C / SIGTERM."""
        recipe, dist, spe = self.recipe, self.dist, self.spe
        order = epoch_order(recipe.seed, epoch, self.n).to(self.device)
        flips = alternating_flips(recipe.seed, self.n, epoch).to(self.device) if recipe.flip and recipe.alt_flip \
            else None
        for bias in self.whiten_biases:
            bias.requires_grad_(epoch < recipe.whiten_bias_epochs)
        start_step, self.start_step = self.start_step, 0
        lr = learning_rate(recipe, epoch, start_step, spe)
        self.log(f"Epoch {epoch + 1}/{recipe.epochs}  learning rate: {lr:.6g}")
        self.model.train()
        # Running sums of a partly done epoch come back from the checkpoint, so resumed metrics match.
        # (They are sums over all ranks, restored on rank 0 only.)
        partial, self.partial = (self.partial if dist.is_main else {}), {}
        loss_sum = torch.tensor(partial.get("loss_sum", 0.0), device=self.device, dtype=torch.float64)
        correct = torch.tensor(partial.get("correct", 0), device=self.device, dtype=torch.int64)
        seen = partial.get("seen", 0)
        epoch_start = time.perf_counter() - partial.get("seconds", 0.0)
        bar = _bar(spe, start_step, f"epoch {epoch + 1}/{recipe.epochs}", progress and dist.is_main)
        try:
            for step in range(start_step, spe):
                x, y = self._batch(order, flips, step)
                _set_lr(self.optimizer, learning_rate(recipe, epoch, step, spe),
                        (epoch * spe + step) / (recipe.epochs * spe))
                loss, logits = self._step(x, y, epoch * spe + step + 1)
                if self.threads is not None:
                    self.threads.step_done(len(y))
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                self.steps_done += 1
                if bar is not None:
                    if step % 20 == 0 or step == spe - 1:
                        _check_finite(loss_sum, epoch, step)
                        rate = seen * dist.world / max(time.perf_counter() - epoch_start, 1e-9)
                        bar.set_postfix_str(f"loss {float(loss_sum) / seen:.4f} acc {float(correct) / seen:.4f} "
                                            f"{rate:.0f} img/s", refresh=False)
                    bar.update(1)
                stop_now = _any_rank(stop.requested, dist)  # every rank stops at the same step
                out_of_steps = max_steps is not None and self.steps_done >= max_steps
                periodic = checkpoint_every and (epoch * spe + step + 1) % checkpoint_every == 0
                if step != spe - 1 and (periodic or stop_now or out_of_steps):
                    _check_finite(loss_sum, epoch, step)
                    total_loss, total_correct, total_seen = _global_sums(loss_sum, correct, seen, dist)
                    path = self.save(epoch, step + 1, {"loss_sum": total_loss, "correct": total_correct,
                                                       "seen": total_seen,
                                                       "seconds": time.perf_counter() - epoch_start})
                    if self.threads is not None:
                        self.threads.pause()
                    if stop_now:
                        raise TrainingInterrupted(path or self.run_dir)
                    if out_of_steps:
                        return None
        finally:
            if bar is not None:
                bar.close()
            if self.threads is not None:
                self.threads.pause()  # validation and checkpoints are not training steps
        _check_finite(loss_sum, epoch, spe)
        return (*_global_sums(loss_sum, correct, seen, dist), time.perf_counter() - epoch_start)

    def _batch(self, order: torch.Tensor, flips: torch.Tensor | None, step: int):
        idx = batch_indices(order, step, self.recipe.batch_size, self.dist)
        x = self.normalization(self.images[idx])
        if self.augment.active:
            x = self.augment(x, flip_mask=None if flips is None else flips[idx])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]

    def _step(self, x: torch.Tensor, y: torch.Tensor, global_step: int):
        with self.autocast:
            logits = self.train_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.recipe.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # fp16: scaled loss, unscaled gradients, steps with inf/NaN gradients skipped
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.lookahead is not None:
            self.lookahead.step(self.model, global_step)
        return loss, logits

    def _end_epoch(self, epoch: int, loss_sum: float, correct: int, seen: int, seconds: float) -> None:
        """Validation, the metrics row, metrics.csv and TensorBoard (on rank 0)."""
        recipe = self.recipe
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
               "lr": learning_rate(recipe, epoch, 0, self.spe), "seconds": seconds,
               "images_per_s": seen / max(seconds, 1e-9)}
        if self.dist.is_main:
            # TTA level 2 costs six passes per image: the per-epoch check uses at most flip TTA, the
            # last epoch the recipe's own level (so the final row is the final model's accuracy).
            tta = recipe.tta if epoch + 1 == recipe.epochs else min(recipe.tta, 1)
            val_logits = predict_logits(self.model, self.val_split.images, self.normalization, device=self.device,
                                        tta=tta, channels_last=self.channels_last,
                                        precision=resolve_precision("auto", self.device, training=False))
            row["val_loss"] = float(F.cross_entropy(val_logits, self.val_split.labels))
            row["val_acc"] = float((val_logits.argmax(1) == self.val_split.labels).float().mean())
            self.log(f"  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | val loss "
                     f"{row['val_loss']:.4f} acc {row['val_acc']:.4f} | {seconds:.1f} s, "
                     f"{row['images_per_s']:.0f} img/s")
        self.history.append(row)
        if self.dist.is_main:
            write_metrics_csv(self.run_dir / "metrics.csv", self.history)
            if self.writer is not None:
                for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
                    self.writer.add_scalar(key.replace("_", "/", 1), row[key], epoch + 1)
                self.writer.flush()

    def _fit_temperature(self) -> dict:
        from .temperature import fit_on_logits

        logits = predict_logits(self.model, self.val_split.images, self.normalization, device=self.device,
                                tta=self.recipe.tta, channels_last=self.channels_last,
                                precision=resolve_precision("auto", self.device, training=False))
        entry = fit_on_logits(logits, self.val_split.labels, self.recipe.tta)
        self.log(f"temperature {entry['temperature']:.3f} fitted on {entry['fitted_on']}: ECE "
                 f"{100 * entry['ece_before']:.2f}% -> {100 * entry['ece_after']:.2f}%, NLL "
                 f"{entry['nll_before']:.4f} -> {entry['nll_after']:.4f}")
        return entry

    def _result(self) -> TrainResult:
        return TrainResult(run_dir=self.run_dir, model=self.model, history=self.history,
                           normalization=self.normalization, classes=list(self.data.classes),
                           val_source=self.val_source, seconds=time.perf_counter() - self.started,
                           meta=self.base_meta)


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


def _try_resume(run_dir: Path, recipe: Recipe, log, declaration: dict | None = None, data_identity: dict | None = None):
    if not ckpts.checkpoint_dirs(run_dir):
        rundir.check_resumable_without_checkpoint(run_dir)  # never into a folder that holds something else
        log(f"no checkpoint in {run_dir}; starting from scratch")
        return None
    ckpt = ckpts.load_latest(run_dir, with_train_state=True, report=log)
    saved = saved_recipe(ckpt.train_state.get("recipe", {}))
    # The model is compared by its declaration's content (a file may be edited, or moved), the data by
    # its identity (counts, classes, checksums): resume continues exactly the run it was started as.
    model_diff = rundir.declaration_differences(ckpt.model.declaration, declaration) if declaration else []
    diff = {k: (saved.get(k), v) for k, v in asdict(recipe).items()
            if saved.get(k) != v and (k != "model" or declaration is None or model_diff)} if saved else {}
    differences = ([f"--resume with a different recipe {diff} (saved, asked)"] if diff else []) + model_diff \
        + rundir.identity_differences(ckpt.meta.get("data_identity"), data_identity or {})
    if differences:
        raise CheckpointError(f"{ckpt.path}: " + "; ".join(differences) + "; resume with the run's own settings and "
                              f"data, or start a new run (another --name).")
    world = dist_info().world
    if ckpt.train_state.get("world_size", 1) != world:
        raise CheckpointError(f"{ckpt.path}: saved with {ckpt.train_state.get('world_size')} processes, resumed "
                              f"with {world}; resume with the same number of processes.")
    rank = dist_info().rank
    rngs = {k: ckpt.optimizer_tensors.pop(k) for k in list(ckpt.optimizer_tensors) if k.startswith("rng.torch")}
    ckpt.optimizer_tensors_rng = rngs.get(f"rng.torch.rank{rank}", rngs.get("rng.torch"))
    return ckpt


def _bar(total: int, initial: int, desc: str, enabled: bool):
    import sys

    # In a log file (stderr not a terminal) a bar is hundreds of \r frames: the per-epoch lines say it all.
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)


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
