"""Checkpoints of a run, and resuming from them exactly.

A checkpoint (see :mod:`cifarlab.checkpoints`) holds the weights, and in its training state: the position
(epoch, step), the optimizer, every rank's RNG state, the running sums of a partly done epoch, the
gradient scaler, and each stateful callback's ``state_dict()`` under its key (tensors as ``KEY.NAME`` in
the safetensors file, other values in the header's ``callbacks.KEY``). :class:`Checkpointer` writes them
(at every ``checkpoint`` event, and the final model when a run completes); :func:`resume` puts a trainer
and its callbacks back where the newest good checkpoint left them, after checking that it is the same run.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .. import checkpoints as ckpts
from .. import rundir
from ..errors import CheckpointError, TrainingError
from ..recipes import saved_recipe
from ..transforms import Normalization
from ..validation import check_position
from .distributed import barrier, gather_rng_states
from .loop import Callback, Trainer


class Checkpointer(Callback):
    order = 100  # last: it saves what the other callbacks did at the same event

    def __init__(self, run_dir: Path, base_meta: dict, every: int = 0, keep: int = 2):
        self.run_dir, self.base_meta, self.every, self.keep = run_dir, base_meta, every, keep

    def after_step(self, t: Trainer) -> None:
        if self.every and t.global_step % self.every == 0:
            t.checkpoint_now = True

    def checkpoint(self, t: Trainer) -> None:
        t.checkpoint_path = self.save(t)

    def fit_end(self, t: Trainer) -> None:
        if not (t.finished and t.dist.is_main):
            return
        meta = {**self.base_meta, "epoch": t.epoch, "history": t.history,
                "metrics": t.history[-1] if t.history else {}, "train_seconds": t.train_seconds, **t.final_meta}
        ckpts.save_checkpoint(self.run_dir / "final", t.eval_model, meta)

    def save(self, t: Trainer) -> Path | None:
        rng_states = gather_rng_states(t.dist)  # every rank's dropout and augmentation stream
        path = self._write(t, rng_states) if t.dist.is_main else None
        barrier(t.dist)  # no rank runs ahead of (or resumes before) the finished checkpoint
        return path

    def _write(self, t: Trainer, rng_states: list[torch.Tensor]) -> Path:
        if not all(torch.isfinite(p).all() for p in t.model.parameters()):
            raise TrainingError("weights became NaN/inf; not saving them. The last good checkpoint is kept.")
        tensors, optimizer_info = optimizer_tensors(t.optimizer)
        for rank, rng in enumerate(rng_states):
            tensors[f"rng.torch.rank{rank}"] = rng
        callback_values = {}
        for cb in t.callbacks:
            if cb.key:
                state = cb.state_dict()
                tensors.update({f"{cb.key}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
                callback_values[cb.key] = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        meta = dict(self.base_meta, epoch=t.epoch, step_in_epoch=t.step, global_step=t.global_step,
                    history=t.history, metrics=t.history[-1] if t.history else {})
        state = {"epoch": t.epoch, "step_in_epoch": t.step, "global_step": t.global_step,
                 "optimizer": optimizer_info, "recipe": asdict(t.recipe), "world_size": t.dist.world,
                 "partial_epoch": t.partial_sums, "callbacks": callback_values}
        if t.scaler is not None:
            state["grad_scaler"] = {k: float(v) if isinstance(v, torch.Tensor) else v
                                    for k, v in t.scaler.state_dict().items()}
        path = ckpts.save_checkpoint(self.run_dir / ckpts.CKPT_DIR / ckpts.checkpoint_name(t.global_step), t.model,
                                     meta, train_state=state, optimizer_tensors=tensors)
        ckpts.prune_checkpoints(self.run_dir, keep=self.keep)
        return path


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (for the header)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            (tensors if isinstance(value, torch.Tensor) else plain)[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, info: dict) -> None:
    state: dict = {}
    for source in (tensors, info["plain"]):
        for key, value in source.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def resume(t: Trainer, run_dir: Path, base_meta: dict) -> bool:
    """Restore ``t`` and its callbacks from the newest good checkpoint of ``run_dir``; False when there is none
    (a new run starts, if the folder allows it). Refuses, naming every difference, a checkpoint of another run."""
    ckpt = load_for_resume(run_dir, t.recipe, t.log, t.model.declaration, base_meta["data_identity"], t.dist)
    if ckpt is None:
        return False
    check_position(ckpt.train_state, t.recipe.epochs, t.spe, ckpt.path, CheckpointError)
    t.model.load_state_dict(ckpt.model.state_dict())
    if "init_from" in ckpt.meta:  # where its first weights came from, for the final model's meta
        base_meta["init_from"] = ckpt.meta["init_from"]
    if "normalization" in ckpt.meta:  # exactly the statistics the run started with
        t.normalization = Normalization.from_dict(ckpt.meta["normalization"])
        base_meta["normalization"] = t.normalization.to_dict()
    tensors = ckpt.optimizer_tensors
    rng = _rng_state(tensors, t.dist.rank)
    try:
        for cb in t.callbacks:
            if cb.key:
                prefix = cb.key + "."
                values = dict(ckpt.train_state.get("callbacks", {}).get(cb.key, {}))
                values.update({k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)})
                cb.load_state_dict(values)
        restore_optimizer(t.optimizer, {k: v for k, v in tensors.items() if k.split(".", 1)[0].isdigit()},
                          ckpt.train_state["optimizer"])
        if t.scaler is not None and ckpt.train_state.get("grad_scaler"):
            t.scaler.load_state_dict(ckpt.train_state["grad_scaler"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{ckpt.path}: the training state does not fit this run ({type(e).__name__}: "
                              f"{str(e)[:200]}); the training state is damaged.") from None
    torch.set_rng_state(rng)
    t.history = ckpt.meta.get("history", [])
    t.epoch, t.step = ckpt.train_state["epoch"], ckpt.train_state["step_in_epoch"]
    t.partial = ckpt.train_state.get("partial_epoch", {})
    t.log(f"resuming from {ckpt.path} (epoch {t.epoch + 1}, step {t.step})")
    return True


def _rng_state(tensors: dict, rank: int) -> torch.Tensor:
    rngs = {k: tensors.pop(k) for k in list(tensors) if k.startswith("rng.torch")}
    return rngs.get(f"rng.torch.rank{rank}", rngs.get("rng.torch"))


def load_for_resume(run_dir: Path, recipe, log, declaration: dict | None, data_identity: dict | None, dist):
    """The newest good checkpoint, if it is this run's: same recipe, model declaration (by content: a file
    may be edited or moved), data identity (counts, classes, checksums) and number of processes."""
    if not ckpts.checkpoint_dirs(run_dir):
        rundir.check_resumable_without_checkpoint(run_dir)  # never into a folder that holds something else
        log(f"no checkpoint in {run_dir}; starting from scratch")
        return None
    ckpt = ckpts.load_latest(run_dir, with_train_state=True, report=log)
    saved = saved_recipe(ckpt.train_state.get("recipe", {}))
    model_diff = rundir.declaration_differences(ckpt.model.declaration, declaration) if declaration else []
    diff = {k: (saved.get(k), v) for k, v in asdict(recipe).items()
            if saved.get(k) != v and (k != "model" or declaration is None or model_diff)} if saved else {}
    differences = ([f"--resume with a different recipe {diff} (saved, asked)"] if diff else []) + model_diff \
        + rundir.identity_differences(ckpt.meta.get("data_identity"), data_identity or {})
    if differences:
        raise CheckpointError(f"{ckpt.path}: " + "; ".join(differences) + "; resume with the run's own settings and "
                              f"data, or start a new run (another --name).")
    if ckpt.train_state.get("world_size", 1) != dist.world:
        raise CheckpointError(f"{ckpt.path}: saved with {ckpt.train_state.get('world_size')} processes, resumed "
                              f"with {dist.world}; resume with the same number of processes.")
    return ckpt
