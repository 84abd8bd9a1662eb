"""Reading the real CIFAR-10 binary files: checksums, shapes, labels, class counts, errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab.data import base, holdout_split
from cifarlab.data import cifar10 as D
from cifarlab.errors import DataError


def test_every_real_file_matches_md5sums(data_dir):
    listed = dict(reversed(line.split()) for line in (data_dir / "MD5SUMS").read_text().splitlines() if line.strip())
    assert listed == D.FILE_MD5  # the constants shipped with cifarlab are the official ones
    for name, expected in listed.items():
        assert D.md5_of(data_dir / name) == expected, name


def test_shapes_dtypes_and_class_counts(cifar):
    assert cifar.train.images.shape == (50_000, 3, 32, 32) and cifar.train.images.dtype == torch.uint8
    assert cifar.test.images.shape == (10_000, 3, 32, 32) and cifar.test.images.dtype == torch.uint8
    assert cifar.train.labels.dtype == torch.int64
    assert torch.bincount(cifar.train.labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(cifar.test.labels, minlength=10).tolist() == [1000] * 10
    assert cifar.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_record_layout_label_then_rgb_planes(data_dir, cifar):
    """Decode the first record of test_batch.bin by hand: 1 label byte, then R, G, B planes row-major."""
    raw = (data_dir / "test_batch.bin").read_bytes()[: D.RECORD_BYTES]
    assert cifar.test.labels[0].item() == raw[0] == 3  # the first test image is a cat
    red, green, blue = (np.frombuffer(raw[1 + k * 1024: 1 + (k + 1) * 1024], np.uint8).reshape(32, 32) for k in range(3))
    assert np.array_equal(cifar.test.images[0, 0].numpy(), red)
    assert np.array_equal(cifar.test.images[0, 2].numpy(), blue)
    assert np.array_equal(cifar.test.images[0, 1, 5].numpy(), green[5])


def test_normalization_constants_match_the_data(cifar):
    x = cifar.train.images.double() / 255
    assert x.mean(dim=(0, 2, 3)).tolist() == pytest.approx(D.CIFAR10_MEAN, abs=1e-6)
    assert x.std(dim=(0, 2, 3)).tolist() == pytest.approx(D.CIFAR10_STD, abs=1e-5)


def test_parse_records_rejects_truncated_and_bad_labels():
    good = bytes([3]) + bytes(3072)
    images, labels = D.parse_records(good * 2)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 3]
    with pytest.raises(DataError, match=r"x\.bin: 6,145 bytes is not a whole number of 3073-byte"):
        D.parse_records(good + good[:-1], "x.bin")
    with pytest.raises(DataError, match="record 1 has label 12, expected 0..9"):
        D.parse_records(good + bytes([12]) + bytes(3072), "y.bin")
    with pytest.raises(DataError, match="0 bytes"):
        D.parse_records(b"", "empty.bin")


def _copy_test_batch(data_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    shutil.copy(data_dir / "test_batch.bin", dest / "test_batch.bin")
    return dest


def test_verify_names_an_altered_file(data_dir, tmp_path):
    folder = _copy_test_batch(data_dir, tmp_path / "copy")
    target = folder / "test_batch.bin"
    with open(target, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError) as err:
        D.verify_folder(folder, {"test_batch.bin": D.FILE_MD5["test_batch.bin"]})
    message = str(err.value)
    assert str(target) in message and D.FILE_MD5["test_batch.bin"] in message and "download" in message


def test_verify_names_a_truncated_file_and_reader_refuses_it(data_dir, tmp_path):
    folder = _copy_test_batch(data_dir, tmp_path / "copy")
    target = folder / "test_batch.bin"
    with open(target, "r+b") as f:
        f.truncate(30_000)
    with pytest.raises(DataError, match="md5 is"):
        D.verify_folder(folder, {"test_batch.bin": D.FILE_MD5["test_batch.bin"]})
    with pytest.raises(DataError, match="not a whole number"):
        D.read_bin(target)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data_batch_1\.bin: file is missing"):
        D.verify_folder(tmp_path, {"data_batch_1.bin": "0" * 32})


def test_verification_is_remembered(data_dir, monkeypatch):
    D.verify_folder(data_dir)  # hashes (or finds the stamp from an earlier test)

    def no_hashing(path, *a, **k):
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(base, "md5_of", no_hashing)
    D.verify_folder(data_dir)  # every file is remembered: nothing is hashed again


def test_resolution_order(data_dir, tmp_path, monkeypatch):
    assert D.resolve_data_dir(data_dir, download=False) == data_dir
    assert D.resolve_data_dir(data_dir.parent, download=False) == data_dir  # the parent folder works too
    monkeypatch.setenv("CIFARLAB_DATA", str(data_dir))
    assert D.resolve_data_dir(None, download=False) == data_dir
    monkeypatch.delenv("CIFARLAB_DATA")
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        D.resolve_data_dir(None, download=False)
    with pytest.raises(DataError, match="no such file or folder"):
        D.resolve_data_dir(tmp_path / "nope", download=False)
    with pytest.raises(DataError, match="no CIFAR-10 files there"):
        D.resolve_data_dir(tmp_path, download=False)


def test_holdout_split_is_disjoint_and_seeded(cifar):
    train, val = holdout_split(cifar.train, 5000, seed=1)
    assert len(train) == 45_000 and len(val) == 5000
    again_train, again_val = holdout_split(cifar.train, 5000, seed=1)
    assert torch.equal(val.labels, again_val.labels) and torch.equal(val.images[:10], again_val.images[:10])
    with pytest.raises(ValueError):
        holdout_split(cifar.train, 0)
