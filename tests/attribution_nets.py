"""Small nets with known answers, shared by the attribution, faithfulness and dataset-example tests."""
from __future__ import annotations

import torch
from torch import nn

import cifarlab
from cifarlab.transforms import Normalization

NORM = Normalization.named("exercise")  # x / 255 - 0.5


class Mask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.float().view(1, 1, *mask.shape))

    def forward(self, x):
        return x * self.mask


class RegionNet(nn.Module):
    """Two classes decided by the brightness of one rectangle only.

    conv: a 3x3 box filter over all channels (+0.5), ReLU, zeroed outside ``region`` (Mask), mean over
    the region = s in 0..1 (1 for a white region, 0 for a black one); logits (8 (s - 0.5), -8 (s - 0.5)).
    Not nn.Sequential. The logits depend only on pixels within 1 px of the region (the box filter)."""

    def __init__(self, size=(16, 16), region=(slice(3, 8), slice(9, 14))):
        super().__init__()
        self.region = region
        inside = torch.zeros(size, dtype=torch.bool)
        inside[region] = True
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27)
            self.conv.bias.fill_(0.5)
        self.act = nn.ReLU()
        self.mask = Mask(inside)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[8.0], [-8.0]]))
            self.head.bias.copy_(torch.tensor([-4.0, 4.0]))
        self.area = int(inside.sum())

    def forward(self, x):
        a = self.mask(self.act(self.conv(x)))
        return self.head(a.sum((2, 3)) / self.area)

    def inside(self, margin: int = 0) -> torch.Tensor:
        """Bool (H, W): the region grown by ``margin`` pixels."""
        ys, xs = self.region
        m = torch.zeros(self.mask.mask.shape[-2:], dtype=torch.bool)
        m[max(0, ys.start - margin):ys.stop + margin, max(0, xs.start - margin):xs.stop + margin] = True
        return m


def region_images(net: RegionNet, n: int = 6, seed: int = 0, size=(16, 16)) -> torch.Tensor:
    """Random uint8 images with the region white: the net says class 0 with probability ~1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8)
    images[:, :, net.region[0], net.region[1]] = 255
    return images


class LinearNet(nn.Module):
    """logit_k = sum over (c, y, x) of W[k, c, y, x] * x_norm: IG and 1-pixel occlusion are exact on it."""

    def __init__(self, classes=3, shape=(3, 8, 8), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, *shape, generator=g))

    def forward(self, x):
        return (x[:, None] * self.weight).sum((2, 3, 4))


def small_cnn(seed: int = 0) -> nn.Module:
    """A small declared conv net (randomly initialized, seeded)."""
    torch.manual_seed(seed)
    return cifarlab.build_model({"name": "tiny", "layers": [
        {"type": "conv", "name": "conv1", "filters": 8}, {"type": "relu", "name": "relu1"},
        {"type": "maxpool", "name": "pool1"},
        {"type": "conv", "name": "conv2", "filters": 16}, {"type": "relu", "name": "relu2"},
        {"type": "global_avgpool", "name": "gap"}, {"type": "dense", "name": "out", "units": 10}]})


def random_images(n: int, seed: int = 0, size=(32, 32)) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, *size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
