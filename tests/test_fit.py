"""``--fit`` and the automatic image size for photo folders: decoded, cached, recorded in the run and
reproduced by evaluate/predict/export; the real ants/bees photos choose 64 px, 32x32 PNGs choose 32."""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab import images
from cifarlab.cli import build_parser, main
from cifarlab.cli.args import load_data
from cifarlab.data import folder as F
from cifarlab.data import load_dataset
from cifarlab.errors import DataError
from cifarlab.images import FITS, load_image, load_images

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos" / "hymenoptera_data"


@pytest.fixture
def odd(tmp_path) -> Path:
    """train/ and test/ of two classes (reddish, bluish), wide 40x20 and tall 20x40 pictures with noise."""
    root = tmp_path / "odd"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for name, channel in (("blue", 2), ("red", 0)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 80, (20, 40, 3), dtype=np.uint8)
                a[..., channel] += 170
                Image.fromarray(a if i % 2 else a.transpose(1, 0, 2).copy()).save(root / split / name / f"{i}.png")
    return root


def _args(**values) -> argparse.Namespace:
    """Options as a command without the data options would have them (only what load_data requires)."""
    return argparse.Namespace(**dict(dict(dataset=None, data_dir=None, no_download=True), **values))


def _files(ds, split: str) -> list[Path]:
    return [Path(ds.root) / f for f in ds.files[split]]


# ---------------------------------------------------------------------------------------------------
# The fit: decoded, keyed, recorded


