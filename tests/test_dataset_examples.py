"""Top activating dataset images per channel and class, against brute force."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cifarlab.explain import examples as dx
from attribution_nets import NORM, small_cnn, random_images


def _brute_force(values: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C) activations -> (C, k) indices by a full stable descending argsort per channel."""
    return torch.from_numpy(np.stack([np.argsort(-values[:, c].numpy(), kind="stable")[:k]
                                      for c in range(values.shape[1])]))


def test_top9_equals_brute_force_argsort():
    net = small_cnn(seed=1)
    images = random_images(300, seed=2)
    top = dx.top_activating(net, images, NORM, layers=("relu2", "conv1", "classes"), k=9, batch_size=64)
    net.eval()
    with torch.no_grad():
        x = NORM(images)
        layers = list(net.children())        # the declared layers, computed without any hook
        relu2 = torch.nn.Sequential(*layers[:5])(x).mean((2, 3))
        conv1 = layers[0](x).mean((2, 3))
        logits = net(x)
    for name, full in (("relu2", relu2), ("conv1", conv1), ("classes", logits)):
        t = top[name]
        assert t.indices.shape == (full.shape[1], 9) and t.layer == name
        assert torch.equal(t.indices, _brute_force(full, 9)), name
        torch.testing.assert_close(t.values, full.t().gather(1, t.indices), rtol=1e-5, atol=1e-6)
    json.dumps(top["classes"].to_dict())


def test_ties_go_to_the_lower_index_and_fewer_images_than_k():
    # exact ties across batches (a net's float outputs can differ in the last bit between batch sizes,
    # so the merge is tested on values directly)
    values = torch.randint(0, 4, (40, 5), generator=torch.Generator().manual_seed(0)).float()
    best = (torch.full((5, 0), -torch.inf), torch.zeros(5, 0, dtype=torch.long))
    for start in range(0, 40, 7):
        best = dx._update(*best, values[start:start + 7], start, 9)
    assert torch.equal(best[1], _brute_force(values, 9))
    net = small_cnn(seed=1)
    base = random_images(3, seed=4)
    small = dx.top_activating(net, base[:2], NORM, layers=("relu1",), k=9)["relu1"]
    assert small.indices.shape == (8, 2)  # only two images to rank


def test_stimulus_ratio():
    net = small_cnn(seed=1)
    images = random_images(100, seed=5)
    top = dx.top_activating(net, images, NORM, layers=("relu2",), k=9)["relu2"]
    best = images[top.indices[:, 0]].float()  # "stimuli" that are the best real images: ratio 1 exactly
    np.testing.assert_allclose(dx.stimulus_ratio(net, best, NORM, top), 1.0, rtol=1e-5)
    brighter = (best * 0 + 255).clone()
    r = dx.stimulus_ratio(net, brighter[:3], NORM, top, channels=[5, 6, 7])
    acts = dx.activations(net, brighter[:3], NORM, "relu2")
    expected = acts[[0, 1, 2], [5, 6, 7]] / top.values[[5, 6, 7], 0]
    for got, want, b in zip(r, expected.tolist(), top.values[[5, 6, 7], 0].tolist()):
        assert (np.isnan(got) and b <= 0) or got == pytest.approx(want, rel=1e-5)


def test_unknown_layer():
    with pytest.raises(ValueError, match="no layer named"):
        dx.top_activating(small_cnn(), random_images(2), NORM, layers=("nope",))
