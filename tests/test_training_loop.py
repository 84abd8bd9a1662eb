"""The callback loop and the training doctor's callbacks on real data: events, replaced batches and losses,
EMA, early stopping with best restore, MixUp/CutMix, the diagnosis; each stateful one resumes exactly."""
from __future__ import annotations

import pytest
import torch

from cifarlab import checkpoints as C
from cifarlab.data import CIFAR10, holdout_split
from cifarlab.evaluate import evaluate_model
from cifarlab.train import Callback, RunOptions, recipe_from, train
from cifarlab.train.callbacks.ema import EMA
from cifarlab.train.loop import EVENTS


def quiet(*args, **kwargs):
    pass


def small(cifar, n_train=640, n_test=200) -> CIFAR10:
    return CIFAR10(cifar.train.subset(slice(0, n_train)), cifar.test.subset(slice(0, n_test)), cifar.classes)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name in EVENTS:
            return lambda t: object.__getattribute__(self, "events").append((name, t.epoch, t.step))
        return object.__getattribute__(self, name)


for _event in EVENTS:  # overridden, so the loop calls them
    setattr(Recorder, _event, lambda self, t: None)


def test_events_fire_in_the_documented_order(cifar, tmp_path):
    rec = Recorder()
    train(recipe_from("exercise", epochs=2, batch_size=320), small(cifar), tmp_path / "r", progress=False,
          log=quiet, callbacks=[rec])
    names = [e for e, _, _ in rec.events]
    one_step = ["batch_start", "after_loss", "after_step"]
    epoch = ["epoch_start", *one_step, *one_step, "eval_start", "eval_end", "epoch_end", "checkpoint"]
    assert names == ["fit_start", *epoch, *epoch, "fit_end"]
    # Positions: after_step sees the next step; the epoch's checkpoint is at (epoch + 1, 0).
    assert [(e, s) for n, e, s in rec.events if n in ("after_step", "checkpoint")] == \
        [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]


class ZeroLoss(Callback):
    def after_loss(self, t):
        t.loss = t.loss * 0.0


class SwapLabels(Callback):
    def __init__(self):
        self.seen = []

    def batch_start(self, t):
        x, y = t.batch
        t.batch = (x, torch.zeros_like(y))
        self.seen.append(len(y))


class InitialWeights(Callback):
    def fit_start(self, t):
        self.weights = {k: v.clone() for k, v in t.model.state_dict().items()}


def test_callbacks_may_replace_the_loss_and_the_batch(cifar, tmp_path):
    data = small(cifar, 320, 100)
    initial = InitialWeights()
    zero = train(recipe_from("exercise", epochs=1), data, tmp_path / "a", progress=False, log=quiet,
                 callbacks=[initial, ZeroLoss()])
    # A zero loss has zero gradients: Adamax moves nothing, so the weights stay the initial ones.
    _same_weights(zero.model.state_dict(), initial.weights)
    swap = SwapLabels()
    result = train(recipe_from("exercise", epochs=1), data, tmp_path / "b", progress=False, log=quiet,
                   callbacks=[swap])
    assert sum(swap.seen) == 320
    # Trained on all-"airplane" labels: the net predicts class 0 for (nearly) everything.
    x = result.normalization(data.test.images[:50]).contiguous(memory_format=torch.channels_last)
    assert (result.model.eval()(x).argmax(1) == 0).float().mean() > 0.9


def _weights(path):
    return C.load_checkpoint(path).model.state_dict()


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _resume_matches_uninterrupted(cifar, tmp_path, recipe, data, stop_at, callbacks=lambda: []):
    full = train(recipe, data, tmp_path / "full", progress=False, log=quiet, callbacks=callbacks())
    train(recipe, data, tmp_path / "part", progress=False, log=quiet, max_steps=stop_at, callbacks=callbacks())
    resumed = train(recipe, data, tmp_path / "part", progress=False, log=quiet, resume=True, callbacks=callbacks())
    _same_weights(_weights(tmp_path / "full" / "final"), _weights(tmp_path / "part" / "final"))
    timing = {"seconds", "images_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in full.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in resumed.history]
    return full, resumed


def test_ema_is_evaluated_saved_and_resumed_exactly(cifar, tmp_path):
    recipe = recipe_from("exercise", epochs=2, ema=0.99)
    full, _ = _resume_matches_uninterrupted(cifar, tmp_path, recipe, small(cifar), stop_at=27)  # mid epoch 2
    final = _weights(tmp_path / "full" / "final")
    live = C.load_latest(tmp_path / "full", with_train_state=True)
    # The final model is the average, not the last live weights; the checkpoint keeps both.
    assert not torch.equal(final["fc1.weight"], live.model.state_dict()["fc1.weight"])
    assert torch.equal(final["fc1.weight"], live.optimizer_tensors["ema.w.fc1.weight"])
    assert live.train_state["callbacks"]["ema"]["updates"] == 40
    assert torch.equal(full.model.fc1.weight, final["fc1.weight"])


def test_ema_average_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)

    class T:
        pass

    t = T()
    t.model = model
    ema.fit_start(t)
    expected = model.weight.detach().clone()
    for step in range(30):
        with torch.no_grad():
            model.weight.add_(1.0)
        decay = min(0.9, (1 + step) / (10 + step))  # warm-up as TensorFlow's num_updates
        expected = decay * expected + (1 - decay) * model.weight.detach()
        ema.after_step(t)
    assert torch.allclose(ema.model.weight, expected, atol=1e-5)
    assert t.eval_model is ema.model


