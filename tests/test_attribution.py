"""Attribution methods on nets with known answers, and on the exercise net with real images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cifarlab
from cifarlab.explain import methods as attr
from attribution_nets import NORM, LinearNet, RegionNet, region_images, small_cnn, random_images

FAST = {"smoothgrad": {"samples": 4}, "integrated_gradients": {"steps": 16}}


@pytest.mark.parametrize("method", list(attr.METHODS))
def test_maps_live_in_the_region_the_logit_depends_on(method):
    net = RegionNet()
    images = region_images(net)
    options = dict(FAST.get(method, {}))
    if method in attr.LAYER_METHODS:
        options["layer"] = "mask"  # the last spatial features; outside the region they are zero
    a = attr.attribute(method, net, images, NORM, seed=0, **options)
    assert a.maps.shape == (6, 16, 16) and a.maps.dtype == torch.float32
    assert (a.targets == 0).all()  # bright region: class 0 predicted
    # Gradients reach 1 px past the region (3x3 box filter); occlusion windows (2 px) up to 1 more.
    margin = 2 if method == "occlusion" else 1
    outside = ~net.inside(margin)
    assert a.maps[:, outside].abs().max() == 0
    inside = a.maps[:, net.inside(margin)]
    assert (inside.abs().amax(1) > 0).all()  # every image has signal where it should
    # the 10 highest pixels of every map are in the region
    top = a.maps.flatten(1).topk(10, dim=1).indices
    assert net.inside(margin).flatten()[top].all()


def test_default_grad_cam_layer_is_last_conv_after_its_activation():
    net = cifarlab.build_model("exercise")
    assert attr.last_conv_layer(net, NORM(random_images(1))) == "leaky_re_lu_4"
    assert attr.last_conv_layer(RegionNet(), NORM(random_images(1, size=(16, 16)))) == "act"
    a = attr.attribute("grad_cam", net, random_images(2), NORM)
    assert a.layer == "leaky_re_lu_4"
    # A cifarlab Net: the declared-layer rule that visualize uses (one rule, no second implementation).
    from cifarlab.net_layers import default_cam_layer
    assert attr.default_layer(net, NORM(random_images(1))) == default_cam_layer(net) == "leaky_re_lu_4"
    from cifarlab.errors import VisualizationError
    with pytest.raises(VisualizationError, match="no layer named 'nope'; its layers: conv1"):
        attr.attribute("grad_cam", net, random_images(2), NORM, layer="nope")
    with pytest.raises(ValueError, match="conv layers: conv"):  # any other nn.Module: the hook-based lookup
        attr.attribute("grad_cam", RegionNet(), random_images(2, size=(16, 16)), NORM, layer="nope")


def test_ig_and_one_pixel_occlusion_are_exact_on_a_linear_net():
    net = LinearNet()
    images = random_images(4, seed=1, size=(8, 8))
    targets = torch.tensor([0, 1, 2, 1])
    x, black = NORM(images), NORM(torch.zeros(1, 3, 1, 1))
    expected = ((x - black) * net.weight[targets]).sum(1)  # per pixel: sum_c w (x - baseline)
    ig = attr.attribute("integrated_gradients", net, images, NORM, target=targets, baseline="black").maps
    occ = attr.attribute("occlusion", net, images, NORM, target=targets, baseline="black", window=1, stride=1).maps
    torch.testing.assert_close(ig, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(occ, expected, rtol=1e-4, atol=1e-5)  # the logit drop of greying that pixel
    sal = attr.attribute("saliency", net, images, NORM, target=targets).maps
    torch.testing.assert_close(sal, net.weight[targets].abs().amax(1))


def test_occlusion_sign_follows_evidence():
    """Greying out the white region lowers class 0's logit: positive occlusion there, zero far away."""
    net = RegionNet()
    images = region_images(net, n=2)
    occ = attr.attribute("occlusion", net, images, NORM, target=0, baseline="mean").maps
    assert (occ[:, net.inside()] > 0).all()
    # and it is negative evidence for class 1
    occ1 = attr.attribute("occlusion", net, images, NORM, target=1, baseline="mean").maps
    assert (occ1[:, net.inside()] < 0).all()


