"""Out-of-distribution scores (cifarlab.ood): a small run trained on real CIFAR-10, its feature bank and
threshold, the metrics (checked against torchmetrics), damaged bank files, and the predict / evaluate
commands."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab import ood
from cifarlab.checkpoints import load_checkpoint, save_checkpoint
from cifarlab.cli import main
from cifarlab.data import holdout_split

N_TRAIN, VAL_SPLIT, SEED = 1500, 300, 0


def _quiet(*args, **kwargs):
    pass


class _Log(list):
    def __call__(self, *args, **kwargs):
        self.append(" ".join(str(a) for a in args))


@pytest.fixture(scope="module")
def data(cifar):
    """The run's data as `--train-subset 4000` records it, so `load_stored` rebuilds it (predict)."""
    return cifar.with_train(cifar.train.subset(slice(0, N_TRAIN)), f"first {N_TRAIN}")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """The exercise net, 1 epoch on 1,200 images, 300 held out (--val-split 300): about 5 s on 2 idle cores.
    (Not the fast net: tiny fast runs put Gaussian noise right among their training features; see
    test_knn_separates_cifar_test_images_from_gaussian_noise.)"""
    from cifarlab.train import recipe_from, train

    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("ood") / "run"
    train(recipe_from("exercise", epochs=1, val_split=VAL_SPLIT, seed=SEED), data, run_dir, progress=False, log=_quiet)
    return run_dir


@pytest.fixture(scope="module")
def detector(run, data):
    return ood.prepare(run, data, log=_quiet)


