"""``train()``: one run, assembled. The recipe and the data give a :class:`Trainer` (model, optimizer,
splits, normalization); the recipe and the :class:`RunOptions` choose its callbacks; the run folder is
claimed for the whole call (rank 0), resumed from if asked, and filled by the callbacks.

The whole dataset stays in memory as uint8; a batch is an index into it, normalized and augmented as one
tensor. Under ``torchrun`` the same loop runs data-parallel: ``batch_size`` is per process, rank 0 alone
writes files.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import checkpoints as ckpts
from .. import memory, rundir
from ..budget import Plan
from ..data import Dataset, holdout_split
from ..data.base import check_class_names
from ..devices import resolve_device
from ..errors import CheckpointError, TrainingError
from ..finetune import InitReport, init_model
from ..fsutil import atomic_write_json
from ..models import Net, Whiten, get_declaration
from ..precision import resolve_precision
from ..recipes import Recipe
from ..transforms import Normalization
from .callbacks import CALLBACKS, Context
from .callbacks.whiten_bias import whitening_biases
from .checkpointing import resume
from .distributed import DistInfo, dist_info
from .loop import Callback, Trainer
from .options import RunOptions
from .parts import epoch_order, make_optimizer


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


def train(recipe: Recipe, data: Dataset, run_dir: str | Path, options: RunOptions | None = None, *, log=print,
          callbacks: list[Callback] = (), **option_values) -> TrainResult:
    """Train ``recipe`` on ``data`` into ``run_dir`` (checkpoints, metrics.csv, the final model).

    ``options`` (or its fields as keywords: ``resume=True``, ``max_steps=40``, ``precision="fp32"`` ...): how
    the run is carried out (see :class:`RunOptions`). ``callbacks``: more :class:`Callback` objects, run with
    the recipe's own. Raises :class:`TrainingInterrupted` after Ctrl-C / SIGTERM (checkpoint written).
    """
    options = replace(options or RunOptions(), **option_values).validate()
    recipe.validate()
    if recipe.freeze_epochs and dist_info().world > 1:
        raise TrainingError("--freeze-epochs is not supported data-parallel (DDP fixes which parameters train when "
                            "it starts); fine-tune in one process.")
    if data.eval_only:
        raise TrainingError(f"{data.spec or data.name} is an evaluation-only dataset (no training images); train on "
                            f"another dataset and evaluate on this one (cifarlab evaluate RUN --on {data.spec}).")
    check_class_names(data.classes, data.spec or data.name)  # before training: the checkpoints must read back
    device = resolve_device(options.device)  # one-line error for a device this machine does not have
    memory.check_fits(get_declaration(recipe.model, data.num_classes, data.image_shape), recipe.batch_size,
                      device)  # before allocating anything
    channels_last = device.type == "cpu" if options.channels_last is None else options.channels_last
    run_dir, dist = Path(run_dir), dist_info()
    threads_before = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        # Rank 0 owns the folder (an exclusive lock for the whole run); a new run needs it missing or empty.
        with rundir.claim(run_dir, options.resume) if dist.is_main else contextlib.nullcontext():
            t = prepare(recipe, data, device, resolve_precision(options.precision, device), channels_last, dist, log)
            init = initialize(t, data, log) if recipe.init_from and not (
                options.resume and ckpts.checkpoint_dirs(run_dir)) else None
            adaptive = options.adaptive_threads and not options.threads and device.type == "cpu" \
                and dist.world == 1 and threads_before > 1
            base_meta = run_meta(t, data, "adaptive" if adaptive else torch.get_num_threads())
            if init is not None:
                base_meta["init_from"] = init.to_dict()
            t.add_callbacks([*callbacks_for(t, options, run_dir, base_meta, data, adaptive, log), *callbacks])
            if options.resume:
                resume(t, run_dir, base_meta)
                done = finished_run(t, run_dir, dist, log)
                if done is not None:  # nothing to train: the final model (and its temperature) stay as they are
                    return TrainResult(run_dir=run_dir, model=done.model.to(device).eval(),
                                       history=done.meta.get("history", t.history), normalization=t.normalization,
                                       classes=list(data.classes), val_source=t.val_source,
                                       seconds=float(done.meta.get("train_seconds", 0.0)), meta=base_meta)
            parallelize(t, options.compile)
            if dist.is_main:
                write_run_files(run_dir, recipe, data)
            log(describe(t, adaptive))
            t.fit()
            return TrainResult(run_dir=run_dir, model=t.eval_model, history=t.history, normalization=t.normalization,
                               classes=list(data.classes), val_source=t.val_source, seconds=t.train_seconds,
                               meta=base_meta)
    finally:
        torch.set_num_threads(threads_before)


def prepare(recipe: Recipe, data: Dataset, device: torch.device, precision: str, channels_last: bool,
            dist: DistInfo | None = None, log=print) -> Trainer:
    """The trainer for ``recipe`` on ``data``, with no callbacks: splits (``val_split`` images held out of the
    training set, else the test set validates, as in the exercise), normalization, model, optimizer."""
    dist = dist or DistInfo()
    train_split, val_split = data.train, data.test
    val_source = "test set (as in the exercise)"
    if recipe.val_split:
        train_split, val_split = holdout_split(data.train, recipe.val_split, seed=recipe.seed)
        val_source = f"{recipe.val_split} images held out from the training set"
    # "standard": the mean and std of the images this run trains on, whatever the dataset.
    normalization = Normalization.for_training(recipe.normalization, train_split.images)
    model = build_model(recipe, data, train_split, normalization, dist, device, channels_last)
    t = Trainer(recipe=recipe, model=model, optimizer=make_optimizer(recipe, model), train_split=train_split,
                val_split=val_split, normalization=normalization, device=device, precision=precision,
                channels_last=channels_last, dist=dist, log=log)
    t.val_source = val_source
    return t


def finished_run(t: Trainer, run_dir: Path, dist, log):
    """The final checkpoint of a run resumed after its last epoch, or None when there is training (or a missing
    or damaged final model) left to do. Resuming a finished run changes nothing: re-saving final/ would refit the
    temperature and overwrite what ``cifarlab calibrate`` stored there."""
    if t.epoch < t.recipe.epochs or dist.world > 1 or not (run_dir / "final").is_dir():
        return None
    try:
        final = ckpts.load_checkpoint(run_dir / "final")
    except CheckpointError as e:
        log(f"{run_dir / 'final'} cannot be read ({e}); writing it again from the last checkpoint")
        return None
    log(f"{run_dir} already finished its {t.recipe.epochs} epochs; nothing to train, its final model is unchanged")
    return final


def initialize(t: Trainer, data: Dataset, log) -> InitReport:
    """Load ``--init-from`` weights into the fresh model (matching names and shapes); a cifarlab source's
    normalization replaces the run's own, since its weights expect it."""
    report = init_model(t.model, t.recipe.init_from, classes=list(data.classes))
    if report.normalization:
        t.normalization = Normalization.from_dict(report.normalization)
    log(report.table())
    return report


