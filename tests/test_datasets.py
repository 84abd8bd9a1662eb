"""Datasets as an extension point: CIFAR-100 in its official binary layout over loopback HTTP, image
folders of real photos (and CIFAR-10 written out as PNGs), the registry, and a 100-class run end to end."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab.cli import main as cli_main
from cifarlab.data import DATASETS, Dataset, Split, load_dataset, parse_spec
from cifarlab.data import cifar100 as C
from cifarlab.data import folder as F
from cifarlab.errors import DataError
from conftest import serve, write_image_folder

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos" / "hymenoptera_data"


# ---------------------------------------------------------------------------------------------------
# CIFAR-100: the official binary layout, built here from real CIFAR-10 pixels, served on 127.0.0.1


def _cifar100_records(data_dir: Path, n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """n records of (coarse byte, fine byte, 3,072 pixel bytes): real pixels, labels covering 0..99/0..19."""
    from cifarlab.data.cifar10 import read_bin

    pixels, _ = read_bin(data_dir / "data_batch_1.bin")
    rng = np.random.default_rng(seed)
    fine = np.arange(n) % 100
    rng.shuffle(fine)
    coarse = fine // 5  # any fixed mapping onto 20 superclasses
    records = np.concatenate([coarse[:, None], fine[:, None], pixels[:n].reshape(n, -1)], axis=1).astype(np.uint8)
    return records.tobytes(), pixels[:n], fine, coarse


FINE = [f"fine_{i:02d}" for i in range(100)]
COARSE = [f"coarse_{i:02d}" for i in range(20)]


def _cifar100_archive(data_dir: Path, n_train: int = 300, n_test: int = 200, bad_label: bool = False):
    train, train_x, train_fine, train_coarse = _cifar100_records(data_dir, n_train, 0)
    test, test_x, test_fine, _ = _cifar100_records(data_dir, n_test, 1)
    if bad_label:
        test = bytearray(test)
        test[C.RECORD_BYTES * 7 + 1] = 100  # record 7's fine label
        test = bytes(test)
    files = {"train.bin": train, "test.bin": test, "fine_label_names.txt": ("\n".join(FINE) + "\n").encode(),
             "coarse_label_names.txt": ("\n".join(COARSE) + "\n").encode()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folder = tarfile.TarInfo(C.ARCHIVE.folder)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{C.ARCHIVE.folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    archive = buf.getvalue()
    # The official spec, with this archive's md5 and sizes (the real files are 50,000 and 10,000 records).
    spec = replace(C.ARCHIVE, archive_md5=hashlib.md5(archive).hexdigest(),
                   file_sizes={"train.bin": len(train), "test.bin": len(test)})
    return archive, spec, {"train_x": train_x, "train_fine": train_fine, "train_coarse": train_coarse,
                           "test_x": test_x, "test_fine": test_fine}


def test_cifar100_downloads_verifies_and_reads_fine_and_coarse_labels(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    archive, spec, truth = _cifar100_archive(data_dir)
    with serve(archive, name="cifar-100-binary.tar.gz") as (url, handler):
        fine = C.load_cifar100(url=url, archive=spec, progress=False)
        coarse = C.load_cifar100(labels="coarse", url=url, archive=spec, progress=False)
        assert handler.requests == 1  # the second load found the unpacked folder in the cache
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cifar-100-binary", "cifar-100-binary.tar.gz",
                                                                     "verified.json"] or \
        sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cifar-100-binary", "cifar-100-binary.tar.gz"]
    assert fine.classes == FINE and coarse.classes == COARSE
    assert fine.num_classes == 100 and coarse.num_classes == 20 and fine.image_shape == (3, 32, 32)
    assert np.array_equal(fine.train.images.numpy(), truth["train_x"])
    assert np.array_equal(fine.train.labels.numpy(), truth["train_fine"])
    assert np.array_equal(coarse.train.labels.numpy(), truth["train_coarse"])
    assert np.array_equal(fine.test.images.numpy(), truth["test_x"])
    assert np.array_equal(fine.test.labels.numpy(), truth["test_fine"])
    assert fine.spec == "cifar100" and coarse.spec == "cifar100:coarse"


def test_cifar100_wrong_md5_size_or_label_is_refused_and_nothing_is_cached(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    archive, spec, _ = _cifar100_archive(data_dir)
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "c1"))
    with serve(archive, name="cifar-100-binary.tar.gz") as (url, _):
        with pytest.raises(DataError, match="md5 of the download is"):
            C.load_cifar100(url=url, archive=replace(spec, archive_md5="0" * 32), progress=False)
    assert list((tmp_path / "c1").iterdir()) == []
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "c2"))
    with serve(archive, name="cifar-100-binary.tar.gz") as (url, _):
        with pytest.raises(DataError, match=r"train\.bin: 922,200 bytes, expected 922,201"):
            C.load_cifar100(url=url, archive=replace(spec, file_sizes={"train.bin": 922_201, "test.bin": 614_800}),
                            progress=False)
    assert not (tmp_path / "c2" / "cifar-100-binary").exists()
    archive, spec, _ = _cifar100_archive(data_dir, bad_label=True)
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "c3"))
    with serve(archive, name="cifar-100-binary.tar.gz") as (url, _):
        with pytest.raises(DataError, match=r"test\.bin: record 7 has label 100, expected 0\.\.99"):
            C.load_cifar100(url=url, archive=spec, progress=False)


def test_cifar100_from_a_folder_checks_sizes(data_dir, tmp_path):
    root = tmp_path / "cifar-100-binary"
    root.mkdir()
    (root / "train.bin").write_bytes(b"\0" * 3074)
    (root / "fine_label_names.txt").write_text("\n".join(FINE))
    with pytest.raises(DataError, match=r"train\.bin: 3,074 bytes, expected 153,700,000"):
        C.load_cifar100(tmp_path, download=False)


# ---------------------------------------------------------------------------------------------------
# The registry


def test_registry_names_every_dataset_and_refuses_unknown_ones():
    assert {"cifar10", "cifar100", "folder"} <= set(DATASETS)
    assert parse_spec("folder:/a:b") == ("folder", "/a:b") and parse_spec("cifar100:coarse") == ("cifar100", "coarse")
    with pytest.raises(DataError, match="unknown dataset 'imagenet': use one of cifar10, cifar100"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="CIFAR images are 32x32"):
        load_dataset("cifar10", image_size=64)


def test_a_new_dataset_is_one_function_and_one_entry(tmp_path):
    from cifarlab.data import register_dataset

    def load(arg, data_dir=None, download=True, progress=True, **options):
        g = torch.Generator().manual_seed(0)
        split = Split(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(40) % 4)
        return Dataset(train=split, test=split.subset(slice(0, 8)), classes=list("abcd"), name="toy", spec="toy")

    register_dataset("toy", load, "toy", "four classes of noise")
    try:
        ds = load_dataset("toy")
        assert ds.num_classes == 4 and ds.image_shape == (3, 16, 16)
    finally:
        DATASETS.pop("toy")


# ---------------------------------------------------------------------------------------------------
# Image folders


@pytest.fixture
def photos(tmp_path) -> Path:
    """The shared ants/bees photos, plus the odd files a real folder has (copied, so we can add them)."""
    if not PHOTOS.is_dir():
        pytest.fail(f"the real photos are needed at {PHOTOS}")
    root = tmp_path / "hymenoptera"
    shutil.copytree(PHOTOS, root, ignore=shutil.ignore_patterns("MD5SUMS", "SOURCE.md"))
    (root / "train" / "ants" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "bees" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "train" / "bees" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    (root / "val" / "bees" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_real_photos_load_with_train_and_val_and_odd_files_handled(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    lines = []
    ds = load_dataset(f"folder:{photos}", log=lines.append)  # the size is chosen from the photos: 64
    assert ds.classes == ["ants", "bees"] and ds.image_shape == (3, 64, 64)
    assert ds.identity["image_size"] == 64 and ds.identity["image_size_from"].startswith(
        f"auto: median shorter side ") and ds.identity["fit"] == "crop"
    assert lines[0].startswith("image size 64 (auto: median shorter side")
    # 398 photos (one GIF, one name with a space); the broken JPEG is skipped with its reason.
    assert len(ds.train) + len(ds.test) == 398
    assert ds.files["train"].count("train/ants/ant photos.jpg") == 1
    assert any(f.endswith(".gif") for f in ds.files["train"])
    assert len(ds.notes) == 1 and "val/bees/broken.jpg" in ds.notes[0]
    assert ds.identity["layout"] == "train/ and val/" and ds.identity["skipped"] == 1
    assert ds.train.images.dtype == torch.uint8 and int(ds.train.labels.max()) == 1
    with pytest.raises(DataError, match=r"1 file\(s\) could not be read \(--strict\): val/bees/broken\.jpg"):
        load_dataset(f"folder:{photos}", image_size=64, strict=True)
    # A second load comes from the cache (keyed by content; the auto size is keyed as the explicit 64 is):
    # no decoding message, same tensors, fast.
    lines.clear()
    start = time.perf_counter()
    again = load_dataset(f"folder:{photos}", image_size=64, log=lines.append)
    assert time.perf_counter() - start < 2.0 and not lines
    assert torch.equal(again.train.images, ds.train.images) and torch.equal(again.test.labels, ds.test.labels)
    # Editing a photo changes the key: it is decoded again.
    (photos / "val" / "bees" / "broken.jpg").unlink()
    third = load_dataset(f"folder:{photos}", image_size=64, log=lines.append)
    assert lines and not third.notes and third.identity["content_sha256"] != ds.identity["content_sha256"]


def test_one_tree_is_split_stratified_and_seeded(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    for c in ("ants", "bees"):
        shutil.copytree(photos / "train" / c, tree / c)
    a = load_dataset(f"folder:{tree}", test_fraction=0.25, split_seed=3)
    b = load_dataset(f"folder:{tree}", test_fraction=0.25, split_seed=3)
    c = load_dataset(f"folder:{tree}", test_fraction=0.25, split_seed=4)
    assert a.files == b.files and a.files != c.files
    assert not set(a.files["train"]) & set(a.files["test"])
    for label, name in enumerate(a.classes):  # each class keeps its share
        n = len(list((tree / name).glob("*.jp*g"))) + len(list((tree / name).glob("*.gif")))
        assert int((a.test.labels == label).sum()) == round(n * 0.25)
    assert a.identity["layout"] == "one tree, split" and a.identity["seed"] == 3


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "one" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match=r"found 1 class folder\(s\) \['cats'\]; a classifier needs at least two"):
        load_dataset(f"folder:{tmp_path / 'one'}")
    (tmp_path / "one" / "dogs").mkdir()
    (tmp_path / "one" / "dogs" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"cats: class 'cats' has no image files"):
        load_dataset(f"folder:{tmp_path / 'one'}")
    with pytest.raises(DataError, match="the folder dataset needs a path"):
        load_dataset("folder")


def test_cifar10_written_as_png_loads_back_as_the_same_images_and_labels(cifar, tmp_path, monkeypatch):
    """PNG is lossless and 32x32 passes through unchanged: the folder reader gives exactly the binary
    reader's images and labels, as a multiset of (image, label) pairs (file order differs)."""
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    part = Dataset(train=cifar.train.subset(slice(0, 600)), test=cifar.test.subset(slice(0, 200)),
                   classes=cifar.classes)
    root = write_image_folder(part, tmp_path / "cifar-png")
    ds = load_dataset(f"folder:{root}")
    assert ds.classes == sorted(cifar.classes)  # class index = sorted folder names
    assert ds.identity["image_size"] == 32 and ds.identity["image_size_from"].startswith("auto: median shorter "
                                                                                         "side 32 px of 200 ")
    remap = torch.tensor([ds.classes.index(c) for c in cifar.classes])

    def pairs(images, labels):
        return sorted(hashlib.sha256(img.numpy().tobytes() + bytes([int(y)])).hexdigest()
                      for img, y in zip(images, labels))

    assert pairs(ds.train.images, ds.train.labels) == pairs(part.train.images, remap[part.train.labels])
    assert pairs(ds.test.images, ds.test.labels) == pairs(part.test.images, remap[part.test.labels])