class ScriptedValidation(Callback):
    """Replaces each epoch's validation accuracy by a scripted one (by epoch number: resume-safe)."""
    order = 5  # before early stopping reads it

    def __init__(self, accuracies):
        self.accuracies = accuracies

    def eval_end(self, t):
        t.row["val_acc"] = self.accuracies[t.row["epoch"] - 1]


def test_early_stopping_stops_restores_the_best_and_resumes_exactly(cifar, tmp_path):
    recipe = recipe_from("exercise", epochs=5, early_stop=2, val_split=100)
    data = small(cifar)  # 540 training images: 17 steps per epoch
    scripted = lambda: [ScriptedValidation([0.5, 0.6, 0.55, 0.58, 0.9])]  # noqa: E731 (best: epoch 2)
    train(recipe, data, tmp_path / "keep", progress=False, log=quiet, callbacks=scripted(), keep_checkpoints=10)
    full, resumed = _resume_matches_uninterrupted(cifar, tmp_path, recipe, data, stop_at=40, callbacks=scripted)
    assert [r["epoch"] for r in full.history] == [1, 2, 3, 4]  # stopped after 2 epochs without improvement
    final = C.load_checkpoint(tmp_path / "full" / "final")
    assert final.meta["early_stopping"] == {"patience": 2, "best_epoch": 2, "best_val_acc": 0.6, "epochs_run": 4,
                                            "stopped_early": True}
    assert final.meta["metrics"]["epoch"] == 2
    epoch2 = _weights(tmp_path / "keep" / C.CKPT_DIR / C.checkpoint_name(2 * 17))
    _same_weights(final.model.state_dict(), epoch2)


def test_the_final_model_scores_the_best_epochs_validation_accuracy(cifar, tmp_path):
    # Real accuracies, nothing scripted: lr 0.02 makes the exercise net's validation accuracy wander.
    recipe = recipe_from("exercise", epochs=4, early_stop=1, val_split=200, lr=0.02)
    result = train(recipe, small(cifar, 1200, 100), tmp_path / "r", progress=False, log=quiet)
    final = C.load_checkpoint(tmp_path / "r" / "final")
    best = max(row["val_acc"] for row in result.history)
    val = holdout_split(small(cifar, 1200, 100).train, 200, seed=0)[1]
    accuracy = evaluate_model(final.model, val.images, val.labels, cifar.classes, result.normalization).accuracy
    assert accuracy == pytest.approx(best, abs=1e-6)  # float32 mean of 200 hits: steps of 0.005
    assert final.meta["early_stopping"]["best_val_acc"] == best


def test_an_early_stopped_run_resumed_after_losing_its_final_model_does_not_train_on(cifar, tmp_path):
    # Killed after the stopping epoch's checkpoint but before final/ was written: resume must finish the
    # run as it was (best weights, no more epochs), not train past the stop.
    recipe = recipe_from("exercise", epochs=5, early_stop=1, val_split=100)
    scripted = [ScriptedValidation([0.5, 0.4, 0.9, 0.9, 0.9])]  # stops after epoch 2
    first = train(recipe, small(cifar), tmp_path / "r", progress=False, log=quiet, callbacks=scripted)
    kept = _weights(tmp_path / "r" / "final")
    __import__("shutil").rmtree(tmp_path / "r" / "final")
    again = train(recipe, small(cifar), tmp_path / "r", progress=False, log=quiet, resume=True, callbacks=scripted)
    assert len(first.history) == len(again.history) == 2
    _same_weights(_weights(tmp_path / "r" / "final"), kept)


def test_best_weights_are_restored_even_without_an_early_stop(cifar, tmp_path):
    recipe = recipe_from("exercise", epochs=3, early_stop=5, val_split=100)
    train(recipe, small(cifar), tmp_path / "r", progress=False, log=quiet, keep_checkpoints=10,
          callbacks=[ScriptedValidation([0.4, 0.7, 0.5])])
    final = C.load_checkpoint(tmp_path / "r" / "final")
    assert final.meta["early_stopping"]["stopped_early"] is False
    _same_weights(final.model.state_dict(), _weights(tmp_path / "r" / C.CKPT_DIR / C.checkpoint_name(2 * 17)))


def test_mixup_and_cutmix_resume_exactly_and_are_marked(cifar, tmp_path):
    recipe = recipe_from("exercise", epochs=2, mixup=0.4, cutmix=1.0, label_smoothing=0.1)
    lines = []
    _resume_matches_uninterrupted(cifar, tmp_path, recipe, small(cifar), stop_at=25)
    train(recipe, small(cifar), tmp_path / "log", progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("acc (mixed)" in line for line in lines)
    assert any("mixup 0.4, cutmix 1" in line for line in lines)


def test_the_diagnosis_is_printed_and_stored(cifar, tmp_path):
    lines = []
    train(recipe_from("exercise", epochs=2, batch_size=64), small(cifar), tmp_path / "r", progress=False,
          log=lambda *a: lines.append(" ".join(map(str, a))))
    meta = C.load_checkpoint(tmp_path / "r" / "final").meta
    assert meta["diagnosis"] and all(isinstance(f["text"], str) for f in meta["diagnosis"])
    assert meta["val_size"] == 200
    assert meta["diagnosis"][0]["text"] in "\n".join(lines)


def test_run_options_make_the_resume_flags():
    assert RunOptions().resume_flags() == ["--no-adaptive-threads"]  # the library's default is off, the CLI's on
    assert RunOptions(threads=1, checkpoint_every=50).resume_flags() == ["--checkpoint-every", "50", "--threads", "1"]
    assert RunOptions(adaptive_threads=True, precision="fp32", tensorboard=True, max_steps=3, progress=False) \
        .resume_flags() == ["--precision", "fp32", "--tensorboard"]