def test_integrated_gradients_completeness_on_the_exercise_net():
    torch.manual_seed(0)
    net = cifarlab.build_model("exercise")
    images = random_images(3, seed=2)
    net.eval()
    mean = images.double().mean((0, 2, 3)).float().view(1, 3, 1, 1).expand(images.shape)
    for baseline, base_image in (("black", torch.zeros(images.shape)), ("mean", mean)):
        a = attr.attribute("integrated_gradients", net, images, NORM, steps=64, baseline=baseline)
        with torch.no_grad():
            logits = net(NORM(images)).gather(1, a.targets[:, None])[:, 0]
            base = net(NORM(base_image)).gather(1, a.targets[:, None])[:, 0]
        torch.testing.assert_close(a.maps.sum((1, 2)), logits - base, rtol=0.05, atol=0.02)


def _gradcam_pp_by_hand(acts, grads):
    """Chattopadhyay et al. 2018, eq. 19 (exp score) written out in numpy."""
    g2, g3 = grads ** 2, grads ** 3
    s = acts.sum(axis=(1, 2), keepdims=True)
    alpha = g2 / (2 * g2 + s * g3)
    w = (alpha * np.maximum(grads, 0)).sum(axis=(1, 2))
    return np.maximum((w[:, None, None] * acts).sum(0), 0)


def test_grad_cam_pp_matches_the_closed_form():
    class Feat(torch.nn.Module):  # A = the normalized input itself; logit linear in A, so dY/dA = W
        def __init__(self):
            super().__init__()
            self.feat = torch.nn.Identity()
            self.lin = LinearNet(classes=2, shape=(3, 6, 6), seed=3)

        def forward(self, x):
            return self.lin(self.feat(x))

    net = Feat()
    images = random_images(2, seed=4, size=(6, 6))
    pp = attr.attribute("grad_cam_pp", net, images, NORM, target=1, layer="feat").maps
    cam = attr.attribute("grad_cam", net, images, NORM, target=1, layer=net.feat).maps
    w = net.lin.weight[1].detach().double().numpy()
    for i in range(2):
        a = NORM(images[i:i + 1])[0].double().numpy()
        np.testing.assert_allclose(pp[i].numpy(), _gradcam_pp_by_hand(a, w), rtol=1e-4, atol=1e-5)
        plain = np.maximum((w.mean(axis=(1, 2))[:, None, None] * a).sum(0), 0)
        np.testing.assert_allclose(cam[i].numpy(), plain, rtol=1e-4, atol=1e-6)


def test_seeded_batched_and_mode_restored():
    net = small_cnn()
    net.train()
    images = random_images(10, seed=5)
    before = torch.get_rng_state()
    a = attr.attribute("smoothgrad", net, images, NORM, seed=3, samples=4, batch_size=4)
    b = attr.attribute("smoothgrad", net, images, NORM, seed=3, samples=4, batch_size=4)
    c = attr.attribute("smoothgrad", net, images, NORM, seed=4, samples=4, batch_size=4)
    assert torch.equal(a.maps, b.maps) and not torch.equal(a.maps, c.maps)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is untouched
    assert net.training  # train mode given back
    # deterministic methods do not depend on the batch size
    s1 = attr.attribute("saliency", net, images, NORM, batch_size=3).maps
    s2 = attr.attribute("saliency", net, images, NORM, batch_size=10).maps
    torch.testing.assert_close(s1, s2)


def test_true_class_target_and_registry():
    net = small_cnn()
    images = random_images(4, seed=6)
    labels = torch.tensor([1, 2, 3, 4])
    a = attr.attribute("grad_cam", net, images, NORM, target="true", labels=labels)
    assert torch.equal(a.targets, labels)
    with pytest.raises(ValueError, match="needs labels"):
        attr.attribute("saliency", net, images, NORM, target="true")
    with pytest.raises(ValueError, match="unknown attribution method"):
        attr.attribute("lime", net, images, NORM)
    with torch.inference_mode():  # a caller in inference mode still gets maps
        assert torch.isfinite(attr.attribute("saliency", net, images, NORM).maps).all()
    assert set(attr.attribute_all(net, images[:1], NORM, methods=["saliency", "grad_cam"])) == {"saliency", "grad_cam"}


def test_every_method_on_the_exercise_net_with_real_images(cifar):
    torch.manual_seed(0)
    net = cifarlab.build_model("exercise")
    images, labels = cifar.test.images[:8], cifar.test.labels[:8]
    for method in attr.METHODS:
        a = attr.attribute(method, net, images, NORM, target="true", labels=labels, seed=0)
        assert a.maps.shape == (8, 32, 32), method
        assert torch.isfinite(a.maps).all(), method
        assert a.maps.abs().sum() > 0, method
        assert a.seconds >= 0
