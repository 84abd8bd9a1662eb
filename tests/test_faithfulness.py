"""Deletion/insertion curves, Spearman, and the cascading-randomization sanity check."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cifarlab.explain import methods as attr
from cifarlab.explain import faithfulness as fa
from attribution_nets import NORM, RegionNet, random_images, region_images, small_cnn


def test_pixel_ranks_and_trapezoid():
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])
    assert fa.pixel_ranks(maps).tolist() == [[3, 0, 1, 2]]  # tie: the earlier pixel first
    x = torch.linspace(0, 1, 5, dtype=torch.float64)
    assert float(fa.trapezoid_auc(x, 1 - x)) == pytest.approx(0.5)


def test_curve_endpoints_are_the_original_and_the_substrate():
    net = RegionNet()
    images = region_images(net, n=3)
    maps = fa.random_maps(3, 16, 16, seed=1)
    targets = torch.zeros(3, dtype=torch.long)
    c = fa.deletion_insertion(net, images, NORM, maps, targets, steps=8, deletion_baseline="black",
                              insertion_start="black", batch_size=2)
    assert c.deletion.shape == c.insertion.shape == (3, 9)
    assert c.fractions[0] == 0 and c.fractions[-1] == 1
    with torch.no_grad():
        p_orig = torch.softmax(net(NORM(images)), 1)[:, 0].double()
        p_black = torch.softmax(net(NORM(torch.zeros_like(images))), 1)[:, 0].double()
    torch.testing.assert_close(c.deletion[:, 0], p_orig)
    torch.testing.assert_close(c.deletion[:, -1], p_black)
    torch.testing.assert_close(c.insertion[:, 0], p_black)
    torch.testing.assert_close(c.insertion[:, -1], p_orig)


@pytest.mark.parametrize("insertion_start", ["black", "blur"])
def test_a_faithful_map_beats_random_which_beats_the_reverse_order(insertion_start):
    net = RegionNet()
    images = region_images(net, n=8)
    targets = torch.zeros(8, dtype=torch.long)
    good = attr.attribute("saliency", net, images, NORM, target=0).maps        # the region first
    reverse = -good                                                             # the region last
    rand = fa.random_maps(8, 16, 16, seed=0)
    auc = {name: fa.deletion_insertion(net, images, NORM, m, targets, steps=16, deletion_baseline="black",
                                       insertion_start=insertion_start)
           for name, m in (("good", good), ("random", rand), ("reverse", reverse))}
    d = {k: float(v.deletion_auc.mean()) for k, v in auc.items()}
    i = {k: float(v.insertion_auc.mean()) for k, v in auc.items()}
    assert d["good"] < d["random"] < d["reverse"]
    assert i["good"] > i["random"] > i["reverse"]
    assert d["good"] < 0.2 and i["good"] > 0.8  # the region is ~10% of the pixels


def test_gaussian_blur_keeps_constants_and_smooths():
    flat = torch.full((1, 3, 16, 16), 100.0)
    torch.testing.assert_close(fa.gaussian_blur(flat, 2.0), flat)
    noise = random_images(1, size=(16, 16)).float()
    assert fa.gaussian_blur(noise, 2.0).std() < noise.std() / 3


def test_faithfulness_table_is_json_and_flags_random_like_methods(monkeypatch):
    net = RegionNet()
    images = region_images(net, n=8)
    labels = torch.zeros(8, dtype=torch.long)
    # a "method" that is a random map in disguise must not beat random
    def noise(x, targets, ctx):
        return torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(99))

    monkeypatch.setitem(attr.METHODS, "noise", noise)
    table = fa.faithfulness_table(net, images, labels, NORM, methods=["saliency", "grad_cam", "noise"], steps=16,
                                  deletion_baseline="black", method_options={"grad_cam": {"layer": "mask"}})
    json.dumps(table)
    sal = table["methods"]["saliency"]
    assert sal["deletion_auc"] < table["random"]["deletion_auc"]
    assert sal["vs_random"]["deletion"]["beats_random"] and sal["vs_random"]["insertion"]["beats_random"]
    assert table["methods"]["grad_cam"]["vs_random"]["deletion"]["beats_random"]
    noise = table["methods"]["noise"]["vs_random"]
    assert not (noise["deletion"]["beats_random"] and noise["insertion"]["beats_random"])
    assert len(sal["deletion_curve"]) == 17 and sal["seconds_maps"] >= 0
    # maps explaining another class than the tracked (true) one are refused
    other = attr.attribute("saliency", net, images, NORM, target=1)
    with pytest.raises(ValueError, match="explain other classes"):
        fa.faithfulness_table(net, images, labels, NORM, methods=["saliency"], steps=4, maps={"saliency": other})


def _rankdata(v):
    """Average ranks by brute force (what scipy.stats.rankdata does)."""
    v = np.asarray(v, dtype=float)
    return np.array([np.sum(v < x) + (np.sum(v == x) + 1) / 2 for x in v])


def test_spearman_against_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 30), generator=g).float()  # many ties
    b = torch.randint(0, 5, (4, 30), generator=g).float()
    ours = fa.spearman(a, b)
    for i in range(4):
        ra, rb = _rankdata(a[i]), _rankdata(b[i])
        assert float(ours[i]) == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-12)
    x = torch.randn(2, 50, generator=g)
    torch.testing.assert_close(fa.spearman(x, x.exp()), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(fa.spearman(x, -x), -torch.ones(2, dtype=torch.float64))
    assert float(fa.spearman(torch.ones(1, 5), torch.arange(5.0)[None])[0]) == 0  # constant map: 0


def test_cascading_randomization_changes_gradient_maps_but_not_an_edge_detector(monkeypatch):
    net = small_cnn(seed=0)
    images = random_images(6, seed=3)
    params = {k: v.clone() for k, v in net.state_dict().items()}

    def edges(x, targets, ctx):  # depends on the image only, never on the weights: must be flagged
        return torch.nn.functional.pad((x[:, :, 1:, :] - x[:, :, :-1, :]).abs().sum(1), (0, 0, 0, 1))

    monkeypatch.setitem(attr.METHODS, "edges", edges)
    result = fa.cascading_randomization(net, images, NORM, methods=["saliency", "grad_cam", "edges"], seed=1)
    json.dumps(result)
    assert result["layers"] == ["out", "conv2", "conv1"]  # from the output down
    sal, edge = result["methods"]["saliency"], result["methods"]["edges"]
    assert len(sal["spearman"]) == 3
    assert sal["final"] < 0.5 and not sal["flagged"]
    assert edge["final"] == pytest.approx(1.0) and edge["flagged"]
    # the trained model is untouched
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in params.items())


def test_reinitialize_is_seeded():
    a, b = small_cnn(0), small_cnn(0)
    fa.reinitialize(a.conv1, 5)
    fa.reinitialize(b.conv1, 5)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, small_cnn(0).conv1.weight)
