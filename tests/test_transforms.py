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
