"""Batch transforms: alternating flips and reflect-padded translation (airbench's augmentation)."""
from __future__ import annotations

import torch

from cifarlab.transforms import alternating_flips, random_translate


def test_alternating_flips_mirror_every_image_once_per_two_epochs():
    n = 10_000
    even, odd = alternating_flips(3, n, 0), alternating_flips(3, n, 1)
    assert torch.equal(even ^ odd, torch.ones(n, dtype=torch.bool))  # each image: mirrored in exactly one
    assert torch.equal(alternating_flips(3, n, 4), even) and torch.equal(alternating_flips(3, n, 7), odd)
    assert 0.47 < even.float().mean() < 0.53  # a random half
    assert not torch.equal(alternating_flips(4, n, 0), even)  # another seed, another half


def test_reflect_translate_uses_mirrored_border_pixels():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    for mode in ("zeros", "reflect"):
        out = random_translate(x, 2, torch.Generator().manual_seed(0), mode=mode)
        padded = torch.nn.functional.pad(x, (2,) * 4, mode="constant" if mode == "zeros" else "reflect")
        for i in range(2):  # every output is some 8x8 window of its padded image
            windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
            assert any(torch.equal(out[i], w) for w in windows), (mode, i)
    reflect = random_translate(x, 2, g, mode="reflect")
    assert reflect.min() >= x.min()  # reflection never brings in zeros


def test_random_resized_crop_keeps_shape_and_range_and_is_seeded():
    from cifarlab.transforms import random_resized_crop

    x = torch.rand(8, 3, 32, 32)
    assert torch.equal(random_resized_crop(x, 1.0), x)  # the whole area: nothing to do
    a = random_resized_crop(x, 0.35, torch.Generator().manual_seed(1))
    b = random_resized_crop(x, 0.35, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= x.min() - 1e-6 and a.max() <= x.max() + 1e-6  # bilinear: no new extremes
    # A constant image stays constant, wherever the crop lands.
    assert torch.allclose(random_resized_crop(torch.full((4, 3, 16, 16), 0.7), 0.1), torch.full((4, 3, 16, 16), 0.7))
    # A crop of an image made of a left and a right half: each output column comes from one side or
    # straddles the edge, and an upscaled crop differs from the input.
    halves = torch.cat([torch.zeros(1, 3, 32, 16), torch.ones(1, 3, 32, 16)], dim=3)
    assert not torch.equal(random_resized_crop(halves, 0.2, torch.Generator().manual_seed(3)), halves)


def test_color_jitter_works_on_pixel_values():
    from cifarlab.transforms import Normalization, color_jitter

    norm = Normalization.for_training("standard", (torch.rand(20, 3, 8, 8) * 255).to(torch.uint8))
    pixels = (torch.rand(16, 3, 8, 8) * 255).round()
    x = norm(pixels)
    assert torch.equal(color_jitter(x, 0.0, norm), x)
    out = norm.invert(color_jitter(x, 0.5, norm, torch.Generator().manual_seed(0)))
    assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3  # clipped to real pixel values
    assert not torch.allclose(out, pixels)
    gray = torch.full((2, 3, 8, 8), 100.0)  # no colour, no contrast: only brightness can move it
    moved = norm.invert(color_jitter(norm(gray), 0.5, norm, torch.Generator().manual_seed(0)))
    assert torch.allclose(moved[:, 0], moved[:, 1], atol=1e-3) and torch.allclose(moved[:, 1], moved[:, 2], atol=1e-3)
