"""Test-time augmentation levels: what each averages, and the values accepted."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifarlab.evaluate import predict_logits, tta_level
from cifarlab.models import build_model
from cifarlab.transforms import Normalization


def test_tta_levels_average_what_they_say():
    torch.manual_seed(0)
    model = build_model("fast").eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    norm = Normalization.named("standard")
    x = norm(images)
    with torch.no_grad():
        def mirrored(t):
            return 0.5 * (model(t) + model(t.flip(3)))
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        expected = {0: model(x), 1: mirrored(x),
                    2: 0.5 * mirrored(x) + 0.25 * (mirrored(padded[:, :, :32, :32]) + mirrored(padded[:, :, 2:, 2:]))}
    for level, want in expected.items():
        got = predict_logits(model, images, norm, tta=level, channels_last=False)
        assert torch.allclose(got, want, atol=1e-5), level
    assert torch.equal(predict_logits(model, images, norm, tta=True, channels_last=False),
                       predict_logits(model, images, norm, tta=1, channels_last=False))


def test_tta_level_values():
    assert [tta_level(v) for v in (None, False, True, 0, 1, 2)] == [0, 0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="TTA level"):
        tta_level(3)
