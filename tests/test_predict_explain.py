"""`cifarlab predict --explain`: one PNG and one HTML fragment per photo (as seen, calibrated top classes,
the OOD verdict, attribution maps, nearest training images), for a JPEG, a PNG with alpha and a 1-pixel
image, checked against independent computations on a small run trained on real CIFAR-10."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab import explain, ood
from cifarlab.checkpoints import load_checkpoint
from cifarlab.cli import main
from cifarlab.explain.photo import file_stem
from cifarlab.images import load_image
from cifarlab.transforms import Normalization

N_TRAIN, VAL_SPLIT = 1500, 300


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def data(cifar):
    return cifar.with_train(cifar.train.subset(slice(0, N_TRAIN)), f"first {N_TRAIN}")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """The exercise net, 1 epoch on 1,200 images with 300 held out (a temperature is fitted on them)."""
    from cifarlab.train import recipe_from, train

    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("explain") / "run"
    train(recipe_from("exercise", epochs=1, val_split=VAL_SPLIT, seed=0), data, run_dir, progress=False, log=_quiet)
    return run_dir


@pytest.fixture(scope="module")
def photos(cifar, tmp_path_factory):
    """A JPEG of another size, a PNG with a transparent half, a 1-pixel PNG, and a hostile file name."""
    folder = tmp_path_factory.mktemp("photos")
    hwc = lambda i: cifar.test.images[i].permute(1, 2, 0).numpy()  # noqa: E731
    jpeg = folder / "cat photo.jpg"
    Image.fromarray(hwc(0)).resize((120, 90), Image.BICUBIC).save(jpeg, quality=90)
    rgba = np.concatenate([hwc(1), np.full((32, 32, 1), 255, np.uint8)], axis=2)
    rgba[:, :16, 3] = 0
    alpha = folder / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(alpha)
    pixel = folder / "pixel.png"
    Image.fromarray(np.array([[[200, 30, 40]]], np.uint8)).save(pixel)
    hostile = folder / '"><img src=x onerror=alert(1)><script>x.png'  # (no slash: not in a file name)
    Image.fromarray(hwc(2)).save(hostile)
    return [jpeg, alpha, pixel, hostile]


def _predict_json(args, capsys) -> tuple[int, list[dict], str]:
    code = main(["predict", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out)["results"], captured.err


def test_explain_writes_a_picture_and_a_fragment_per_photo(run, data, photos, data_dir, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("CIFARLAB_DATA", str(data_dir))
    out = tmp_path / "why"
    code, results, err = _predict_json([run, *photos, "--explain", "--explain-dir", out], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    ckpt = load_checkpoint(run)
    detector = ood.prepare(run, data, log=_quiet)
    classes = ckpt.meta["classes"]
    for photo, r in zip(photos, results):
        e = r["explanation"]
        png, html = Image.open(e["png"]), open(e["html"], encoding="utf-8").read()
        assert png.format == "PNG" and png.width > 400 and png.height > 300
        assert 'src="data:image/png;base64,' in html and "<script" not in html.replace('class="', "")
        assert e["methods"] == ["integrated_gradients", "grad_cam"] and e["gradcam_layer"] == "leaky_re_lu_4"
        assert r["ood"]["threshold"] == detector.threshold
        assert (f"{100 * r['predictions'][0]['probability']:.1f}%" in html) and r["predictions"][0]["class"] in html
        # the neighbours are the brute-force nearest bank images by cosine of the photo's own features
        image = load_image(photo, 32)[None]
        feats, _ = ood.features_and_logits(ckpt.model, image, Normalization.from_dict(ckpt.meta["normalization"]))
        cos = (torch.nn.functional.normalize(feats, dim=1) @ detector.bank.T)[0]
        best = torch.topk(cos, 5).indices
        assert [n["index"] for n in e["neighbours"]] == detector.bank_indices[best].tolist()
        assert [n["similarity"] for n in e["neighbours"]] == pytest.approx(cos[best].tolist(), abs=1e-5)
        assert [n["class"] for n in e["neighbours"]] == [classes[int(data.train.labels[n["index"]])]
                                                         for n in e["neighbours"]]
        agree = sum(n["class"] == r["predictions"][0]["class"] for n in e["neighbours"])
        assert e["neighbours_agreeing"] == agree and f"{agree} of 5 are" in html
    hostile_html = open(results[3]["explanation"]["html"], encoding="utf-8").read()
    assert "&lt;script&gt;" in hostile_html and "<img src=x" not in hostile_html  # a file name is data
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{file_stem(i, str(p))}.{ext}" for i, p in enumerate(photos, 1) for ext in ("png", "html"))
    assert file_stem(2, "/x/alpha.png") == "002-alpha" and file_stem(1, "/x/<>.png") == "001-image"


def test_explain_text_output_and_methods(run, photos, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFARLAB_DATA", str(data_dir))
    out = tmp_path / "why"
    assert main(["predict", str(run), str(photos[2]), "--explain", "--explain-dir", str(out), "--methods",
                 "saliency,occlusion", "--neighbours", "3"]) == 0
    text = capsys.readouterr().out
    assert "nearest training images: " in text and " of 3 are " in text and f"why: {out}" in text
    with pytest.raises(SystemExit):
        main(["predict", str(run), str(photos[2]), "--explain", "--methods", "saliency,lime"])
    assert "unknown attribution method(s) 'lime'" in capsys.readouterr().err


def test_explain_without_the_feature_bank_says_what_is_missing(run, photos, tmp_path, capsys):
    code, results, err = _predict_json([run, photos[0], "--explain", "--explain-dir", tmp_path / "w", "--no-ood"],
                                       capsys)
    assert code == 0 and "Traceback" not in err
    e = results[0]["explanation"]
    assert e["neighbours"] == [] and e["neighbours_agreeing"] is None
    assert "nearest training images unavailable" in e["notes"][0]
    assert "no out-of-distribution check" in open(e["html"], encoding="utf-8").read()


def test_integrated_gradients_for_one_photo_starts_from_the_training_images_mean_colour(run, data):
    """Completeness: the IG map sums to logit(photo) - logit(baseline), the baseline being the training
    images' mean colour (not the photo's own mean, which a batch of one would otherwise give)."""
    ckpt = load_checkpoint(run)
    norm = Normalization.from_dict(ckpt.meta["normalization"])
    photo = data.test.images[5:6]
    target = torch.tensor([3])
    ig = explain.attribute("integrated_gradients", ckpt.model, photo, norm, target=target, reference=data.train.images,
                           steps=64)
    mean = explain.methods.mean_colour(data.train.images)
    with torch.no_grad():
        gap = ckpt.model(norm(photo.float()))[0, 3] - ckpt.model(norm(mean.expand(1, 3, 32, 32)))[0, 3]
    assert float(ig.maps.sum()) == pytest.approx(float(gap), rel=0.02, abs=0.02)


def test_evaluate_galleries_show_the_runs_calibrated_probabilities(run, data, tmp_path):
    """Galleries and worst-mistake scores use softmax(logits / T) with the run's temperature, as predict does."""
    from cifarlab.pipeline import evaluate_to_folder
    from cifarlab.temperature import checkpoint_temperature

    ckpt = load_checkpoint(run)
    t = checkpoint_temperature(ckpt.meta)
    assert t and t != 1.0
    ev, _ = evaluate_to_folder(ckpt, data, tmp_path / "eval", gallery_size=4)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    tempered = torch.softmax(torch.from_numpy(ev.logits) / t, 1).numpy()
    for m in results["worst_mistakes"]:
        assert m["score"] == pytest.approx(float(tempered[m["index"]].max()), abs=1e-6)
    assert results["scores"].startswith("softmax(logits / T), T = ")
    assert np.array_equal(ev.predictions, ev.logits.argmax(1))