# ---------------------------------------------------------------------------------------------------
# A 100-class dataset through every command


@pytest.fixture(scope="module")
def hundred(cifar, tmp_path_factory) -> Path:
    """A 100-class image folder (real CIFAR-10 pixels, 100 classes of 6 training and 2 test images)."""
    root = tmp_path_factory.mktemp("hundred")
    train = cifar.train.subset(slice(0, 600))
    test = cifar.test.subset(slice(0, 200))
    labels_train, labels_test = torch.arange(600) % 100, torch.arange(200) % 100
    ds = Dataset(train=Split(train.images, labels_train), test=Split(test.images, labels_test),
                 classes=[f"c{i:03d}" for i in range(100)])
    return write_image_folder(ds, root / "data")


def test_a_100_class_run_trains_resumes_evaluates_visualizes_reports_predicts_and_exports(hundred, tmp_path,
                                                                                          monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from cifarlab import visualize
    from cifarlab.checkpoints import load_checkpoint
    from cifarlab.export import run_onnx

    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    quick = visualize.StimulusSettings.for_method
    monkeypatch.setattr(visualize.StimulusSettings, "for_method",
                        staticmethod(lambda m, **o: quick(m, **dict(o, steps=2))))
    runs = tmp_path / "runs"
    base = ["--dataset", f"folder:{hundred}", "--runs-dir", str(runs), "--no-progress", "--threads", "1",
            "--epochs", "2", "--batch-size", "100", "--seed", "1"]
    # Interrupted after 3 steps (the checkpoint holds them), then resumed: same weights as in one go.
    assert cli_main(["train", *base, "--name", "a", "--max-steps", "3"]) == 0
    assert cli_main(["train", *base, "--name", "a", "--resume"]) == 0
    assert cli_main(["train", *base, "--name", "b"]) == 0
    a, b = load_checkpoint(runs / "a" / "final"), load_checkpoint(runs / "b" / "final")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.meta["dataset"]["spec"] == f"folder:{hundred}" and len(a.meta["classes"]) == 100
    assert a.model.declaration["layers"][-1]["units"] == 100
    dataset_json = json.loads((runs / "a" / "dataset.json").read_text())
    assert len(dataset_json["files"]["train"]) == 600
    capsys.readouterr()
    # evaluate / visualize / report find the data from the checkpoint itself.
    assert cli_main(["evaluate", str(runs / "a"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results["per_class_accuracy"]) == 100 and len(results["confusion_matrix"]) == 100
    assert cli_main(["report", str(runs / "a"), "--faithfulness-images", "10", "--faithfulness-steps", "4",
                     "--sanity-images", "3"]) == 0
    page = (runs / "a" / "report.html").read_text()
    assert "Most confused pairs" in page or "most_confused" in json.dumps(results)
    assert "100 classes" in page
    probs = json.loads((runs / "a" / "visualize" / "summary.json").read_text())["class_probabilities"]
    assert len(probs["default"]) == 100
    examples = json.loads((runs / "a" / "visualize" / "explanations.json").read_text())["examples"]["layers"]
    assert len(examples["classes"]["channels"]) == 100  # a top-9 for every one of the 100 classes
    one = next((hundred / "test" / "c007").iterdir())
    capsys.readouterr()
    assert cli_main(["predict", str(runs / "a"), str(one), "--json", "--top-k", "5"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"][0]["predictions"]) == 5
    assert cli_main(["export", str(runs / "a" / "final"), "--out", str(tmp_path / "m.onnx")]) == 0
    logits, p = run_onnx(str(tmp_path / "m.onnx"), np.full((2, 3, 32, 32), 100, np.float32))
    assert logits.shape == (2, 100) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_a_declaration_for_another_number_of_classes_is_refused_with_the_numbers(hundred, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    decl = tmp_path / "ten.json"
    decl.write_text(json.dumps({"layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]}))
    code = cli_main(["train", "--dataset", f"folder:{hundred}", "--model", str(decl), "--runs-dir",
                     str(tmp_path / "runs"), "--no-progress"])
    assert code == 2
    assert "outputs (10,); expected (100,) for 100 classes" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------
# CIFAR-10.1: two .npy files, sha256-checked, served on 127.0.0.1 (the real ones are not reachable here)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture
def cifar10_1_files(cifar):
    """Files in CIFAR-10.1 v6's format (N, 32, 32, 3) uint8 + (N,) int64, from 50 real CIFAR-10 test images."""
    images = cifar.test.images[:50].permute(0, 2, 3, 1).contiguous().numpy()
    labels = cifar.test.labels[:50].numpy()
    return {"cifar10.1_v6_data.npy": _npy(images), "cifar10.1_v6_labels.npy": _npy(labels)}, images, labels


class _Files:
    """A tiny loopback HTTP server for several files (real HTTP, 127.0.0.1 only)."""

    def __init__(self, files: dict[str, bytes]):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = files.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/datasets/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_cifar10_1_downloads_verifies_and_loads_for_evaluation_only(cifar10_1_files, tmp_path, monkeypatch):
    from cifarlab.data import cifar10_1

    files, images, labels = cifar10_1_files
    sha = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    server = _Files(files)
    try:
        # The real checksums: these files are not CIFAR-10.1, so they are refused and nothing is kept.
        with pytest.raises(DataError, match="sha256 of the download is .* expected 2997188e"):
            cifar10_1.load("", url=server.url, progress=False)
        assert not any((tmp_path / "cache" / "cifar10.1").iterdir())
        ds = cifar10_1.load("", url=server.url, files=sha, progress=False)
    finally:
        server.close()
    assert ds.eval_only and len(ds.train) == 0 and len(ds.test) == 50 and ds.classes == cifar10_1.CLASSES
    assert np.array_equal(ds.test.images.permute(0, 2, 3, 1).numpy(), images)
    assert np.array_equal(ds.test.labels.numpy(), labels)
    # An object array or a wrong shape is refused from the header, before any data is read.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cifar10.1_v6_data.npy").write_bytes(_npy(np.zeros((5, 32, 32), np.uint8)))
    (tmp_path / "bad" / "cifar10.1_v6_labels.npy").write_bytes(files["cifar10.1_v6_labels.npy"])
    bad_sha = dict(sha, **{"cifar10.1_v6_data.npy": hashlib.sha256(
        (tmp_path / "bad" / "cifar10.1_v6_data.npy").read_bytes()).hexdigest()})
    with pytest.raises(DataError, match=r"holds uint8 \(5, 32, 32\), not what CIFAR-10.1 stores"):
        cifar10_1.load("", data_dir=tmp_path / "bad", files=bad_sha)


def test_evaluate_on_a_shifted_set_reports_the_gap_with_intervals(cifar10_1_files, trained_run, tmp_path,
                                                                   monkeypatch, capsys, data_dir):
    from cifarlab.data import DatasetEntry, cifar10_1
    from cifarlab.evaluate import wilson_interval

    files, _, labels = cifar10_1_files
    folder = tmp_path / "c101"
    folder.mkdir()
    for name, body in files.items():
        (folder / name).write_bytes(body)
    sha = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    monkeypatch.setitem(DATASETS, "cifar10.1", DatasetEntry(
        lambda arg, **kw: cifar10_1.load(arg, **dict(kw, data_dir=folder, files=sha)), "cifar10.1", "test copy"))
    assert cli_main(["evaluate", str(trained_run), "--on", "cifar10.1", "--json", "--data-dir", str(data_dir)]) == 0
    shift = json.loads(capsys.readouterr().out)["shift"][0]
    assert shift["dataset"] == "cifar10.1" and shift["num_images"] == 50 and shift["reference_images"] == 10_000
    assert shift["gap"] == pytest.approx(shift["reference_accuracy"] - shift["accuracy"])
    lo, hi = shift["accuracy_ci95"]
    assert lo <= shift["accuracy"] <= hi and shift["gap_ci95"][0] < shift["gap"] < shift["gap_ci95"][1]
    # Wilson's interval by hand: 8 of 10 correct -> (0.4902, 0.9433)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
