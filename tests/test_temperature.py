"""Temperature scaling of a run: fitted on held-out training images at the end of training or by
``cifarlab calibrate``, stored in the checkpoint, used by evaluate, predict and the ONNX export."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cifarlab import cli
from cifarlab.calibration import calibration_metrics, fit_temperature
from cifarlab.checkpoints import load_checkpoint
from cifarlab.cli import calibrate as cli_calibrate
from cifarlab.data import CIFAR10, holdout_split
from cifarlab.evaluate import predict_logits
from cifarlab.pipeline import evaluate_to_folder
from cifarlab.predict import predict_images
from cifarlab.temperature import CalibrationError, calibrate_checkpoint, checkpoint_temperature
from cifarlab.transforms import Normalization


@pytest.fixture(scope="module")
def small(cifar):
    return CIFAR10(train=cifar.train.subset(slice(0, 1200)), test=cifar.test.subset(slice(0, 300)),
                   classes=cifar.classes, root=cifar.root)


@pytest.fixture(scope="module")
def held_out_run(small, tmp_path_factory):
    """The exercise net, 1 epoch on 1,000 of 1,200 images, 200 held out (--val-split 200)."""
    from cifarlab.train import recipe_from, train

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("cal") / "run"
    train(recipe_from("exercise", epochs=1, val_split=200, seed=3), small, run, progress=False,
          log=lambda *a, **k: None)
    return run


def _held_out_logits(ckpt, small):
    _, held = holdout_split(small.train, 200, seed=3)
    norm = Normalization.from_dict(ckpt.meta["normalization"])
    return predict_logits(ckpt.model, held.images, norm), held.labels


def test_training_fits_the_temperature_on_held_out_training_images(held_out_run, small):
    ckpt = load_checkpoint(held_out_run)
    cal = ckpt.meta["calibration"]
    assert cal["fitted_on"] == "200 held-out training images" and cal["images"] == 200
    logits, labels = _held_out_logits(ckpt, small)
    fit = fit_temperature(logits, labels)
    assert cal["temperature"] == pytest.approx(fit.temperature, rel=1e-4)
    assert cal["nll_after"] <= cal["nll_before"] + 1e-12
    assert cal["ece_before"] == pytest.approx(calibration_metrics(logits, labels)["ece"], abs=1e-6)


def test_calibrate_command_refits_and_resaves_atomically(held_out_run, small, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(held_out_run, run)
    ckpt = load_checkpoint(run)
    meta = dict(ckpt.meta)
    expected = meta.pop("calibration")["temperature"]
    from cifarlab.checkpoints import save_checkpoint

    save_checkpoint(ckpt.path, ckpt.model, {k: v for k, v in meta.items() if k not in ("format", "weights_sha256")})
    assert checkpoint_temperature(load_checkpoint(run).meta) is None
    monkeypatch.setattr(cli_calibrate, "load_data", lambda args, **kwargs: small)
    assert cli.main(["calibrate", str(run), "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["temperature"] == pytest.approx(expected, rel=1e-4)
    again = load_checkpoint(run)  # checksums verified on load
    assert checkpoint_temperature(again.meta) == pytest.approx(expected, rel=1e-4)
    assert not list(run.glob("final/*.tmp")) and not list(run.glob(".final*"))


def test_calibrate_refuses_a_run_without_held_out_images(trained_run, cifar, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    monkeypatch.setattr(cli_calibrate, "load_data", lambda args, **kwargs: cifar)
    assert cli.main(["calibrate", str(run)]) == cli.EXIT_ERROR
    assert "train with --val-split N" in capsys.readouterr().err
    with pytest.raises(CalibrationError, match="held-out"):
        calibrate_checkpoint(load_checkpoint(run), cifar)


def test_calibrate_refuses_other_training_data(held_out_run, cifar):
    with pytest.raises(CalibrationError, match="trained on 1200 training images"):
        calibrate_checkpoint(load_checkpoint(held_out_run), cifar)


def test_predict_uses_the_temperature_and_keeps_the_ranking(held_out_run, small):
    ckpt = load_checkpoint(held_out_run)
    t = checkpoint_temperature(ckpt.meta)
    assert t is not None and t != pytest.approx(1.0)
    images = small.test.images[:20]
    logits = predict_logits(ckpt.model, images, Normalization.from_dict(ckpt.meta["normalization"]))
    expected = torch.softmax(logits.double() / t, 1)
    got = predict_images(ckpt, images, top_k=10)
    for row, exp, raw in zip(got, expected, logits):
        probs = {p["class"]: p["probability"] for p in row}
        assert [probs[c] for c in small.classes] == pytest.approx(exp.tolist(), abs=1e-9)
        assert row[0]["class"] == small.classes[int(raw.argmax())]  # accuracy unchanged


def test_onnx_probabilities_use_the_temperature(held_out_run, small, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from cifarlab.export import export_onnx, run_onnx

    ckpt = load_checkpoint(held_out_run)
    t = checkpoint_temperature(ckpt.meta)
    out = tmp_path / "m.onnx"
    export_onnx(ckpt, out)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert float(meta["cifarlab.temperature"]) == pytest.approx(t, rel=1e-12)
    assert json.loads(meta["cifarlab.calibration"])["fitted_on"] == "200 held-out training images"
    images = small.test.images[:64]
    logits, probs = run_onnx(out, images.numpy().astype(np.float32))
    torch_logits = predict_logits(ckpt.model, images, Normalization.from_dict(ckpt.meta["normalization"]))
    np.testing.assert_allclose(probs, torch.softmax(torch_logits / t, 1).numpy(), atol=1e-5)
    assert (probs.argmax(1) == torch_logits.argmax(1).numpy()).all()


def test_evaluation_reports_calibration_before_and_after(held_out_run, small, tmp_path):
    ckpt = load_checkpoint(held_out_run)
    t = checkpoint_temperature(ckpt.meta)
    ev, files = evaluate_to_folder(ckpt, small, tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    cal = results["calibration"]
    assert cal["n_bins"] == 15 and cal["temperature"] == pytest.approx(t)
    assert cal["fitted_on"] == "200 held-out training images" and cal["evaluated_on"] == "test set"
    assert cal["before"] == pytest.approx(calibration_metrics(ev.logits, ev.labels), nan_ok=True)
    assert cal["after"] == pytest.approx(calibration_metrics(ev.logits, ev.labels, temperature=t))
    assert cal["after"]["accuracy"] == cal["before"]["accuracy"] == pytest.approx(results["accuracy"])
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 10_000
    assert set(results["per_class"]) == set(small.classes)
    for c, q in results["per_class"].items():
        assert q["recall"] == pytest.approx(results["per_class_accuracy"][c])
        assert 0 <= q["precision"] <= 1 and q["support"] == int((small.test.labels == small.classes.index(c)).sum())
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision

    preds, target = torch.from_numpy(ev.predictions), torch.from_numpy(ev.labels)
    f = multiclass_f1_score(preds, target, num_classes=10, average=None)
    p = multiclass_precision(preds, target, num_classes=10, average=None)
    assert [results["per_class"][c]["f1"] for c in small.classes] == pytest.approx(f.tolist(), abs=1e-6)
    assert [results["per_class"][c]["precision"] for c in small.classes] == pytest.approx(p.tolist(), abs=1e-6)