def test_each_fit_is_decoded_recorded_and_cached_apart(odd, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    loaded = {}
    for fit in FITS:
        lines = []
        ds = load_dataset(f"folder:{odd}", image_size=16, fit=fit, log=lines.append)
        assert any("decoded 20 images" in line and "fit " + fit in line for line in lines), lines
        assert ds.identity["fit"] == fit and ds.identity["image_size"] == 16
        assert ds.identity["image_size_from"] == "given"
        assert ds.describe()["identity"]["fit"] == fit  # what checkpoints and dataset.json store
        for split in ("train", "test"):
            assert torch.equal(getattr(ds, split).images, load_images(_files(ds, split), 16, fit=fit))
        loaded[fit] = ds
    keys = {fit: ds.identity["content_sha256"] for fit, ds in loaded.items()}
    assert len(set(keys.values())) == 3  # a different fit never reuses another fit's cache
    assert len({ds.train.images.numpy().tobytes() for ds in loaded.values()}) == 3
    # Each fit comes back from its own cache entry: no decoding, the same tensors.
    for fit in FITS:
        lines = []
        again = load_dataset(f"folder:{odd}", image_size=16, fit=fit, log=lines.append)
        assert not lines and torch.equal(again.train.images, loaded[fit].train.images)
        assert again.identity == loaded[fit].identity
    # Unset, the fit is DEFAULT_FIT.
    assert load_dataset(f"folder:{odd}", image_size=16).identity["fit"] == images.DEFAULT_FIT


def test_crop_keeps_the_cache_key_it_had_before_fits(odd):
    """Runs recorded before fits resume (content_sha256 is compared) and their cache entries stay valid."""
    files = F._list_files(odd / "train", ["blue", "red"])
    tests = F._list_files(odd / "test", ["blue", "red"])
    old = hashlib.sha256(f"{F.CACHE_FORMAT}|32|".encode())  # the key's formula before fits existed
    for split, group in (("train", files), ("test", tests)):
        for path, label in group:
            old.update(f"{split}|{label}|{os.path.relpath(path, odd)}|".encode())
            old.update(hashlib.sha256(Path(path).read_bytes()).hexdigest().encode())
    assert F._content_key(odd, files, tests, 32, "crop") == F._content_key(odd, files, tests, 32) == old.hexdigest()
    assert F._content_key(odd, files, tests, 32, "pad") != old.hexdigest()
    assert F._content_key(odd, files, tests, 32, "squish") != F._content_key(odd, files, tests, 32, "pad")


def test_worker_processes_decode_with_the_fit(odd):
    paths = [str(p) for p in sorted((odd / "train").rglob("*.png"))] * 5  # 80 jobs: enough for the pool
    pooled = F._decode_all(paths, 16, workers=2, fit="pad")
    assert all(why == "" for _, why in pooled)
    for path, (array, _) in zip(paths, pooled):
        assert np.array_equal(array, load_image(path, 16, fit="pad").numpy())


def test_unknown_fit_is_a_data_error(odd):
    with pytest.raises(DataError, match="unknown fit 'zoom': use one of crop, squish, pad"):
        load_dataset(f"folder:{odd}", fit="zoom")


# ---------------------------------------------------------------------------------------------------
# The automatic image size


def test_auto_size_is_64_for_the_real_photos():
    if not PHOTOS.is_dir():
        pytest.fail(f"the real photos are needed at {PHOTOS}")
    files = [p for p, _ in F._list_files(PHOTOS / "train", ["ants", "bees"])]
    assert len(files) > F.AUTO_SAMPLE  # so the sample is taken
    size, median, measured = F.auto_image_size(files)
    assert (size, measured) == (64, F.AUTO_SAMPLE) and median >= 96
    assert F.auto_image_size(files) == (size, median, measured)  # deterministic


def test_auto_size_is_32_for_32x32_pngs_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (tmp_path / "tiny" / name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "tiny" / name / f"{i}.png")
    lines = []
    ds = load_dataset(f"folder:{tmp_path / 'tiny'}", log=lines.append)
    assert ds.image_shape == (3, 32, 32) and ds.identity["image_size"] == 32
    assert ds.identity["image_size_from"] == "auto: median shorter side 32 px of 8 training files"
    assert any(line.startswith("image size 32 (auto: median shorter side 32 px") for line in lines)
    # The chosen size is recorded like an explicit one: the same cache entry, the same content key.
    explicit = load_dataset(f"folder:{tmp_path / 'tiny'}", image_size=32)
    assert explicit.identity["content_sha256"] == ds.identity["content_sha256"]


def test_auto_size_threshold_sample_and_unreadable_files(tmp_path):
    for name, (w, h) in {"a": (96, 200), "b": (95, 95), "c": (300, 96)}.items():
        Image.new("RGB", (w, h)).save(tmp_path / f"{name}.png")
    paths = [str(tmp_path / f"{n}.png") for n in "abc"]
    assert F.auto_image_size(paths) == (64, 96, 3)  # median shorter side 96: 64
    Image.new("RGB", (95, 400)).save(tmp_path / "c.png")
    assert F.auto_image_size(paths) == (32, 95, 3)  # 95: 32
    (tmp_path / "bad.png").write_text("not an image")
    os.mkfifo(tmp_path / "fifo.png")  # must not block
    assert F.auto_image_size([str(tmp_path / "bad.png"), str(tmp_path / "fifo.png")] + paths) == (32, 95, 3)
    assert F.auto_image_size([str(tmp_path / "bad.png")]) == (32, None, 0)
    assert F.auto_image_size(paths * 10, sample=4)[2] == 4


# ---------------------------------------------------------------------------------------------------
# The command line and a stored run


def test_cli_options_default_to_auto_and_unset():
    args = build_parser().parse_args(["data", "--dataset", "folder:x"])
    assert args.image_size is None and args.fit is None
    args = build_parser().parse_args(["train", "--fit", "pad", "--image-size", "48"])
    assert args.fit == "pad" and args.image_size == 48


@pytest.mark.parametrize("argv", [["data", "--fit", "stretch"], ["train", "--fit", ""], ["data", "--fit"],
                                  ["evaluate", "run", "--fit", "CROP"], ["data", "--image-size", "auto"]])
def test_bad_fit_is_an_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_load_data_restores_a_stored_size_and_fit(odd, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    ds = load_dataset(f"folder:{odd}", image_size=16, fit="pad")
    stored = json.loads(json.dumps(ds.describe()))
    lines = []
    for args in (_args(), _args(image_size=None, fit=None), _args(image_size=48, fit="crop")):
        again = load_data(args, stored=stored, log=lines.append)
        assert again.identity["fit"] == "pad" and again.image_shape == (3, 16, 16)
        assert torch.equal(again.train.images, ds.train.images)
    assert "note: --fit crop ignored: the run's data folder:" in lines[-1]
    # Another folder named along with the checkpoint takes its size and fit unless told otherwise.
    other = load_data(_args(dataset=f"folder:{odd}"), stored=stored, log=lines.append)
    assert other.identity["fit"] == "pad" and other.image_shape == (3, 16, 16)
    told = load_data(_args(dataset=f"folder:{odd}", fit="squish", image_size=24), stored=stored, log=lines.append)
    assert told.identity["fit"] == "squish" and told.image_shape == (3, 24, 24)


def test_an_old_identity_without_fit_means_crop(odd, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    ds = load_dataset(f"folder:{odd}", image_size=16, fit="crop")
    old = copy.deepcopy(ds.describe())
    del old["identity"]["fit"], old["identity"]["image_size_from"]  # as runs before fits recorded it
    again = load_data(_args(fit="pad"), stored=old, log=lambda *a: None)
    assert again.identity["fit"] == "crop" and again.image_shape == (3, 16, 16)
    assert again.identity["content_sha256"] == ds.identity["content_sha256"]
    bad = copy.deepcopy(old)
    bad["identity"]["fit"] = "warp"
    with pytest.raises(DataError, match="dataset entry cannot be used: .*'warp'"):
        load_data(_args(), stored=bad)


def test_load_data_passes_cifar_no_size_but_a_stored_32(monkeypatch):
    """CIFAR loaders refuse any size but 32: an unset size is not passed; a stored CIFAR run gives 32, crop."""
    import cifarlab.data as data

    calls = []
    monkeypatch.setattr(data, "load_dataset", lambda spec, **kw: calls.append((spec, kw)) or
                        data.Dataset(train=data.Split(torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                                                      torch.tensor([0, 1])),
                                     test=data.Split(torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                                                     torch.tensor([0, 1])), classes=["a", "b"]))
    folder_run = {"spec": "folder:/x", "image_shape": [3, 64, 64], "identity": {"fit": "pad", "image_size": 64}}
    load_data(_args(dataset="cifar10"), stored=folder_run, log=lambda *a: None)
    load_data(_args(), stored={"spec": "cifar10", "image_shape": [3, 32, 32], "identity": {"format": "binary"}})
    load_data(_args(image_size=None, fit=None))
    assert [c[0] for c in calls] == ["cifar10", "cifar10", "cifar10"]
    assert "image_size" not in calls[0][1] and "fit" not in calls[0][1]
    assert calls[1][1]["image_size"] == 32 and calls[1][1]["fit"] == "crop"
    assert "image_size" not in calls[2][1] and "fit" not in calls[2][1]


# ---------------------------------------------------------------------------------------------------
# A tiny run on a folder with --fit pad: recorded, evaluated, predicted and exported the same way


def test_a_pad_run_records_its_fit_and_predict_and_export_use_it(odd, tmp_path, monkeypatch, one_thread, capsys):
    from cifarlab.checkpoints import load_checkpoint
    from cifarlab.predict import predict_files, predict_images
    from cifarlab.train import recipe_from, train

    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    ds = load_dataset(f"folder:{odd}", image_size=16, fit="pad")
    run = tmp_path / "run"
    train(recipe_from("exercise", epochs=1), ds, run, progress=False, log=lambda *a, **k: None)
    assert json.loads((run / "dataset.json").read_text())["identity"]["fit"] == "pad"
    ckpt = load_checkpoint(run)
    assert ckpt.meta["dataset"]["identity"]["fit"] == "pad"
    # evaluate/report/calibrate: the run's own data, as it was
    assert load_data(_args(), stored=ckpt.meta["dataset"], log=lambda *a: None).identity["content_sha256"] \
        == ds.identity["content_sha256"]
    # predict: a wide picture is padded at 16 px, as the training pictures were
    wide = odd / "train" / "red" / "1.png"
    entries = predict_files(ckpt, [wide], top_k=2)
    padded = predict_images(ckpt, load_image(wide, 16, fit="pad")[None], top_k=2)[0]
    assert entries[0]["predictions"] == padded
    assert not torch.equal(load_image(wide, 16, fit="pad"), load_image(wide, 16, fit="crop"))
    assert main(["predict", str(run), str(wide), "--json", "--top-k", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["predictions"] == padded
    # export: the fit is in the model's metadata and doc string
    onnx = pytest.importorskip("onnx")
    from cifarlab.export import onnx_bytes

    proto = onnx.load_from_string(onnx_bytes(ckpt))
    assert {p.key: p.value for p in proto.metadata_props}["cifarlab.fit"] == "pad"
    assert "made square by 'pad'" in proto.doc_string
