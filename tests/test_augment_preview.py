"""cifarlab augment-preview: the grid PNG, and that its views are the training batch path on real CIFAR-10."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from cifarlab.augment_preview import preview, soft_label
from cifarlab.cli import main
from cifarlab.data import CIFAR10
from cifarlab.recipes import recipe_from
from cifarlab.train import epoch_order
from cifarlab.transforms import alternating_flips


@pytest.fixture(scope="module")
def small(cifar):
    return CIFAR10(train=cifar.train.subset(slice(0, 500)), test=cifar.test.subset(slice(0, 100)),
                   classes=cifar.classes, root=cifar.root)


def test_command_writes_the_grid(data_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "grid.png"
    code = main(["augment-preview", "--preset", "fast", "--mixup", "0.4", "--cutmix", "1.0", "--n", "3",
                 "--views", "2", "--out", str(out), "--data-dir", str(data_dir), "--no-download"])
    assert code == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        width, height = img.size
    # 3 columns (original + 2 views) of 1.8 inches and 3 rows of 2.6 at 100 dpi, trimmed to their content
    assert 0.8 * 3 * 180 < width < 1.15 * 3 * 180
    assert 0.8 * 3 * 260 < height < 3 * 260 + 200


def test_command_bad_input_is_one_line(data_dir, tmp_path, capsys):
    code = main(["augment-preview", "--val-split", "49999", "--n", "8", "--out", str(tmp_path / "x.png"),
                 "--data-dir", str(data_dir), "--no-download"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot preview 8 images") and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("preset", ["exercise", "fast"])
def test_without_augmentation_views_are_the_originals(small, preset):
    """exercise: x/255 - 0.5; fast without its flip and translation: the training set's mean and std.
    Either way the normalization round trip gives back every stored pixel exactly."""
    recipe = recipe_from(preset, flip=False, translate=0)
    result = preview(recipe, small, n=8, views=3)
    assert result.originals.dtype == torch.uint8 and result.views.shape == (3, 8, 3, 32, 32)
    for view in result.views:
        assert torch.equal(view, result.originals)
    assert torch.equal(result.targets, torch.nn.functional.one_hot(result.labels, 10).float().expand(3, -1, -1))


def test_alternating_flips_follow_the_epoch(small):
    recipe = recipe_from("exercise", flip=True, alt_flip=True)
    for epoch in (0, 1):
        result = preview(recipe, small, n=16, views=2, epoch=epoch)
        idx = epoch_order(recipe.seed, epoch, len(small.train))[:16]
        assert torch.equal(result.originals, small.train.images[idx])
        mask = alternating_flips(recipe.seed, len(small.train), epoch)[idx].view(-1, 1, 1, 1)
        expected = torch.where(mask, result.originals.flip(3), result.originals)
        assert 0 < int(mask.sum()) < 16
        for view in result.views:  # the same mask in every view: alternating flips are not random draws
            assert torch.equal(view, expected)


def test_preview_leaves_the_global_rng_and_is_seeded(small):
    recipe = recipe_from("fast", mixup=0.4, cutmix=1.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = preview(recipe, small, n=8, views=4, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    again = preview(recipe, small, n=8, views=4, seed=5)
    other = preview(recipe, small, n=8, views=4, seed=6)
    assert torch.equal(first.views, again.views) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.views, other.views)
    assert torch.allclose(first.targets.sum(-1), torch.ones(4, 8))
    assert ((first.targets > 0).sum(-1) == 2).any()  # some images really are mixed


def test_soft_label_text():
    classes = ["airplane", "cat", "dog"]
    assert soft_label(torch.tensor([0.0, 1.0, 0.0]), classes) == "cat"
    assert soft_label(torch.tensor([0.0, 0.37, 0.63]), classes) == "0.63 dog\n0.37 cat"
