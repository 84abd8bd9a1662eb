"""Muon (airbench94_muon): orthogonalized updates, the preset, bitwise resume, a smoke training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifarlab.data import CIFAR10
from cifarlab.models import Net, get_declaration
from cifarlab.optimizers import Muon, muon_groups, orthogonalize
from cifarlab.train import PRESETS, make_optimizer, recipe_from, train
from cifarlab.transforms import Normalization


def quiet(*args, **kwargs):
    pass


@pytest.mark.parametrize("shape", [(64, 216), (256, 576), (300, 40)])
def test_newton_schulz_makes_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    before = torch.linalg.svdvals(g)
    assert before.max() / before.min() > 2  # a random matrix is far from orthogonal
    for steps in (3, 5):
        s = torch.linalg.svdvals(orthogonalize(g, steps).float())
        assert s.min() > 0.5 and s.max() < 1.3, (steps, s.min(), s.max())
    # same row and column spaces: the update is U S' V^T of the input's U, V
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    o = orthogonalize(g, 5).float()
    assert torch.allclose(u @ (u.T @ o @ vh.T) @ vh, o, atol=2e-2)


def test_muon_step_moves_a_filter_bank_by_an_orthogonal_matrix():
    w = torch.nn.Parameter(torch.randn(32, 16, 3, 3))
    opt = Muon([w], lr=0.1, momentum=0.0)
    w.grad = torch.randn_like(w)
    opt.step()
    # the filter bank was renormalized to norm sqrt(32) before the step, then moved by lr x (orthogonal-ish)
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step()
    update = (before * (32 ** 0.5) / before.norm() - w.detach()) / 0.1
    s = torch.linalg.svdvals(update.reshape(32, -1))
    assert s.min() > 0.5 and s.max() < 1.3


def test_muon_groups_follow_airbench94_muon():
    recipe = recipe_from("airbench94-muon")
    torch.manual_seed(0)
    model = Net(get_declaration(recipe.model))
    for m in model.modules():
        if hasattr(m, "bias") and m.bias is not None and type(m).__name__ == "Whiten":
            m.bias.requires_grad_(True)
    opt = make_optimizer(recipe, model)
    assert isinstance(opt, Muon)
    filt, dense, vec, whiten = opt.param_groups
    assert filt["orthogonalize"] and all(p.ndim == 4 and p.requires_grad for p in filt["params"])
    assert len(filt["params"]) == 6 and filt["lr"] == pytest.approx(0.24) and filt["momentum"] == 0.6
    assert filt["nesterov"] and filt["weight_decay"] == 0
    assert len(dense["params"]) == 1 and dense["momentum"] == 0.85 and dense["nesterov"]
    # airbench's sum-loss values x 2000 (mean loss); the head's / 768 for its init (see recipes.py)
    assert dense["lr"] == pytest.approx(0.67 * 2000 / 768)
    assert vec["lr"] == pytest.approx(0.053 * 2000)
    assert whiten["lr"] == pytest.approx(0.053 * 2000) and whiten["momentum"] == 0.85
    for g in (dense, vec, whiten):  # every SGD parameter shrinks by 2e-6 x 2000 per step (at the peak lr)
        assert g["lr"] * g["weight_decay"] == pytest.approx(2e-6 * 2000)
    assert PRESETS["airbench94-muon"].batch_size == 2000 and PRESETS["airbench94-muon"].epochs == 8


def test_whitening_bias_lr_falls_to_zero_over_its_epochs():
    """airbench94_muon: whitening-bias lr = peak x (1 - step / (3 epochs of steps)); the rest: peak x (1 - t)."""
    from cifarlab.train import set_lr

    recipe = recipe_from("airbench94-muon")
    model = Net(get_declaration(recipe.model))
    model.whiten.bias.requires_grad_(True)
    opt = make_optimizer(recipe, model)
    whiten = next(g for g in opt.param_groups if g.get("zero_at"))
    assert whiten["params"] == [model.whiten.bias] and whiten["zero_at"] == pytest.approx(3 / 8)
    others = [g for g in opt.param_groups if g is not whiten]
    assert all(model.whiten.bias is not p for g in others for p in g["params"])
    spe, total = 25, 200
    for step in (0, 30, 74, 75, 150):
        factor = 1 - step / total  # the linear schedule's
        set_lr(opt, recipe.lr * factor, step / total)
        assert whiten["lr"] == pytest.approx(0.053 * 2000 * max(0.0, 1 - step / 75))
        assert others[-1]["lr"] == pytest.approx(0.053 * 2000 * factor)
    with pytest.raises(ValueError, match="whiten_bias_decay"):
        recipe_from("airbench94", whiten_bias_decay=True)


def test_muon_options_are_refused_for_other_optimizers():
    with pytest.raises(ValueError, match="muon optimizer only"):
        recipe_from("exercise", muon_lr=0.1)
    assert recipe_from("exercise", optimizer="muon").optimizer == "muon"


def test_muon_resume_is_bitwise(cifar, tmp_path, one_thread):
    data = CIFAR10(cifar.train.subset(slice(0, 256)), cifar.test.subset(slice(0, 64)), cifar.classes)
    recipe = recipe_from("airbench94-muon", model="fast", batch_size=64, epochs=2, tta=0, whiten_bias_epochs=1)
    full = train(recipe, data, tmp_path / "full", progress=False, log=quiet)
    train(recipe, data, tmp_path / "part", progress=False, log=quiet, max_steps=6)  # 4 steps per epoch
    resumed = train(recipe, data, tmp_path / "part", progress=False, log=quiet, resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_muon_smoke_training_lowers_the_loss(cifar, one_thread):
    # The preset's Muon settings on the small `fast` net; its SGD lrs (made for batch 2000 and BatchNorm
    # without a trained scale) lowered for batch 64.
    recipe = recipe_from("airbench94-muon", model="fast", batch_size=64, lr=0.2, bn_lr_scale=1.0)
    torch.manual_seed(0)
    model = Net(get_declaration("fast"))
    images = cifar.train.images[:640]
    norm = Normalization.for_training("standard", images)
    model.init_from_data(norm(images))
    opt = make_optimizer(recipe, model)
    assert any(g["orthogonalize"] for g in opt.param_groups)
    losses = []
    for step in range(20):
        idx = torch.arange(step * 64, step * 64 + 64) % 640
        loss = F.cross_entropy(model(norm(cifar.train.images[idx])), cifar.train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15, losses


def test_muon_groups_without_convs_are_plain_sgd():
    recipe = recipe_from("exercise", optimizer="muon", lr=0.01)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    groups = muon_groups(recipe, model)
    assert not any(g["orthogonalize"] for g in groups)