def build_model(recipe: Recipe, data: Dataset, train_split, normalization: Normalization, dist: DistInfo,
                device: torch.device, channels_last: bool) -> Net:
    torch.manual_seed(recipe.seed)
    model = Net(get_declaration(recipe.model, data.num_classes, data.image_shape))
    if any(isinstance(m, Whiten) for m in model.modules()):  # blocks included
        sample = train_split.images[epoch_order(recipe.seed, -1, len(train_split))[:5000]]
        model.init_from_data(normalization(sample))
    for bias in whitening_biases(model):  # in the optimizer from the start; frozen after whiten_bias_epochs
        bias.requires_grad_(recipe.whiten_bias_epochs > 0)
    if dist.world > 1:
        torch.manual_seed(recipe.seed + 1_000_003 * dist.rank)  # same init, different dropout per rank
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def callbacks_for(t: Trainer, options: RunOptions, run_dir: Path, base_meta: dict, data: Dataset, adaptive: bool,
                  log) -> list[Callback]:
    """The callbacks the recipe and the options ask for: every entry of the registry that returns one."""
    context = Context(t, t.recipe, options, run_dir, base_meta, data, adaptive, log)
    return [cb for make in CALLBACKS.values() if (cb := make(context)) is not None]


def run_meta(t: Trainer, data: Dataset, threads) -> dict:
    """What every checkpoint of the run says about it (the final one adds history, metrics and more)."""
    return {"architecture": t.model.declaration, "classes": list(data.classes), "dataset": data.describe(),
            "normalization": t.normalization.to_dict(), "recipe": asdict(t.recipe), "seed": t.recipe.seed,
            "val_source": t.val_source, "val_size": len(t.val_split), "world_size": t.dist.world,
            "precision": t.precision, "threads": threads,
            "data_identity": rundir.data_identity(data)}  # compared on resume


def parallelize(t: Trainer, compile: bool) -> None:
    if t.dist.world > 1 and t.device.type == "cuda":
        # Batch statistics over the global batch, as one process would compute them. (On CPU, PyTorch's
        # SyncBatchNorm does not run, so each rank normalizes with its own shard's statistics.)
        t.model = t.train_model = t.eval_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(t.model)
    if t.dist.world > 1:
        # find_unused_parameters: the whitening bias stops receiving gradients after whiten_bias_epochs.
        t.train_model = torch.nn.parallel.DistributedDataParallel(
            t.model, device_ids=[t.device.index] if t.device.type == "cuda" else None,
            find_unused_parameters=t.recipe.whiten_bias_epochs > 0)
    if compile:
        t.train_model = _maybe_compile(t.train_model, t.log)


def write_run_files(run_dir: Path, recipe: Recipe, data: Dataset) -> None:
    """recipe.json, and dataset.json: the data this run learns from (for a photo folder, which file is in
    which split)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "recipe.json", asdict(recipe))
        atomic_write_json(run_dir / "dataset.json", dict(data.describe(), files=data.files))
    except OSError as e:
        raise TrainingError(f"{run_dir}: cannot create or write the run folder ({e.strerror or e}).") from None


def describe(t: Trainer, adaptive: bool) -> str:
    recipe, doctor = t.recipe, [f"{name} {value:g}" for name, value in (("ema", t.recipe.ema),
                                                                        ("early stop", t.recipe.early_stop),
                                                                        ("mixup", t.recipe.mixup),
                                                                        ("cutmix", t.recipe.cutmix)) if value]
    processes = f" x {t.dist.world} processes" if t.dist.world > 1 else ""
    plan = Plan(t.n, recipe.batch_size, recipe.epochs, t.spe)
    warning = None if recipe.init_from else plan.warning()  # the warning is about nets from scratch
    return (f"training {t.model.declaration['name']} ({t.model.num_parameters():,} parameters) on {t.device}, "
            f"{torch.get_num_threads()} threads{' (adaptive)' if adaptive else ''}, {t.precision}; {t.n:,} images, "
            f"batch {recipe.batch_size}{processes}, {recipe.epochs} epochs; validation: {t.val_source}"
            + (f"; {', '.join(doctor)}" if doctor else "") + f"\n{plan.describe()}"
            + (f"\n{warning}" if warning else ""))


def _maybe_compile(model, log):
    try:
        return torch.compile(model)
    except Exception as e:  # unsupported platform or Python: eager is always correct
        log(f"torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")
        return model
