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


# ---------------------------------------------------------------------------------------------------
# airbench's tricks: schedule, parameter groups, lookahead, whitening-bias epochs, exact resume


def _tiny_airbench(tmp_path) -> str:
    import json

    from cifarlab.models import airbench_like

    path = tmp_path / "tiny_airbench.json"
    path.write_text(json.dumps(airbench_like((16, 32, 32), name="tiny", init="identity", bn_scale=False)))
    return str(path)


def test_onecycle_starts_and_ends_at_the_given_fractions():
    r = recipe_from("airbench94")
    spe = 49
    assert learning_rate(r, 0, 0, spe) == pytest.approx(0.2 * r.lr)
    peak_step = round(0.23 * 10 * spe)
    assert learning_rate(r, *divmod(peak_step, spe), spe) == pytest.approx(r.lr, rel=0.01)
    assert learning_rate(r, 9, spe, spe) == pytest.approx(0.07 * r.lr)  # just after the last step
    plain = recipe_from("fast")
    assert learning_rate(plain, 0, 0, 100) == 0 and learning_rate(plain, 2, 100, 100) == pytest.approx(0)


def test_sgd_groups_scale_batchnorm_lr_and_keep_the_decay_per_step():
    from cifarlab.models import build_model
    from cifarlab.train import set_lr, make_optimizer

    model = build_model("airbench94")
    opt = make_optimizer(recipe_from("airbench94"), model)
    set_lr(opt, 0.5)
    by_scale = {g["lr_scale"]: g for g in opt.param_groups}
    bn = by_scale[64.0]
    assert bn["lr"] == 32.0 and all(p.ndim == 1 for p in bn["params"])
    assert bn["lr"] * bn["weight_decay"] == pytest.approx(by_scale[1.0]["lr"] * by_scale[1.0]["weight_decay"])
    fast = make_optimizer(recipe_from("fast"), build_model("fast"))
    assert all(g["weight_decay"] == 0 for g in fast.param_groups if all(p.ndim == 1 for p in g["params"]))


def test_lookahead_pulls_toward_a_slow_copy_and_adopts_it_at_the_end():
    from cifarlab.train import Lookahead

    model = torch.nn.Linear(3, 2)
    la = Lookahead(model, every=2, total_steps=4)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    la.step(model, 1)  # not a multiple of 2: untouched
    assert torch.equal(model.weight, start + 1)
    la.step(model, 2)  # decay = 0.95**5 * (2/4)**3
    d = 0.95 ** 5 * 0.125
    assert torch.allclose(model.weight, d * start + (1 - d) * (start + 1))
    slow = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(5.0)
    la.step(model, 4)  # the last step: a scheduled pull, then the weights become the slow copy
    d = 0.95 ** 5
    assert torch.allclose(model.weight, d * slow + (1 - d) * (slow + 5))


def test_whitening_bias_trains_only_in_its_epochs(cifar, tmp_path):
    data = small(cifar, 512, 100)
    recipe = recipe_from("airbench94", model=_tiny_airbench(tmp_path), epochs=2, batch_size=128, lookahead=0,
                         whiten_bias_epochs=1, tta=0)
    train(recipe, data, tmp_path / "r", progress=False, log=quiet)
    after_1 = C.load_checkpoint(C.checkpoint_dirs(tmp_path / "r")[-1]).model.whiten.bias  # oldest kept: epoch 1
    final = C.load_checkpoint(tmp_path / "r" / "final").model
    assert after_1.abs().sum() > 0  # it moved from zero during epoch 1 ...
    assert torch.equal(final.whiten.bias, after_1)  # ... and not in epoch 2
    assert not torch.equal(final.g1_conv1.weight,
                           C.load_checkpoint(C.checkpoint_dirs(tmp_path / "r")[-1]).model.g1_conv1.weight)


def test_resume_is_exact_with_all_of_airbenchs_tricks(cifar, tmp_path):
    data = small(cifar, 512, 100)
    recipe = recipe_from("airbench94", model=_tiny_airbench(tmp_path), epochs=2, batch_size=64, lookahead=3,
                         whiten_bias_epochs=1, tta=2)  # 8 steps per epoch
    full = train(recipe, data, tmp_path / "full", progress=False, log=quiet)
    train(recipe, data, tmp_path / "part", progress=False, log=quiet, max_steps=11)  # mid epoch 2
    resumed = train(recipe, data, tmp_path / "part", progress=False, log=quiet, resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert full.history[-1]["val_acc"] == resumed.history[-1]["val_acc"]


def test_precision_choice():
    from cifarlab.train import resolve_precision

    cpu = torch.device("cpu")
    native = bool(torch.cpu.get_capabilities().get("avx512_bf16") or torch.cpu.get_capabilities().get("amx_bf16"))
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu)


def test_bf16_and_fp32_training_both_learn_and_record_their_precision(cifar, tmp_path):
    data = small(cifar, 2000, 500)
    accs = {}
    for precision in ("fp32", "bf16"):
        result = train(recipe_from("exercise", epochs=1), data, tmp_path / precision, progress=False,
                       log=quiet, precision=precision)
        accs[precision] = result.history[-1]["val_acc"]
        assert C.load_checkpoint(tmp_path / precision / "final").meta["precision"] == precision
    assert min(accs.values()) > 0.2, accs


def test_recipes_saved_by_older_versions_still_compare_equal():
    from dataclasses import asdict

    from cifarlab.train import saved_recipe

    old = {k: v for k, v in asdict(recipe_from("fast")).items()
           if k not in ("lr_start", "lr_end", "decay_all", "bn_lr_scale", "lookahead", "whiten_bias_epochs",
                        "alt_flip", "translate_pad")}
    old["tta"] = True  # stored as a bool before TTA levels
    assert saved_recipe(old) == asdict(recipe_from("fast"))
    assert saved_recipe({}) == {}


def test_options_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="sgd optimizer only"):
        recipe_from("exercise", bn_lr_scale=64.0)
    with pytest.raises(ValueError, match="whitening layer"):
        recipe_from("exercise", whiten_bias_epochs=2)
    with pytest.raises(ValueError, match="tta"):
        Recipe(tta=None).validate()
