"""Training on real data: it learns, it is seeded, it resumes exactly, it writes what it says."""
from __future__ import annotations

import csv

import pytest
import torch

from cifarlab import checkpoints as C
from cifarlab.data import CIFAR10
from cifarlab.evaluate import evaluate_model
from cifarlab.train import PRESETS, Recipe, learning_rate, recipe_from, train


def quiet(*args, **kwargs):
    pass


def small(cifar, n_train=2000, n_test=1000) -> CIFAR10:
    return CIFAR10(cifar.train.subset(slice(0, n_train)), cifar.test.subset(slice(0, n_test)), cifar.classes)


def test_short_training_on_real_data_learns(trained_run, cifar):
    ckpt = C.load_checkpoint(trained_run / "final")
    ev = evaluate_model(ckpt.model, cifar.test.images, cifar.test.labels, cifar.classes,
                        __import__("cifarlab").Normalization.from_dict(ckpt.meta["normalization"]))
    # One epoch on 3,000 images: far above the 10% of chance (about 30-35% is typical).
    assert ev.accuracy > 0.25, ev.accuracy
    rows = list(csv.DictReader(open(trained_run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"}
    assert float(rows[0]["lr"]) == pytest.approx(5e-3)


def test_exercise_recipe_is_the_default():
    r = PRESETS["exercise"]
    assert (r.model, r.epochs, r.batch_size, r.optimizer, r.lr, r.schedule, r.lr_decay, r.normalization) == \
        ("exercise", 10, 32, "adamax", 5e-3, "exp", 0.9, "exercise")
    assert not (r.flip or r.translate or r.cutout or r.label_smoothing)
    lrs = [learning_rate(r, epoch, 0, 1563) for epoch in range(10)]
    assert lrs == pytest.approx([5e-3 * 0.9 ** e for e in range(10)])


def test_same_seed_same_numbers(cifar, tmp_path):
    data = small(cifar, 640, 200)
    a = train(recipe_from("exercise", epochs=1), data, tmp_path / "a", progress=False, log=quiet)
    b = train(recipe_from("exercise", epochs=1), data, tmp_path / "b", progress=False, log=quiet)
    c = train(recipe_from("exercise", epochs=1, seed=1), data, tmp_path / "c", progress=False, log=quiet)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.fc1.weight, c.model.fc1.weight)
    assert a.history[0]["val_loss"] == b.history[0]["val_loss"]


def test_resume_mid_epoch_gives_the_same_weights_and_predictions(cifar, tmp_path):
    data = small(cifar, 960, 200)
    recipe = recipe_from("exercise", epochs=2)
    full = train(recipe, data, tmp_path / "full", progress=False, log=quiet)
    part = train(recipe, data, tmp_path / "part", progress=False, log=quiet, max_steps=40)  # 30 steps/epoch
    assert part.history and len(part.history) == 1
    assert C.checkpoint_dirs(tmp_path / "part")[0].name == C.checkpoint_name(40)
    resumed = train(recipe, data, tmp_path / "part", progress=False, log=quiet, resume=True)
    for (name, pa), pb in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    timing = {"seconds", "images_per_s"}
    for row_full, row_resumed in zip(full.history, resumed.history, strict=True):
        assert {k: v for k, v in row_full.items() if k not in timing} == \
            {k: v for k, v in row_resumed.items() if k not in timing}
    final_full = C.load_checkpoint(tmp_path / "full" / "final")
    final_resumed = C.load_checkpoint(tmp_path / "part" / "final")
    assert final_full.meta["weights_sha256"] == final_resumed.meta["weights_sha256"]


def test_resume_with_a_different_recipe_is_refused(cifar, tmp_path):
    data = small(cifar, 320, 100)
    train(recipe_from("exercise", epochs=1), data, tmp_path / "r", progress=False, log=quiet, max_steps=3)
    with pytest.raises(Exception, match="different recipe"):
        train(recipe_from("exercise", epochs=1, lr=0.1), data, tmp_path / "r", progress=False, log=quiet, resume=True)


def test_holdout_validation_and_augmented_preset_train(cifar, tmp_path):
    data = small(cifar, 1024, 200)
    recipe = recipe_from("fast", epochs=1, batch_size=128, val_split=256)
    result = train(recipe, data, tmp_path / "fast", progress=False, log=quiet)
    assert "held out" in result.val_source
    assert 0 <= result.history[0]["val_acc"] <= 1 and result.history[0]["train_loss"] > 0


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", -1), ("lr", float("nan")),
                                          ("optimizer", "rmsprop"), ("model", "nope"), ("translate", 99)])
def test_bad_recipe_values_are_rejected(field, value):
    with pytest.raises(Exception):
        Recipe(**{field: value}).validate()


def test_checkpoints_are_pruned(cifar, tmp_path):
    data = small(cifar, 320, 100)
    train(recipe_from("exercise", epochs=3), data, tmp_path / "r", progress=False, log=quiet, checkpoint_every=4)
    names = [p.name for p in C.checkpoint_dirs(tmp_path / "r")]
    assert names == [C.checkpoint_name(30), C.checkpoint_name(28)]  # the newest two; 10 steps per epoch
