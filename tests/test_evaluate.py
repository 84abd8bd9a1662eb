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


def test_selective_tta_augments_only_the_unsure_images():
    torch.manual_seed(0)
    model = build_model("fast").eval()
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    norm = Normalization.named("standard")
    plain = predict_logits(model, images, norm, tta=0, channels_last=False)
    full = predict_logits(model, images, norm, tta=2, channels_last=False)
    top = torch.softmax(plain, 1).amax(1)
    threshold = float(top.median())  # about half the images below it
    unsure = top < threshold
    assert 0 < int(unsure.sum()) < len(images)
    got = predict_logits(model, images, norm, tta=2, channels_last=False, tta_below=threshold, batch_size=16)
    assert torch.allclose(got[unsure], full[unsure], atol=1e-5)
    assert torch.allclose(got[~unsure], plain[~unsure], atol=1e-5)
    # the ends: below 0 nobody is augmented; below 1 (no probability reaches it here) everybody is
    assert torch.allclose(predict_logits(model, images, norm, tta=2, channels_last=False, tta_below=0.0), plain,
                          atol=1e-5)
    assert torch.allclose(predict_logits(model, images, norm, tta=2, channels_last=False, tta_below=1.0), full,
                          atol=1e-5)
    # without TTA the threshold changes nothing
    assert torch.equal(predict_logits(model, images, norm, tta=0, channels_last=False, tta_below=0.5),
                       predict_logits(model, images, norm, tta=0, channels_last=False))


def test_tta_level_values():
    assert [tta_level(v) for v in (None, False, True, 0, 1, 2)] == [0, 0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="TTA level"):
        tta_level(3)


def test_evaluate_command_selective_tta(trained_run, data_dir, tmp_path, capsys):
    import json

    from cifarlab.cli import main

    args = ["evaluate", str(trained_run), "--json", "--data-dir", str(data_dir), "--tta-level", "1"]
    assert main(args + ["--out", str(tmp_path / "all")]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(args + ["--tta-below", "1", "--out", str(tmp_path / "sel")]) == 0
    selective = json.loads(capsys.readouterr().out)
    # the 1-epoch net is never certain: below p = 1 every image is augmented, as without the option
    assert selective["tta_below"] == 1 and full["tta_below"] is None
    assert selective["accuracy"] == full["accuracy"] and selective["confusion_matrix"] == full["confusion_matrix"]
    with pytest.raises(SystemExit):
        main(args + ["--tta-below", "1.5"])
    assert "outside" in capsys.readouterr().err
