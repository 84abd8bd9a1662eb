"""The download path for real: a small archive in the official layout served over HTTP on 127.0.0.1."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from cifarlab.data import cifar10 as D
from cifarlab.data.cifar10 import fetch_cifar10
from cifarlab.errors import DataError
from conftest import serve

RECORDS = 20  # per batch file: enough to check shapes and labels, small enough to be instant


def _small_archive(data_dir: Path) -> tuple[bytes, dict[str, str]]:
    """cifar-10-binary.tar.gz with the official member names, each batch cut to RECORDS real records."""
    files = {name: (data_dir / name).read_bytes()[: RECORDS * D.RECORD_BYTES] for name in D.TRAIN_FILES + D.TEST_FILES}
    files[D.META_FILE] = (data_dir / D.META_FILE).read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folder = tarfile.TarInfo(D.BIN_DIRNAME)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{D.BIN_DIRNAME}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue(), {name: hashlib.md5(payload).hexdigest() for name, payload in files.items()}


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_verify_extract_and_load(data_dir, tmp_path):
    archive, md5s = _small_archive(data_dir)
    cache = tmp_path / "cache"
    with serve(archive) as (url, handler):
        root = fetch_cifar10(cache, url, progress=False, expected_md5=hashlib.md5(archive).hexdigest(), file_md5=md5s)
        assert handler.requests == 1
        # A second call finds the unpacked folder and downloads nothing.
        assert fetch_cifar10(cache, url, progress=False, expected_md5=hashlib.md5(archive).hexdigest(),
                             file_md5=md5s) == root
        assert handler.requests == 1
    assert root == cache / D.BIN_DIRNAME
    assert _leftovers(cache) == [D.BIN_DIRNAME, "cifar-10-binary.tar.gz"]  # no .part, no .extract-* folders
    loaded = D.load_cifar10(root, verify=False)
    assert loaded.train.images.shape == (5 * RECORDS, 3, 32, 32)
    assert loaded.test.labels.tolist() == D.read_bin(data_dir / "test_batch.bin")[1][:RECORDS].tolist()


def test_corrupted_archive_leaves_nothing_in_the_cache(data_dir, tmp_path):
    archive, md5s = _small_archive(data_dir)
    expected = hashlib.md5(archive).hexdigest()
    corrupted = bytearray(archive)
    corrupted[len(corrupted) // 2] ^= 0xFF
    cache = tmp_path / "cache"
    with serve(bytes(corrupted)) as (url, _):
        with pytest.raises(DataError, match=f"md5 of the download is .*expected {expected}.*Nothing was extracted"):
            fetch_cifar10(cache, url, progress=False, expected_md5=expected, file_md5=md5s)
    assert _leftovers(cache) == []


def test_truncated_archive_leaves_nothing_in_the_cache(data_dir, tmp_path):
    archive, md5s = _small_archive(data_dir)
    expected = hashlib.md5(archive).hexdigest()
    cache = tmp_path / "cache"
    # The server announces the full length and then stops early: the client must notice.
    with serve(archive[: len(archive) // 3], declared_length=len(archive)) as (url, _):
        with pytest.raises(DataError, match="stopped after|md5 of the download"):
            fetch_cifar10(cache, url, progress=False, expected_md5=expected, file_md5=md5s)
    assert _leftovers(cache) == []
    # A truncated body with an honest length is caught by the checksum.
    with serve(archive[: len(archive) // 3]) as (url, _):
        with pytest.raises(DataError, match="md5 of the download"):
            fetch_cifar10(cache, url, progress=False, expected_md5=expected, file_md5=md5s)
    assert _leftovers(cache) == []


def test_archive_with_a_damaged_member_is_not_moved_into_place(data_dir, tmp_path):
    """The archive's md5 is right (say, a mirror re-packed it) but a member's md5 is not the official one."""
    archive, md5s = _small_archive(data_dir)
    md5s["test_batch.bin"] = "0" * 32
    cache = tmp_path / "cache"
    with serve(archive) as (url, _):
        with pytest.raises(DataError, match=r"test_batch\.bin: md5 is .* expected 0{32}"):
            fetch_cifar10(cache, url, progress=False, expected_md5=hashlib.md5(archive).hexdigest(), file_md5=md5s)
    assert _leftovers(cache) == []


def test_default_pipeline_refuses_an_unofficial_archive(data_dir, tmp_path, monkeypatch):
    """Through the normal resolution path (CIFARLAB_URL set, empty cache) the official md5 is required."""
    archive, _ = _small_archive(data_dir)
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    with serve(archive) as (url, _):
        monkeypatch.setenv("CIFARLAB_URL", url)
        with pytest.raises(DataError, match=D.ARCHIVE_MD5):
            D.load_cifar10(None, progress=False)
    assert _leftovers(tmp_path / "cache") == []


def test_unreachable_server_gives_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        fetch_cifar10(tmp_path / "cache", "http://127.0.0.1:9/cifar-10-binary.tar.gz", progress=False)
