"""MixUp / CutMix (cifarlab.mixing): the formulas, the exact CutMix areas, the global-RNG contract that exact
resume relies on, and the loss they feed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifarlab import mixing

B, C = 8, 10


def batch(n: int = B, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that differ from each other at every pixel (a per-image offset), and n distinct labels, so a
    target row names its partner and any pasted pixel tells where it came from."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=g) + 10 * torch.arange(n).view(-1, 1, 1, 1)
    return x.to(dtype), torch.arange(n)


def partners(targets: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """perm[i] from distinct labels: the other label with weight in row i (or i itself)."""
    other = targets.clone()
    other[torch.arange(len(y)), y] = 0
    return torch.where(other.sum(1) > 0, other.argmax(1), y)


def test_soft_targets_one_hot():
    t = mixing.soft_targets(torch.tensor([2, 0]), 4)
    assert t.dtype == torch.float32
    assert torch.equal(t, torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0]]))


@pytest.mark.parametrize("fn", [mixing.mixup, mixing.cutmix])
def test_targets_are_distributions(fn):
    x, y = batch()
    for seed in range(10):
        torch.manual_seed(seed)
        _, targets, _ = fn(x, y, C, 0.4)
        assert targets.shape == (B, C) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(B))
        assert (targets >= 0).all()


def test_mixup_is_the_formula_with_lam_from_the_seed():
    x, y = batch()
    torch.manual_seed(5)
    a = torch.tensor(0.4)
    lam = float(torch.distributions.Beta(a, a).sample())  # the draws mixup makes, in its order
    perm = torch.randperm(B)
    torch.manual_seed(5)
    mixed, targets, got_lam = mixing.mixup(x, y, C, 0.4)
    assert got_lam == lam and 0 < lam < 1
    assert torch.equal(mixed, x * lam + x[perm] * (1 - lam))
    onehot = F.one_hot(y, C).float()
    assert torch.equal(targets, onehot * lam + onehot[perm] * (1 - lam))


def test_cutmix_pastes_the_partner_and_weighs_labels_by_exact_area():
    x, y = batch()
    clipped = 0
    for seed in range(30):
        torch.manual_seed(seed)
        mixed, targets, lam = mixing.cutmix(x, y, C, 1.0)
        perm = partners(targets, y)
        for i in range(B):
            changed = (mixed[i] != x[i]).any(0)
            area = int(changed.sum())
            if perm[i] == i:  # its own partner: nothing visible changes, the label stays whole
                assert area == 0 and targets[i, y[i]] == 1
                continue
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            if area:  # one solid rectangle, every pixel of it the partner's
                top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
                assert area == (bottom - top) * (right - left)
                assert torch.equal(mixed[i, :, top:bottom, left:right], x[perm[i], :, top:bottom, left:right])
                assert torch.equal(mixed[i][:, ~changed], x[i][:, ~changed])
                clipped += top == 0 or left == 0 or bottom == 32 or right == 32
            fraction = area / (32 * 32)
            assert targets[i, y[perm[i]]].item() == fraction  # exact: 32 x 32 fractions are dyadic
            assert targets[i, y[i]].item() == 1 - fraction
            assert lam == 1 - fraction  # lam recomputed from the clipped box, the same for the whole batch
    assert clipped  # boxes do get clipped at the border and still weigh exactly by area


@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_same_seed_same_batch_and_global_rng_consumed(alphas):
    x, y = batch()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = mixing.mix_batch(x, y, C, *alphas)
    assert not torch.equal(torch.get_rng_state(), before)  # the draws come from the global generator
    torch.set_rng_state(before)  # what resume does with a checkpoint's RNG state
    again = mixing.mix_batch(x, y, C, *alphas)
    torch.manual_seed(7)
    seeded = mixing.mix_batch(x, y, C, *alphas)
    for out in (again, seeded):
        assert torch.equal(out[0], first[0]) and torch.equal(out[1], first[1])


def test_mix_batch_switches_between_both_modes(monkeypatch):
    calls = {"mixup": 0, "cutmix": 0}
    for name in calls:
        def counted(*args, _fn=getattr(mixing, name), _name=name):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(mixing, name, counted)
    x, y = batch()
    torch.manual_seed(0)
    for _ in range(200):
        mixing.mix_batch(x, y, C, mixup_alpha=0.4, cutmix_alpha=1.0)
    assert calls["mixup"] + calls["cutmix"] == 200
    assert 60 < calls["cutmix"] < 140  # probability 0.5 each (timm's switch)
    for alphas, mode in (((0.4, 0.0), "mixup"), ((0.0, 1.0), "cutmix")):
        before = dict(calls)
        mixing.mix_batch(x, y, C, *alphas)
        assert calls[mode] == before[mode] + 1 and sum(calls.values()) == sum(before.values()) + 1


def test_mix_batch_off_is_the_identity():
    x, y = batch()
    before = torch.get_rng_state()
    out_x, out_y = mixing.mix_batch(x, y, C)
    assert out_x is x and out_y is y
    assert torch.equal(torch.get_rng_state(), before)  # no draw when off: old runs resume unchanged


def test_cross_entropy_with_label_smoothing_on_soft_targets():
    x, y = batch()
    torch.manual_seed(3)
    _, targets, lam = mixing.mixup(x, y, C, 0.4)
    logits = torch.randn(B, C, generator=torch.Generator().manual_seed(2))
    eps = 0.1
    smoothed = targets * (1 - eps) + eps / C
    by_hand = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(F.cross_entropy(logits, targets, label_smoothing=eps), by_hand, atol=1e-6)
    # ... which is the MixUp paper's blend of the two smoothed losses
    perm = partners(targets, y)
    blend = lam * F.cross_entropy(logits, y, label_smoothing=eps) + \
        (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=eps)
    assert torch.allclose(by_hand, blend, atol=1e-6)


@pytest.mark.parametrize("fn", [mixing.mixup, mixing.cutmix])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_memory_format_and_dtype_kept(fn, dtype):
    x, y = batch(dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    mixed, targets, _ = fn(x, y, C, 1.0)
    assert mixed.dtype == dtype and mixed.is_contiguous(memory_format=torch.channels_last)
    assert targets.dtype == torch.float32


def test_dominant_labels():
    soft = torch.tensor([[0.63, 0.37, 0.0], [0.0, 0.2, 0.8]])
    assert mixing.dominant_labels(soft).tolist() == [0, 2]
    hard = torch.tensor([1, 2])
    assert mixing.dominant_labels(hard) is hard
