"""``cifarlab predict``: real checkpoint, real CIFAR-10 test images written as files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.checkpoints import load_checkpoint
from cifarlab.cli import main
from cifarlab.errors import ImageError
from cifarlab.evaluate import predict_logits
from cifarlab.predict import predict_files, predict_images
from cifarlab.transforms import Normalization


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return load_checkpoint(trained_run)


def _save(image: torch.Tensor, path):
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


def _reference(ckpt, images):
    logits = predict_logits(ckpt.model, images, Normalization.from_dict(ckpt.meta["normalization"]))
    return torch.softmax(logits.double(), 1)


def test_predict_images_matches_evaluation(ckpt, cifar):
    images = cifar.test.images[:50]
    probs = _reference(ckpt, images)
    results = predict_images(ckpt, images, top_k=10)
    for row, p in zip(results, probs):
        assert [r["class"] for r in row][0] == ckpt.meta["classes"][int(p.argmax())]
        assert [r["probability"] for r in row] == sorted(p.tolist(), reverse=True)
        assert abs(sum(r["probability"] for r in row) - 1) < 1e-9


def test_cli_text_output(trained_run, ckpt, cifar, tmp_path, capsys):
    path = _save(cifar.test.images[3], tmp_path / "ship.png")
    assert main(["predict", str(trained_run), str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(path) and len(out) == 4
    expected = _reference(ckpt, cifar.test.images[3:4])[0]
    top = int(expected.argmax())
    assert out[1].split()[:2] == ["1.", ckpt.meta["classes"][top]]
    assert out[1].endswith(f"{100 * float(expected[top]):6.2f}%")


def test_cli_json_top_k_and_a_bad_file(trained_run, ckpt, cifar, tmp_path, capsys):
    good = [_save(cifar.test.images[i], tmp_path / f"{i}.png") for i in range(2)]
    big = Image.fromarray(cifar.test.images[5].permute(1, 2, 0).numpy()).resize((640, 480))
    big.save(tmp_path / "big.jpg")
    (tmp_path / "bad.png").write_text("not an image")
    args = ["predict", str(trained_run), str(good[0]), str(tmp_path / "bad.png"), str(good[1]),
            str(tmp_path / "big.jpg"), "--top-k", "5", "--json"]
    assert main(args) == 2  # one file failed; the others are still predicted
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["architecture"] == "exercise"
    results = report["results"]
    assert [r["image"] for r in results] == [str(good[0]), str(tmp_path / "bad.png"), str(good[1]),
                                             str(tmp_path / "big.jpg")]
    assert "not an image file Pillow can read" in results[1]["error"] and "predictions" not in results[1]
    for r in (results[0], results[2], results[3]):
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
        assert all(p["class"] in ckpt.meta["classes"] for p in r["predictions"])
    expected = _reference(ckpt, cifar.test.images[:2])
    for r, p in zip((results[0], results[2]), expected):
        assert r["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-12)
    assert f"error: {tmp_path / 'bad.png'}: not an image file" in captured.err


def test_top_k_larger_than_classes_shows_all(trained_run, cifar, tmp_path, capsys):
    path = _save(cifar.test.images[0], tmp_path / "a.png")
    assert main(["predict", str(trained_run), str(path), "--top-k", "50", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)["results"][0]["predictions"]
    assert len(predictions) == 10
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-9)


def test_tta_option(trained_run, ckpt, cifar, tmp_path, capsys):
    path = _save(cifar.test.images[7], tmp_path / "a.png")
    entries = predict_files(ckpt, [path], top_k=10, tta=True)
    x = cifar.test.images[7:8]
    norm = Normalization.from_dict(ckpt.meta["normalization"])
    expected = torch.softmax(predict_logits(ckpt.model, x, norm, tta=True).double(), 1)[0]
    assert entries[0]["predictions"][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-12)
    assert main(["predict", str(trained_run), str(path), "--tta"]) == 0


def test_images_are_fitted_as_the_checkpoints_training_data_was(ckpt, cifar, tmp_path):
    """A CIFAR run (and a run recorded before fits) center-crops; a run trained with --fit pad pads."""
    from dataclasses import replace

    from cifarlab.images import load_image

    wide = Image.fromarray(cifar.test.images[9].permute(1, 2, 0).numpy()).resize((96, 40))
    wide.save(tmp_path / "wide.png")
    assert "fit" not in ckpt.meta["dataset"]["identity"]
    crop = predict_images(ckpt, load_image(tmp_path / "wide.png", 32, fit="crop")[None], top_k=10)[0]
    assert predict_files(ckpt, [tmp_path / "wide.png"], top_k=10)[0]["predictions"] == crop
    meta = json.loads(json.dumps(ckpt.meta))
    for fit in ("pad", "squish"):
        meta["dataset"]["identity"]["fit"] = fit
        fitted = replace(ckpt, meta=meta)
        expected = predict_images(ckpt, load_image(tmp_path / "wide.png", 32, fit=fit)[None], top_k=10)[0]
        assert predict_files(fitted, [tmp_path / "wide.png"], top_k=10)[0]["predictions"] == expected != crop
    meta["dataset"]["identity"]["fit"] = "warp"  # a value this version does not know: refused, by name
    with pytest.raises(ImageError, match="fitted with 'warp'"):
        predict_files(replace(ckpt, meta=meta), [tmp_path / "wide.png"])


def test_bad_arguments_and_checkpoint(tmp_path, capsys, cifar):
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path), "x.png", "--top-k", "0"])
    assert "outside 1..1000" in capsys.readouterr().err
    path = _save(cifar.test.images[0], tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "no-run"), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no checkpoint there" in err and "Traceback" not in err


def test_only_bad_files(trained_run, tmp_path, capsys):
    assert main(["predict", str(trained_run), str(tmp_path / "missing.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: {tmp_path / 'missing.png'}: no such file.\n"


def test_runs_as_a_program(trained_run, cifar, tmp_path):
    """The installed entry point, end to end, in a fresh interpreter."""
    import subprocess
    import sys

    path = _save(cifar.test.images[1], tmp_path / "a.png")
    out = subprocess.run([sys.executable, "-m", "cifarlab", "predict", str(trained_run), str(path), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["image"] == str(path)
    assert np.isfinite(json.loads(out.stdout)["results"][0]["predictions"][0]["probability"])


def test_ood_flag_unavailable_is_said_once_and_predictions_are_unchanged(trained_run, ckpt, cifar, data_dir,
                                                                         tmp_path, monkeypatch, capsys):
    """The conftest run trained on 3,000 images its dataset entry cannot rebuild (no --train-subset note), so
    its feature bank cannot be made: one note on stderr, the predictions exactly as without the flag.
    (The flag itself: tests/test_ood.py.)"""
    monkeypatch.setenv("CIFARLAB_DATA", str(data_dir))
    paths = [str(_save(cifar.test.images[i], tmp_path / f"{i}.png")) for i in range(2)]
    assert main(["predict", str(trained_run), *paths, "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("note: the out-of-distribution flag is unavailable") == 1
    assert "cannot be rebuilt" in captured.err and "Traceback" not in captured.err
    results = json.loads(captured.out)["results"]
    assert all("ood" not in r for r in results)
    assert [r["predictions"] for r in results] == [e["predictions"] for e in predict_files(ckpt, paths)]
    assert main(["predict", str(trained_run), *paths, "--json", "--no-ood"]) == 0
    assert capsys.readouterr().err == ""  # --no-ood: not even looked for


def test_predict_files_takes_a_detector_only_when_an_image_was_read(ckpt, cifar, tmp_path):
    calls = []

    class Detector:
        def score(self, images):
            calls.append(len(images))
            return {"layers": np.full(len(images), -0.7)}

        def entry(self, score):
            return {"score": score, "threshold": -0.5, "flag": score < -0.5, "method": "layers", "k": 50}

    assert predict_files(ckpt, [tmp_path / "missing.png"], ood=lambda: calls.append("made") or Detector()) \
        == [{"image": str(tmp_path / "missing.png"), "error": f"{tmp_path / 'missing.png'}: no such file."}]
    assert calls == []
    path = _save(cifar.test.images[0], tmp_path / "a.png")
    entries = predict_files(ckpt, [tmp_path / "missing.png", path], ood=Detector())
    assert calls == [1] and "ood" not in entries[0] and entries[1]["ood"]["flag"] is True
    from cifarlab.predict import format_text

    assert format_text(entries).splitlines()[-1] == "  ! unlike any class I know (score -0.7000, threshold -0.5000)"