@pytest.fixture
def run_copy(run, detector, tmp_path):
    """A copy of the run (with its built bank) that a test may damage."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# ---------------------------------------------------------------------------------------------------
# Metrics and scores, against independent references


def test_auroc_and_fpr_match_torchmetrics_with_ties():
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    rng = np.random.default_rng(0)
    for trial in range(300):
        n_pos, n_neg = rng.integers(1, 80, 2)
        if trial % 2:  # integer scores: many ties, within and across the two sets
            pos, neg = rng.integers(0, 6, n_pos).astype(float), rng.integers(-1, 5, n_neg).astype(float)
        else:
            pos, neg = rng.normal(0.5, 0.2, n_pos), rng.normal(0.3, 0.2, n_neg)
        preds = torch.tensor(np.r_[pos, neg])
        target = torch.tensor(np.r_[np.ones(n_pos), np.zeros(n_neg)]).long()
        assert ood.auroc(pos, neg) == pytest.approx(float(binary_auroc(preds, target)), abs=1e-6)
        fpr, tpr, _ = binary_roc(preds, target)
        first = int(torch.nonzero(tpr >= ood.TPR)[0])
        assert ood.fpr_at_tpr(pos, neg) == pytest.approx(float(fpr[first]), abs=1e-6)


def test_metric_edge_cases():
    assert ood.auroc([2, 3], [0, 1]) == 1.0 and ood.auroc([0, 1], [2, 3]) == 0.0
    assert ood.auroc([1, 1, 1], [1, 1]) == 0.5
    assert ood.fpr_at_tpr(np.arange(100.0), [-1.0, 4.0, 5.0, 99.0]) == 0.5  # t = 5: accepts 95 of 100
    np.testing.assert_array_equal(ood.average_ranks(np.array([3, 1, 3, 2])), [3.5, 1, 3.5, 2])
    with pytest.raises(ValueError, match="finite"):
        ood.auroc([np.nan], [0.0])
    lo, hi = ood.bootstrap_ci(np.arange(50.0), np.arange(50.0) - 10, ood.auroc, resamples=200)
    assert lo < ood.auroc(np.arange(50.0), np.arange(50.0) - 10) < hi


def test_knn_scores_in_chunks_equal_brute_force_distances():
    g = torch.Generator().manual_seed(0)
    bank = ood.normalize_rows(torch.randn(300, 16, generator=g))
    queries = ood.normalize_rows(torch.randn(37, 16, generator=g))
    for k in (1, 7, 300):
        expected = -torch.cdist(queries.double(), bank.double()).sort(dim=1).values[:, k - 1]
        got = ood.knn_scores(queries, bank, k, chunk_elements=1000)  # 3 queries a chunk
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    with pytest.raises(ood.OODError, match="at least 301"):
        ood.knn_scores(queries, bank, 301)


def test_msp_uses_the_temperature_and_energy_is_logsumexp():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    np.testing.assert_allclose(ood.msp_scores(logits), torch.softmax(logits.double(), 1).amax(1).numpy())
    np.testing.assert_allclose(ood.msp_scores(logits, 2.0), torch.softmax(logits.double() / 2, 1).amax(1).numpy())
    np.testing.assert_allclose(ood.energy_scores(logits), np.log(np.exp(logits.double().numpy()).sum(1)))


def test_features_are_the_heads_input(detector, cifar):
    from cifarlab.models import build_model

    for model in (detector.model, build_model("fast").eval()):  # exercise: dense_1; fast: head, then a scale
        head = ood.head_layer(model)
        assert head == {"exercise": "dense_1", "fast": "head"}[model.declaration["name"]]
        images = cifar.test.images[:8]
        feats, logits = ood.features_and_logits(model, images, detector.normalization, batch_size=3)
        assert feats.dtype == logits.dtype == torch.float32 and not model.training
        children = list(model.named_children())
        at = [name for name, _ in children].index(head)
        with torch.no_grad():
            x = detector.normalization(images)
            for _, module in children[:at]:
                x = module(x)
            torch.testing.assert_close(feats, x.flatten(1), atol=1e-4, rtol=1e-4)
            for _, module in children[at:]:
                x = module(x)
        torch.testing.assert_close(logits, x, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# The bank and the threshold


def test_threshold_is_fitted_on_held_out_images_outside_the_bank(run, data, detector):
    bank = ood.load_bank(run / "ood" / ood.BANK_FILE)
    train = data.train
    bank_idx, held_idx = set(bank.indices.tolist()), set(bank.holdout_indices.tolist())
    assert not bank_idx & held_idx and len(bank_idx | held_idx) == N_TRAIN
    # the threshold's images are exactly the run's --val-split hold-out, as training made it
    _, held = holdout_split(train, VAL_SPLIT, seed=SEED)
    assert torch.equal(train.images[bank.holdout_indices], held.images)
    stored = json.loads((run / "ood" / ood.THRESHOLD_FILE).read_text())
    assert stored["fitted_on"] == VAL_SPLIT and "not in the bank" in stored["fitted_on_what"]
    assert stored["threshold"] == detector.threshold and stored["k"] == 50 and stored["tpr"] == 0.95
    held = detector.score(held.images)
    assert detector.threshold == pytest.approx(ood.fit_threshold(held["layers"]), abs=1e-5)
    assert (held["layers"] >= detector.threshold).mean() >= 0.95
    assert stored["knn_threshold"] == pytest.approx(ood.fit_threshold(held["knn"]), abs=1e-5)
    # the standardization is each layer's held-out KNN scores' mean and sd (held-out: not in the layer banks)
    assert set(bank.layer_indices.tolist()) <= bank_idx and list(stored["standardize"]) == [
        *ood.feature_layers(detector.model), "penultimate"]
    assert stored["standardize"]["penultimate"][0] == pytest.approx(float(held["knn"].mean()), abs=1e-5)
    # Fitted on the bank's own images instead, each one's nearest neighbour is itself: a higher threshold
    own = ood.knn_scores(bank.features[:VAL_SPLIT], detector.bank, detector.k)
    assert ood.fit_threshold(own) > stored["knn_threshold"]
    name = ood.feature_layers(detector.model)[0]
    assert not set(bank.layer_indices.tolist()) & held_idx  # the layer banks hold none of the threshold's images
    own_layer = ood.knn_scores(bank.layers[name][:VAL_SPLIT], detector.layer_banks[name], 1)
    held_layer = ood.knn_scores(bank.holdout_layers[name], detector.layer_banks[name], 1)
    assert own_layer.max() == pytest.approx(0.0, abs=1e-3) and held_layer.max() < -1e-3  # a bank row finds itself
    # ... and with k = 1 every bank image scores 0 (the best), while the held-out ones do not
    one = ood.prepare(run, data, k=1, log=_quiet)
    assert ood.fit_threshold(ood.knn_scores(bank.features, one.bank, 1)) == pytest.approx(0.0, abs=1e-3)
    assert one.threshold_info["knn_threshold"] < -0.01 and one.layer_k == 1
    ood.prepare(run, data, log=_quiet)  # back to k = 50 for the other tests


def test_run_without_val_split_holds_out_a_tenth_of_its_images(trained_run, cifar, tmp_path):
    """The conftest run (exercise net, 3,000 images, no --val-split): 300 seeded images kept out of the bank.
    (A copy: the shared run folder stays as other tests expect it.)"""
    from cifarlab.data import CIFAR10

    trained_run = shutil.copytree(trained_run, tmp_path / "run")
    same = CIFAR10(train=cifar.train.subset(slice(0, 3000)), test=cifar.test.subset(slice(0, 1000)),
                   classes=cifar.classes, root=cifar.root)
    log = _Log()
    det = ood.prepare(trained_run, same, log=log)
    bank = ood.load_bank(trained_run / "ood" / ood.BANK_FILE)
    assert len(bank.indices) == 2700 and len(bank.holdout_indices) == 300
    assert not set(bank.indices.tolist()) & set(bank.holdout_indices.tolist())
    assert det.threshold_info["fitted_on"] == 300 and "held out of the bank" in det.threshold_info["fitted_on_what"]
    assert any("building the feature bank" in line for line in log)
    with pytest.raises(ood.OODError, match="cannot be rebuilt"):  # the full set is not what it trained on
        ood.prepare(trained_run, cifar, log=_quiet)


def test_the_bank_is_reused_and_rebuilt_when_the_weights_change(run_copy, data):
    path = run_copy / "ood" / ood.BANK_FILE
    before = os.stat(path).st_mtime_ns
    log = _Log()
    again = ood.prepare(run_copy, data, log=log)
    assert any("reused" in line for line in log) and not any("building" in line for line in log)
    assert os.stat(path).st_mtime_ns == before
    ckpt = load_checkpoint(run_copy)
    with torch.no_grad():
        ckpt.model.dense_1.weight.mul_(1.5).add_(0.01)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "weights_sha256", "versions", "meta_sha256")}
    save_checkpoint(ckpt.path, ckpt.model, meta)
    log = _Log()
    changed = ood.prepare(run_copy, data, log=log)
    assert any("rebuilding" in line and "weights_sha256" in line for line in log), log
    assert changed.info["weights_sha256"] == load_checkpoint(run_copy).meta["weights_sha256"] \
        != again.info["weights_sha256"]
    assert ood.load_bank(path).info["weights_sha256"] == changed.info["weights_sha256"]


def _damage(path, how):
    if how == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        bank = ood.load_bank(path)
        info = {k: v for k, v in bank.info.items() if k != "tensors_sha256"}
        if how == "nan":
            bank.features[3, 5] = float("nan")
        elif how == "wrong shape":
            bank.features = bank.features[:, :-1].contiguous()
        elif how == "not unit norm":
            bank.features[0] *= 2
        elif how == "edited metadata":
            bank.info["count"] = -1
            ood.save_bank(path, bank)
            return
        bank.info = info
        ood.save_bank(path, bank)  # a valid checksum: the check that refuses it is the one named


@pytest.mark.parametrize("how, message", [
    ("truncated", "truncated or damaged"), ("garbage", "not a valid safetensors"), ("fifo", "not a regular file"),
    ("nan", "NaN"), ("wrong shape", "not float32"), ("not unit norm", "unit norm"),
    ("edited metadata", "'count'")])
def test_a_damaged_bank_is_refused_with_a_clear_message(run_copy, how, message):
    path = run_copy / "ood" / ood.BANK_FILE
    _damage(path, how)
    with pytest.raises(ood.OODError, match=message) as caught:
        ood.load_bank(path)
    assert str(path) in str(caught.value) and "Traceback" not in str(caught.value)


@pytest.mark.parametrize("how", ["truncated", "fifo", "nan"])
def test_a_damaged_bank_is_rebuilt_with_a_note(run_copy, data, detector, how):
    path = run_copy / "ood" / ood.BANK_FILE
    _damage(path, how)
    log = _Log()
    rebuilt = ood.prepare(run_copy, data, log=log)
    assert any(line.startswith("note: OOD feature bank not used, rebuilding it") for line in log), log
    assert rebuilt.threshold == pytest.approx(detector.threshold, abs=1e-5)
    assert ood.load_bank(path).info["count"] == N_TRAIN - VAL_SPLIT


def test_a_damaged_threshold_file_is_refitted(run_copy, data, detector):
    path = run_copy / "ood" / ood.THRESHOLD_FILE
    path.write_text(json.dumps(dict(json.loads(path.read_text()), threshold=float("1e12"))))
    log = _Log()
    det = ood.prepare(run_copy, data, log=log)
    assert any("threshold not used" in line and "'threshold'" in line for line in log), log
    assert det.threshold == pytest.approx(detector.threshold, abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# Detection on real data


def test_knn_separates_cifar_test_images_from_gaussian_noise(detector, cifar, tmp_path):
    """The model is more confident on noise than on real test images (MSP and energy AUROC far below 0.5: the
    issue's "frog with high confidence"); the KNN score is not fooled.

    How far KNN gets depends on the run, not only on its accuracy: measured KNN AUROCs vs this noise (1,000
    test images, k = 50) were 0.44 to 0.92 for other tiny runs (exercise and fast nets, 1-4 epochs on 1,500
    to 4,500 images) and 0.71 for a fast net at 72% held-out accuracy (3 epochs on 20,000 images); this
    run reaches 0.9997. The second assertion held for every one of those runs; the first is this run's."""
    _, _, noise = ood.load_ood_set("noise", None, cifar)
    assert noise.shape == (2000, 3, 32, 32) and noise.dtype == torch.uint8
    sets = [("noise", "noise", noise[:1000])]
    results, files = ood.evaluate_ood(detector, cifar.test.images[:1000], sets, tmp_path, resamples=100,
                                      log=_quiet)
    m = results["sets"][0]["metrics"]
    assert m["layers"]["auroc"] >= 0.99 and m["knn"]["auroc"] >= 0.9, m
    assert m["layers"]["auroc"] >= max(m["msp"]["auroc"], m["energy"]["auroc"]) + 0.25 and m["msp"]["auroc"] < 0.5, m
    assert m["layers"]["auroc_ci95"][0] <= m["layers"]["auroc"] <= m["layers"]["auroc_ci95"][1]
    assert results["sets"][0]["flagged_at_threshold"] > 0.9
    assert os.path.getsize(files["ood_histograms"]) > 1000


# ---------------------------------------------------------------------------------------------------
# The commands


def _png(array: np.ndarray, path):
    Image.fromarray(array).save(path)
    return path


def test_predict_json_carries_the_ood_entry(run, detector, cifar, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFARLAB_DATA", str(data_dir))
    images = [_png(cifar.test.images[i].permute(1, 2, 0).numpy(), tmp_path / f"{i}.png") for i in range(3)]
    noise = _png(ood.gaussian_noise(1, (3, 32, 32), seed=5)[0].permute(1, 2, 0).numpy(), tmp_path / "noise.png")
    (tmp_path / "bad.png").write_text("not an image")
    files = [str(p) for p in (*images, noise, tmp_path / "bad.png")]
    assert main(["predict", str(run), *files, "--json"]) == 2  # the unreadable file, as before
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    assert "error" in results[4] and "ood" not in results[4]
    expected = detector.score(torch.stack([cifar.test.images[0], cifar.test.images[1], cifar.test.images[2],
                                           ood.gaussian_noise(1, (3, 32, 32), seed=5)[0]]))["layers"]
    for r, score in zip(results[:4], expected):
        assert set(r["ood"]) == {"score", "threshold", "flag", "method", "k", "layer_k"}
        assert r["ood"]["method"] == "layers" and r["ood"]["k"] == 50 and r["ood"]["layer_k"] == detector.layer_k
        assert r["ood"]["threshold"] == detector.threshold
        assert r["ood"]["score"] == pytest.approx(float(score), abs=1e-5)
        assert r["ood"]["flag"] == (r["ood"]["score"] < r["ood"]["threshold"])
    assert results[3]["ood"]["flag"] is True
    assert "reused" in captured.err
    # text: the flagged picture says so next to its classes
    assert main(["predict", str(run), str(noise)]) == 0
    out = capsys.readouterr().out
    assert f"unlike any class I know (score {results[3]['ood']['score']:.4f}, threshold " in out
    assert main(["predict", str(run), str(noise), "--json", "--no-ood"]) == 0
    assert "ood" not in json.loads(capsys.readouterr().out)["results"][0]


def test_predict_says_once_why_the_flag_is_unavailable(run, cifar, tmp_path, capsys):
    loose = tmp_path / "model.safetensors"
    shutil.copy(run / "final" / "model.safetensors", loose)  # a checkpoint outside any run folder
    images = [_png(cifar.test.images[i].permute(1, 2, 0).numpy(), tmp_path / f"{i}.png") for i in range(2)]
    assert main(["predict", str(loose), *map(str, images), "--json"]) == 0
    captured = capsys.readouterr()
    assert all("ood" not in r and r["predictions"] for r in json.loads(captured.out)["results"])
    assert captured.err.count("out-of-distribution flag is unavailable") == 1
    assert "not inside a run folder (pass --run RUN)" in captured.err and "Traceback" not in captured.err


def test_evaluate_ood_writes_auroc_fpr_and_histograms(run, detector, data, tmp_path, monkeypatch, capsys):
    from cifarlab.cli import evaluate as cli_evaluate
    from cifarlab.data import CIFAR10

    few = CIFAR10(train=data.train, test=data.test.subset(slice(0, 300)), classes=data.classes, root=data.root,
                  spec="cifar10", identity=dict(data.identity))
    monkeypatch.setattr(cli_evaluate, "load_data", lambda args, **kwargs: few)
    photos = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for c in ("stripes", "blobs"):
            (photos / split / c).mkdir(parents=True)
            for i in range(count):
                size = int(rng.integers(40, 90))
                yy, xx = np.mgrid[:size, :size]
                wave = np.sin(xx / rng.uniform(2, 9) + (yy / 5 if c == "blobs" else 0))
                pixels = np.stack([(127 + 120 * wave * s) for s in rng.uniform(-1, 1, 3)], -1).astype(np.uint8)
                _png(pixels, photos / split / c / f"{i}.png")
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out), "--ood", "noise", "permuted", str(photos),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((out / "ood.json").read_text())
    assert printed["ood"] == stored and printed["files"]["ood"] == str(out / "ood.json")
    assert (out / "ood_scores.png").stat().st_size > 1000 and (out / "results.json").exists()
    assert stored["in_distribution"]["images"] == 300 and stored["k"] == 50
    names = [s["name"] for s in stored["sets"]]
    assert names == ["noise", "permuted", f"folder:{photos}"]
    assert [s["images"] for s in stored["sets"]] == [300, 300, 32]
    for s in stored["sets"]:
        assert set(s["metrics"]) == {"layers", "knn", "msp", "energy"}
        for m in s["metrics"].values():
            assert 0 <= m["auroc"] <= 1 and 0 <= m["fpr_at_95_tpr"] <= 1
            lo, hi = m["auroc_ci95"]  # all three sets are small: bootstrap intervals
            assert lo <= hi and s["bootstrap"]["resamples"] == 1000
    # the numbers are the metrics of the scores, recomputed here
    id_scores = detector.score(few.test.images)
    noise = detector.score(ood.gaussian_noise(300, (3, 32, 32), seed=0))
    assert stored["sets"][0]["metrics"]["knn"]["auroc"] == pytest.approx(ood.auroc(id_scores["knn"], noise["knn"]))
    assert stored["sets"][0]["metrics"]["layers"]["auroc"] == pytest.approx(
        ood.auroc(id_scores["layers"], noise["layers"]))
    assert stored["sets"][0]["flagged_at_threshold"] == pytest.approx(float((noise["layers"] < detector.threshold).mean()))
    assert stored["sets"][0]["metrics"]["energy"]["fpr_at_95_tpr"] == pytest.approx(
        ood.fpr_at_tpr(id_scores["energy"], noise["energy"]))
    assert main(["evaluate", str(run), "--out", str(out), "--ood", "nonsense"]) == 2
    assert "unknown OOD set 'nonsense'" in capsys.readouterr().err


def test_the_flag_rate_on_cifar10_1_is_reported(run, detector, data, cifar, data_dir, tmp_path, monkeypatch, capsys):
    """`evaluate --ood cifar10.1`: the flag rate on a shifted set (the real CIFAR-10.1 is not reachable here:
    files in its exact format are made from 500 CIFAR-10 test images, so no shift at all, and the rate must
    stay near the 5% the threshold lets through)."""
    import hashlib
    import io

    from cifarlab.cli import evaluate as cli_evaluate
    from cifarlab.data import DATASETS, CIFAR10, DatasetEntry, cifar10_1

    def npy(array):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return buf.getvalue()

    stand_in = cifar.test.images[1000:1500]
    files = {"cifar10.1_v6_data.npy": npy(stand_in.permute(0, 2, 3, 1).contiguous().numpy()),
             "cifar10.1_v6_labels.npy": npy(cifar.test.labels[1000:1500].numpy())}
    folder = tmp_path / "c101"
    folder.mkdir()
    for name, body in files.items():
        (folder / name).write_bytes(body)
    sha = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    monkeypatch.setitem(DATASETS, "cifar10.1", DatasetEntry(
        lambda arg, **kw: cifar10_1.load(arg, **dict(kw, data_dir=folder, files=sha)), "cifar10.1", "test copy"))
    few = CIFAR10(train=data.train, test=data.test.subset(slice(0, 1000)), classes=data.classes, root=data.root,
                  spec="cifar10", identity=dict(data.identity))
    monkeypatch.setattr(cli_evaluate, "load_data", lambda args, **kwargs: few)
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval"), "--ood", "cifar10.1", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["ood"]["sets"][0]
    assert entry["name"] == "cifar10.1" and entry["images"] == 500
    expected = float((detector.score(stand_in)["layers"] < detector.threshold).mean())
    assert entry["flagged_at_threshold"] == pytest.approx(expected)
    assert entry["flagged_at_threshold"] <= 0.15, entry  # near the 5% of in-distribution images the threshold drops
    assert 0.35 <= entry["metrics"]["layers"]["auroc"] <= 0.65  # indistinguishable from the test set


def test_the_report_shows_the_ood_results_of_these_weights(run_copy, data, tmp_path, monkeypatch, capsys):
    from cifarlab import report
    from cifarlab.cli import evaluate as cli_evaluate
    from cifarlab.data import CIFAR10

    few = CIFAR10(train=data.train, test=data.test.subset(slice(0, 300)), classes=data.classes, root=data.root,
                  spec="cifar10", identity=dict(data.identity))
    monkeypatch.setattr(cli_evaluate, "load_data", lambda args, **kwargs: few)
    ckpt = load_checkpoint(run_copy)
    assert report._ood_section(run_copy / "eval", ckpt)["blocks"][0]["kind"] == "parts"  # not evaluated: the hint
    assert main(["evaluate", str(run_copy), "--ood", "noise", "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["ood"]
    section = report._ood_section(run_copy / "eval", ckpt)
    table = section["blocks"][0]
    assert table["header"][:3] == ["OOD set", "images", "flagged"] and len(table["rows"]) == 1
    row, entry = table["rows"][0], stored["sets"][0]
    assert row[:3] == ["noise", "300", f"{100 * entry['flagged_at_threshold']:.2f}%"]
    assert row[3].startswith(f"{entry['metrics']['layers']['auroc']:.3f} [")
    assert section["blocks"][1]["kind"] == "figure"
    other = dict(ckpt.meta, weights_sha256="0" * 64)  # results of other weights are not shown as these
    ckpt.meta = other
    assert "made with other weights" in report._ood_section(run_copy / "eval", ckpt)["blocks"][0]["text"]
    (run_copy / "eval" / "ood.json").write_text('{"sets": 5}')
    assert "not readable as OOD results" in report._ood_section(run_copy / "eval", ckpt)["blocks"][0]["text"]
