"""The multi-tensor (foreach) optimizers cifarlab uses by default take bitwise the same steps as PyTorch's
per-parameter loop (its CPU default), so switching to them changed no result."""
from __future__ import annotations

import pytest
import torch

from cifarlab.models import Net, get_declaration
from cifarlab.train import make_optimizer, recipe_from


@pytest.mark.parametrize("preset, overrides", [("exercise", {}), ("exercise", {"optimizer": "adam"}),
                                               ("exercise", {"optimizer": "adamw", "weight_decay": 0.01}),
                                               ("fast", {}), ("airbench94", {})])
def test_foreach_steps_are_bitwise_the_loop_steps(preset, overrides, one_thread):
    recipe = recipe_from(preset, **overrides)
    weights = []
    for foreach in (False, True):
        torch.manual_seed(0)
        model = Net(get_declaration(recipe.model))
        for p in model.parameters():
            p.requires_grad_(True)
        opt = make_optimizer(recipe, model, foreach=foreach)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) * 1e-2
            opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        assert torch.equal(a, b)
