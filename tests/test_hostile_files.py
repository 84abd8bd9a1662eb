"""Files that cannot hurt: pickle checkpoints, CIFAR-10's python version, archives, downloads,
architecture declarations and command-line values, each tried with a really hostile input.

Every code-execution payload tries to create a marker file; the marker must never appear.
"""
from __future__ import annotations

import builtins
import codecs
import hashlib
import http.server
import io
import json
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab import checkpoints as ckpts
from cifarlab.data import download
from cifarlab.data.cifar10 import ARCHIVE as CIFAR10_ARCHIVE, fetch_cifar10
from cifarlab.cli import main as cli_main
from cifarlab.data.cifar10 import load_cifar10, parse_records, resolve_data_dir
from cifarlab.errors import CheckpointError, DataError, DeclarationError
from cifarlab.models import load_declaration_file, validate
from cifarlab.data.safe_pickle import read_python_batch, safe_load


class Reduce:
    """Pickles as ``func(*args)``: what an attacker puts in a pickle."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload ran"


def _payloads(marker: Path) -> dict:
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os.system": Reduce(os.system, f"touch {marker}"),
        "builtins.exec": Reduce(builtins.exec, code),
        "builtins.eval": Reduce(builtins.eval, f"exec({code!r})"),
        "subprocess.Popen": Reduce(subprocess.Popen, ["touch", str(marker)]),
        "bound method Path.touch": Reduce(marker.touch),
        "numpy open_memmap (writes a file)": Reduce(np.lib.format.open_memmap, str(marker), "w+", "u1", (1,)),
    }


# ---------------------------------------------------------------------------------------------------
# PyTorch pickle checkpoints


def _evil_checkpoints(tmp_path: Path, marker: Path) -> list[Path]:
    files = []
    for name, payload in _payloads(marker).items():
        plain = tmp_path / f"{name.split()[0]}.pt"
        plain.write_bytes(pickle.dumps({"state_dict": {"w": payload}}, protocol=2))
        zipped = tmp_path / f"{name.split()[0]}.pth"
        torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": payload}, zipped)
        files += [plain, zipped]
    return files


def test_pickle_checkpoints_are_refused_and_never_executed(tmp_path, marker):
    for path in _evil_checkpoints(tmp_path, marker):
        with pytest.raises(CheckpointError, match="PyTorch pickle checkpoints can run code when loaded, so cifarlab "
                                                  "refuses them"):
            ckpts.load_checkpoint(path)
        with pytest.raises(CheckpointError, match="refuses them"):
            ckpts.load_pickle_weights(path)
        with pytest.raises(CheckpointError, match="a pickle file holds no cifarlab metadata"):
            ckpts.load_checkpoint(path, allow_pickle=True)
        # Explicitly allowed: torch.load(weights_only=True) meets the payload's global and refuses it.
        with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\): UnpicklingError"):
            ckpts.load_pickle_weights(path, allow_pickle=True)
        assert not marker.exists()


def test_allowed_pickle_of_plain_tensors_still_loads(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}}, path)
    weights = ckpts.load_pickle_weights(path, allow_pickle=True)
    assert torch.equal(weights["w"], torch.arange(6.0).reshape(2, 3))


def test_a_pickle_disguised_as_safetensors_is_never_unpickled(tmp_path, marker):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ckpts.MODEL_FILE).write_bytes(pickle.dumps(_payloads(marker)["os.system"]))
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(_payloads(marker)["builtins.exec"]))
    for path in (folder, tmp_path / "model.safetensors"):
        with pytest.raises(CheckpointError, match="not a valid safetensors file"):
            ckpts.load_checkpoint(path)


def test_cli_evaluate_refuses_a_pickle_checkpoint_even_with_allow_pickle(tmp_path, marker, capsys):
    path = _evil_checkpoints(tmp_path, marker)[0]
    assert cli_main(["evaluate", str(path)]) == 2
    assert "error: " in capsys.readouterr().err
    assert cli_main(["evaluate", str(path), "--allow-pickle"]) == 2
    assert "a pickle file holds no cifarlab metadata" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# CIFAR-10's python version


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official cifar-10-batches-py: protocol 2, every
    str as BINSTRING (read back as bytes with encoding='bytes'), numpy 1.x module names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _dump(obj, fmt: str) -> bytes:
    if fmt == "python2-cPickle":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    return pickle.dumps(obj, protocol=int(fmt.split("-")[1]))


PER_BATCH = 20


def _real_records(data_dir: Path) -> dict:
    """The first 20 raw records of every real binary batch (the bytes) and the parsed arrays."""
    records = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        with open(data_dir / f"{name}.bin", "rb") as f:
            raw = f.read(PER_BATCH * 3073)
        records[name] = (raw, *parse_records(raw))
    return records


def _write_python_version(data_dir: Path, root: Path, fmt: str) -> tuple[Path, dict]:
    """A cifar-10-batches-py folder holding real records, converted from the binary version."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    records = _real_records(data_dir)
    for name, (raw, images, labels) in records.items():
        rows = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
        batch = {"batch_label": f"{name} (real records)", "labels": [int(v) for v in rows[:, 0]],
                 "data": rows[:, 1:].copy(), "filenames": [f"img_{j}.png" for j in range(len(rows))]}
        if fmt != "python2-cPickle":  # Python 3 writers use bytes keys, as the official files read back
            batch = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in batch.items()}
            batch[b"filenames"] = [f.encode() for f in batch[b"filenames"]]
        (folder / name).write_bytes(_dump(batch, fmt))
    names = (data_dir / "batches.meta.txt").read_text().split()
    meta = {"num_cases_per_batch": PER_BATCH, "label_names": names, "num_vis": 3072}
    if fmt != "python2-cPickle":
        meta = {b"num_cases_per_batch": PER_BATCH, b"label_names": [n.encode() for n in names], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(_dump(meta, fmt))
    return folder, records


@pytest.mark.parametrize("fmt", ["python2-cPickle", "protocol-2", "protocol-4", "protocol-5"])
def test_python_version_of_real_records_loads_identically_to_the_binary_version(data_dir, tmp_path, fmt):
    folder, records = _write_python_version(data_dir, tmp_path, fmt)
    if fmt == "python2-cPickle":  # the same opcodes as the official files
        assert (folder / "data_batch_1").read_bytes().startswith(b"\x80\x02}q\x00(U\x0bbatch_label") or \
            b"cnumpy.core.multiarray\n_reconstruct\n" in (folder / "data_batch_1").read_bytes()
    data = load_cifar10(folder, verify=False)  # not the official files: the parser, not the md5s, is tested
    train_images = np.concatenate([records[f"data_batch_{i}"][1] for i in range(1, 6)])
    train_labels = np.concatenate([records[f"data_batch_{i}"][2] for i in range(1, 6)])
    assert np.array_equal(data.train.images.numpy(), train_images)
    assert np.array_equal(data.train.labels.numpy(), train_labels)
    assert np.array_equal(data.test.images.numpy(), records["test_batch"][1])
    assert np.array_equal(data.test.labels.numpy(), records["test_batch"][2])
    assert data.classes == (data_dir / "batches.meta.txt").read_text().split()
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64


def _good_batch(n: int = 3) -> dict:
    return {b"batch_label": b"x", b"labels": [1] * n, b"data": np.zeros((n, 3072), np.uint8),
            b"filenames": [b"a.png"] * n}


def test_malicious_python_batches_are_refused_and_nothing_runs(data_dir, tmp_path, marker):
    folder, _ = _write_python_version(data_dir, tmp_path, "protocol-4")
    for name, payload in _payloads(marker).items():
        batches = {"as the batch": payload, "hidden in the labels": {**_good_batch(), b"labels": [0, 1, payload]},
                   "as the data": {**_good_batch(), b"data": payload}}
        for where, batch in batches.items():
            for protocol in (0, 2, 4):
                (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=protocol))
                with pytest.raises(DataError, match=r"data_batch_3: refusing to unpickle .*CIFAR-10's python version "
                                                    r"only holds plain containers and numpy arrays"):
                    load_cifar10(folder, verify=False)
                assert not marker.exists(), (name, where, protocol)


def test_hand_written_pickles_with_inst_and_persistent_ids_are_refused(tmp_path, marker):
    cases = {
        "INST os.system": b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.",
        "GLOBAL posix.system": b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        "persistent id": b"\x80\x02U\x04evilQ.",
    }
    for name, raw in cases.items():
        path = tmp_path / "batch"
        path.write_bytes(raw)
        with pytest.raises(DataError, match="refusing"):
            safe_load(path)


ABUSE_SCRIPT = r'''
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
from cifarlab.data.safe_pickle import read_python_batch
out = {}
for path in sys.argv[1:]:
    try:
        x, y = read_python_batch(path)
        out[path] = f"LOADED {x.shape}"
    except Exception as e:
        out[path] = f"{type(e).__name__}: {e}"
# Peak RSS of this process image: VmHWM starts afresh at exec, whereas ru_maxrss on Linux keeps the
# (possibly GB-sized) peak of the pytest process this one was forked from.
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
out["maxrss_mb"] = hwm_kb // 1024
print(json.dumps(out))
'''


def test_allowed_numpy_globals_cannot_be_abused_for_memory_bombs_or_crashes(tmp_path):
    """A restricted unpickler that hands out numpy's real constructors is not safe: these tiny files
    made the previous version allocate 3 GB and touch all of it (a 129-byte file), or segfault in
    ndarray.__setstate__. They run in a child process so a regression cannot take pytest down."""
    reconstruct = np._core.multiarray._reconstruct
    rows = 1_000_000  # 3 GB of uint8
    cases = {
        "reconstruct-bomb": {b"data": Reduce(reconstruct, np.ndarray, (rows, 3072), b"B"),
                             b"labels": Reduce(reconstruct, np.ndarray, (rows,), b"B")},
        "ndarray-called": {b"data": Reduce(np.ndarray, (rows, 3072), "u1"), b"labels": [0]},
        "object-array-setstate": {b"data": Reduce(reconstruct, np.ndarray, (0,), b"b",
                                                  state=(1, (10 ** 6,), np.dtype("O"), False, [1])), b"labels": [0]},
        "short-raw-data": {b"data": Reduce(reconstruct, np.ndarray, (0,), b"b",
                                           state=(1, (rows, 3072), np.dtype("u1"), False, b"abc")), b"labels": [0]},
        "bytes-bomb": {b"data": Reduce(bytes, 10 ** 11), b"labels": [0]},
        "codecs-other-codec": {b"data": Reduce(codecs.encode, "x" * 10, "rot13"), b"labels": [0]},
        "scalar-huge-dtype": {b"data": Reduce(np._core.multiarray.scalar, np.dtype("V100000000"), b"x"),
                              b"labels": [0]},
        "frombuffer-wrong-size": {b"data": Reduce(np._core.numeric._frombuffer, b"abc", np.dtype("u1"),
                                                  (10 ** 9,), "C"), b"labels": [0]},
        "structured-dtype": {b"data": np.zeros((1, 3072), dtype=[("a", "u1")]), b"labels": [0]},
    }
    paths = []
    for name, batch in cases.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(pickle.dumps(batch, protocol=4))
    assert paths[0].stat().st_size < 200
    proc = subprocess.run([sys.executable, "-c", ABUSE_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"the loader crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout)
    for path in paths:
        assert results[str(path)].startswith("DataError: ") and "refusing" in results[str(path)], \
            (path.name, results[str(path)])
    assert results["maxrss_mb"] < 1024, results


@pytest.mark.parametrize("content, words", [
    (b"", "not a readable CIFAR-10 python batch (EOFError"),
    (os.urandom(64), "not a readable CIFAR-10 python batch"),
    (pickle.dumps(_good_batch())[:-20], "not a readable CIFAR-10 python batch"),
    (pickle.dumps([1, 2, 3]), "expected a dict, found list; not a CIFAR-10 python batch."),
    (pickle.dumps({b"labels": [1]}), "missing the 'data' entry of a CIFAR-10 python batch."),
    (pickle.dumps({**_good_batch(), b"data": np.zeros((3, 3072), np.float32)}),
     "'data' must be a uint8 array of shape (N, 3072) with N >= 1, found float32 (3, 3072)."),
    (pickle.dumps({**_good_batch(), b"data": np.zeros((0, 3072), np.uint8), b"labels": []}),
     "'data' must be a uint8 array of shape (N, 3072) with N >= 1, found uint8 (0, 3072)."),
    (pickle.dumps({**_good_batch(), b"labels": [1, 2, 10]}),
     "'labels' must be a list of 3 integers in 0..9, found list of length 3."),
    (pickle.dumps({**_good_batch(), b"labels": [1, 2]}),
     "'labels' must be a list of 3 integers in 0..9, found list of length 2."),
    (pickle.dumps({**_good_batch(), b"labels": [1, 2, 10 ** 30]}), "'labels' must be a list of 3 integers"),
    (pickle.dumps({**_good_batch(), b"labels": np.array([1, -1, 2])}), "'labels' must be a list of 3 integers"),
], ids=["empty", "random", "truncated", "list", "no-data", "float-data", "zero-images", "label-10",
        "labels-short", "label-huge", "label-negative"])
def test_malformed_python_batches_are_clear_data_errors(tmp_path, content, words):
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_python_batch(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_oversized_python_batch_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        f.truncate(201 << 20)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"data_batch_1: 210,763,776 bytes is too large for a CIFAR-10 batch file\."):
            safe_load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_fifo_instead_of_a_batch_file_does_not_hang(tmp_path):
    path = tmp_path / "data_batch_1"
    os.mkfifo(path)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("e", _catch(safe_load, path)), daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # unblock the reader before failing
        os.close(os.open(path, os.O_WRONLY))
        pytest.fail("safe_load blocked reading a FIFO")
    assert isinstance(result["e"], DataError) and "not a regular file" in str(result["e"])


def _catch(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        return e
    return None


# ---------------------------------------------------------------------------------------------------
# Archives


def _info(name: str, kind=tarfile.REGTYPE, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


class _Zeros(io.RawIOBase):
    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | int | None]]) -> Path:
    """A .tar.gz with exactly these members; content is bytes, or an int for that many zero bytes."""
    with tarfile.open(path, "w:gz", compresslevel=1, format=tarfile.GNU_FORMAT) as tar:
        for info, content in members:
            if isinstance(content, int):
                info.size = content
                tar.addfile(info, io.BufferedReader(_Zeros(content), 1 << 20))
            elif content is not None:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    return path


def _header_bomb(path: Path, kind: bytes, size: int) -> Path:
    """A tar.gz whose first header is a pax / GNU long-name record claiming ``size`` bytes of zeros."""
    header = _info("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "././@PaxHeader", kind, size)
    co = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [co.compress(header.tobuf(format=tarfile.USTAR_FORMAT if kind != tarfile.GNUTYPE_LONGNAME
                                      else tarfile.GNU_FORMAT))]
    block = bytes(1 << 20)
    for _ in range(size >> 20):
        parts.append(co.compress(block))
    parts += [co.compress(bytes(2048)), co.flush()]
    path.write_bytes(b"".join(parts))
    return path


B = "cifar-10-batches-bin/"


def _hostile_archives(root: Path, outside: Path) -> dict[str, tuple[Path, str]]:
    d = _info(B[:-1], tarfile.DIRTYPE)
    ok = (_info(B + "data_batch_1.bin"), b"harmless")
    return {
        "absolute path": (_archive(root / "abs.tar.gz", [(d, None), ok, (_info(str(outside / "abs.txt")), b"x")]),
                          "an absolute path"),
        "dot-dot": (_archive(root / "dotdot.tar.gz", [(d, None), (_info(B + "../../escape.txt"), b"x")]),
                    "a '..' component"),
        "windows drive": (_archive(root / "drive.tar.gz", [(_info("C:\\evil.txt"), b"x")]), "an absolute path"),
        "symlink, then a file through it": (_archive(root / "sym.tar.gz", [
            (d, None), (_info(B + "link", tarfile.SYMTYPE, linkname=str(outside)), None),
            (_info(B + "link/pwned.txt"), b"x")]), "a link (to "),
        "hard link": (_archive(root / "hard.tar.gz", [(d, None), (_info(B + "passwd", tarfile.LNKTYPE,
                                                                        linkname="/etc/passwd"), None)]), "a link"),
        "character device": (_archive(root / "chr.tar.gz", [(_info(B + "null", tarfile.CHRTYPE), None)]),
                             "a device or FIFO"),
        "block device": (_archive(root / "blk.tar.gz", [(_info(B + "sda", tarfile.BLKTYPE), None)]),
                         "a device or FIFO"),
        "fifo": (_archive(root / "fifo.tar.gz", [(_info(B + "pipe", tarfile.FIFOTYPE), None)]), "a device or FIFO"),
        "oversized member": (_archive(root / "big.tar.gz", [(d, None), (_info(B + "data_batch_1.bin"),
                                                                        download.MAX_MEMBER_BYTES + 1)]),
                             f"{download.MAX_MEMBER_BYTES + 1:,} bytes, more than the {download.MAX_MEMBER_BYTES:,} "
                             f"any dataset file here needs"),
        "members add up too much": (_archive(root / "total.tar.gz", [(d, None)] + [
            (_info(B + f"data_batch_{i}.bin"), 60 << 20) for i in range(5)]),
            "members add up to more than 268,435,456 bytes"),
        "too many members": (_archive(root / "many.tar.gz", [(_info(B + f"f{i}"), b"") for i in range(1000)]),
                             "more than 64 members; the CIFAR archives have 6-9"),
        "pax header bomb": (_header_bomb(root / "pax.tar.gz", tarfile.XHDTYPE, 300 << 20),
                            "a tar header or record asks to read 314,572,800 bytes at once"),
        "GNU long-name bomb": (_header_bomb(root / "longname.tar.gz", tarfile.GNUTYPE_LONGNAME, 300 << 20),
                               "a tar header or record asks to read 314,572,800 bytes at once"),
        "garbage": (root / "garbage.tar.gz", "not a readable .tar.gz archive"),
    }


def test_hostile_archives_are_refused_before_anything_is_written(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "garbage.tar.gz").write_bytes(os.urandom(4096))
    archives = _hostile_archives(tmp_path, outside)
    tracemalloc.start()
    try:
        for name, (archive, words) in archives.items():
            dest = tmp_path / "dest" / archive.stem
            dest.mkdir(parents=True)
            with pytest.raises(DataError) as info:
                download.safe_extract(archive, dest)
            assert str(archive) in str(info.value) and words in str(info.value), (name, str(info.value))
            assert not any(dest.iterdir()), f"{name}: something was written before the refusal"
            cache = tmp_path / "cache" / archive.stem
            with pytest.raises(DataError) as info:
                download.extract_archive_into_cache(archive, cache, CIFAR10_ARCHIVE, check_md5=False)
            assert words in str(info.value), (name, str(info.value))
            assert list(cache.iterdir()) == [], f"{name}: the cache is not empty"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(outside.iterdir()) == [] and not (tmp_path / "escape.txt").exists()
    assert peak < 64 << 20, f"screening the archives took {peak / 2 ** 20:.0f} MiB"  # bombs are not read in


def test_a_file_where_a_folder_should_be_is_a_data_error_and_leaves_no_trace(tmp_path):
    archive = _archive(tmp_path / "shadow.tar.gz", [(_info(B[:-1]), b"a file"), (_info(B + "data_batch_1.bin"),
                                                                               b"x")])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="could not be extracted"):
        download.extract_archive_into_cache(archive, cache, CIFAR10_ARCHIVE, check_md5=False)
    assert list(cache.iterdir()) == []


def test_truncated_archive_is_refused(tmp_path):
    good = _archive(tmp_path / "good.tar.gz", [(_info(B[:-1], tarfile.DIRTYPE), None),
                                               (_info(B + "data_batch_1.bin"), os.urandom(200_000))])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or damaged"):
        download.safe_extract(cut, tmp_path / "dest")


def test_hostile_archive_given_as_data_dir_is_refused_by_the_cli(tmp_path, capsys, marker):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive, _ = _hostile_archives(tmp_path, outside)["symlink, then a file through it"]
    named = tmp_path / "cifar-10-binary.tar.gz"
    archive.rename(named)
    assert cli_main(["data", "--data-dir", str(named)]) == 2
    err = capsys.readouterr().err
    # An archive given by the user must be the official one: its md5 is checked before anything is opened.
    assert err.startswith("error: ") and "md5 differs from the official CIFAR-10 archive" in err
    assert list(outside.iterdir()) == []
    with pytest.raises(DataError):
        resolve_data_dir(named)


# Downloads from a real HTTP server on 127.0.0.1 --------------------------------------------------


class _Server:
    """Serves ``routes[path] = (status, headers, body, behaviour)`` on a loopback port."""

    def __init__(self, routes: dict):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits.append(self.path)
                status, headers, body, behaviour = routes.get(self.path, (404, {}, b"not here", None))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers and "Transfer-Encoding" not in headers and behaviour != "endless":
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if behaviour == "chunked-cut":
                    self.wfile.write(b"%x\r\n" % len(body) + body[: len(body) // 2])
                elif behaviour == "reset":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif behaviour == "stall":
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    time.sleep(3)
                elif behaviour == "endless":
                    try:
                        for _ in range(4096):
                            self.wfile.write(bytes(1 << 16))
                    except OSError:
                        pass
                else:
                    self.wfile.write(body)
                self.close_connection = True

        self.hits: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _tiny_cifar_archive(path: Path) -> tuple[Path, dict]:
    files = {f"data_batch_{i}.bin": os.urandom(3073 * 2) for i in range(1, 6)}
    files["test_batch.bin"] = os.urandom(3073)
    files["batches.meta.txt"] = b"\n".join(b"c%d" % i for i in range(10))
    members = [(_info(B[:-1], tarfile.DIRTYPE), None)] + [(_info(B + k), v) for k, v in files.items()]
    return _archive(path, members), {k: hashlib.md5(v).hexdigest() for k, v in files.items()}


@pytest.fixture
def server_and_archives(tmp_path):
    good, file_md5 = _tiny_cifar_archive(tmp_path / "good.tar.gz")
    body = good.read_bytes()
    corrupt = bytearray(body)
    corrupt[len(corrupt) // 2] ^= 1
    evil = _archive(tmp_path / "evil.tar.gz", [(_info(B + "../../../escape.txt"), b"pwned")]).read_bytes()
    server = _Server({
        "/good.tar.gz": (200, {}, body, None),
        "/corrupt.tar.gz": (200, {}, bytes(corrupt), None),
        "/evil.tar.gz": (200, {}, evil, None),
        "/short.tar.gz": (200, {"Content-Length": str(len(body))}, body[: len(body) // 2], None),
        "/chunked-cut.tar.gz": (200, {"Transfer-Encoding": "chunked"}, body, "chunked-cut"),
        "/reset.tar.gz": (200, {"Content-Length": str(len(body))}, body, "reset"),
        "/stall.tar.gz": (200, {"Content-Length": str(len(body))}, body, "stall"),
        "/huge.tar.gz": (200, {"Content-Length": str(10 ** 12)}, b"", None),
        "/endless.tar.gz": (200, {}, b"", "endless"),
        "/bad-length.tar.gz": (200, {"Content-Length": "many"}, body, None),
    })
    yield server, hashlib.md5(body).hexdigest(), file_md5
    server.close()


def test_download_from_loopback_control_case_works(server_and_archives, tmp_path):
    server, md5, file_md5 = server_and_archives
    folder = fetch_cifar10(tmp_path / "cache", server.url + "/good.tar.gz", progress=False,
                                    expected_md5=md5, file_md5=file_md5)
    assert sorted(p.name for p in folder.iterdir()) == sorted(file_md5)


@pytest.mark.parametrize("route, words", [
    ("/corrupt.tar.gz", "md5 of the download is"),
    ("/evil.tar.gz", "md5 of the download is"),
    ("/short.tar.gz", "stopped after"),
    ("/chunked-cut.tar.gz", "failed after"),
    ("/reset.tar.gz", "(failed|stopped) after"),
    ("/stall.tar.gz", "failed after"),
    ("/huge.tar.gz", "the server announces 1,000,000,000,000 bytes"),
    ("/endless.tar.gz", "more than 1,048,576 bytes"),
    ("/missing.tar.gz", "could not download"),
])
def test_bad_downloads_are_data_errors_and_nothing_is_extracted(server_and_archives, tmp_path, monkeypatch, route,
                                                               words):
    server, md5, file_md5 = server_and_archives
    extracted = []
    monkeypatch.setattr(download, "safe_extract", lambda *a: extracted.append(a))
    monkeypatch.setattr(download, "MAX_DOWNLOAD_BYTES", 1 << 20)
    real = download.download_file
    monkeypatch.setattr(download, "download_file", lambda *a, **k: real(*a, **dict(k, timeout=1.0)))
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        fetch_cifar10(cache, server.url + route, progress=False, expected_md5=md5, file_md5=file_md5)
    assert re.search(words, str(info.value)), str(info.value)
    assert extracted == [], "extraction started before the checksum was verified"
    assert list(cache.iterdir()) == [], "a partial or unverified download was left in the cache"
    assert not (tmp_path.parent / "escape.txt").exists()


def test_a_non_numeric_content_length_is_not_a_crash(server_and_archives, tmp_path):
    server, md5, file_md5 = server_and_archives
    folder = fetch_cifar10(tmp_path / "cache", server.url + "/bad-length.tar.gz", progress=False,
                                    expected_md5=md5, file_md5=file_md5)
    assert folder.is_dir()


# ---------------------------------------------------------------------------------------------------
# Architecture declarations


def _net(*layers) -> dict:
    return {"name": "hostile", "layers": [*layers, {"type": "flatten"}, {"type": "dense", "units": 10}]}


@pytest.mark.parametrize("decl, message", [
    (_net({"type": "conv", "filters": 10 ** 12}),
     "layer 0 'conv_1' (conv): 'filters' = 1000000000000 is outside 1..8192"),
    (_net({"type": "conv", "filters": 10 ** 9}), "layer 0 'conv_1' (conv): 'filters' = 1000000000 is outside 1..8192"),
    (_net({"type": "conv", "filters": -3}), "layer 0 'conv_1' (conv): 'filters' = -3 is outside 1..8192"),
    (_net({"type": "conv", "filters": 0}), "layer 0 'conv_1' (conv): 'filters' = 0 is outside 1..8192"),
    (_net({"type": "conv", "filters": 3.5}), "layer 0 'conv_1' (conv): 'filters' must be int, not float 3.5"),
    (_net({"type": "conv", "filters": "32"}), "layer 0 'conv_1' (conv): 'filters' must be int, not str '32'"),
    (_net({"type": "conv", "filters": True}), "layer 0 'conv_1' (conv): 'filters' must be a number, not True"),
    (_net({"type": "conv", "filters": 8, "kernel": 10 ** 6}),
     "layer 0 'conv_1' (conv): 'kernel' = 1000000 is outside 1..32"),
    (_net({"type": "conv", "filters": 8, "stride": 0}), "layer 0 'conv_1' (conv): 'stride' = 0 is outside 1..32"),
    (_net({"type": "conv", "filters": 8, "padding": -1}),
     "'padding' must be 'same', 'valid' or 0..32"),
    (_net({"type": "conv", "filters": 8, "padding": "evil"}), "'padding' must be 'same', 'valid' or 0..32"),
    (_net({"type": "dropout", "rate": float("nan")}), "layer 0 'dropout_1' (dropout): 'rate' must be finite, not nan"),
    (_net({"type": "scale", "factor": float("inf")}), "layer 0 'scale_1' (scale): 'factor' must be finite, not inf"),
    (_net({"type": "batchnorm", "eps": -1.0}), "layer 0 'batchnorm_1' (batchnorm): 'eps' = -1.0 is outside 0..1"),
    (_net({"type": "conv", "filters": 8, "evil": 1}),
     "layer 0 'conv_1' (conv): unknown key(s) ['evil']; allowed: ['bias', 'filters', 'kernel', 'padding', 'stride']"),
    (_net({"type": "exec"}), "layer 0: unknown type 'exec'; known types: conv, whiten, dense"),
    (_net({"type": "conv", "filters": 8, "name": "__import__('os')"}),
     "layer 0: name \"__import__('os')\" must be a unique identifier"),
    (_net({"type": "relu", "name": "a" * 65}), "must be a unique identifier"),
    (dict(_net(), evil=1), "unknown top-level key(s) ['evil']"),
    (dict(_net(), init="eval"), "'init' must be one of glorot, torch, identity, not 'eval'"),
    ({"layers": "conv"}, "'layers' must be a non-empty list of layer objects"),
    ({"layers": []}, "'layers' must be a non-empty list of layer objects"),
    ({"layers": [{"type": "relu"}] * 100_000}, "100000 layers is more than the 512 allowed"),
    ([1, 2], "a declaration must be an object with 'layers', not list"),
    ({"layers": [{"type": "conv", "filters": 8192}, {"type": "conv", "filters": 8192}]},
     "layer 1 'conv_2' (conv): the model would exceed 500,000,000 parameters"),
    ({"layers": [{"type": "conv", "filters": 8}, {"type": "flatten"}, {"type": "dense", "units": 65536},
                 {"type": "dense", "units": 65536}]}, "would exceed 500,000,000 parameters"),
    ({"layers": [{"type": "flatten"}, {"type": "dense", "units": 11}]},
     "the last layer 'dense_1' outputs (11,); expected (10,) for 10 classes"),
])
def test_hostile_declarations_are_rejected_before_any_allocation(decl, message):
    tracemalloc.start()
    try:
        with pytest.raises(DeclarationError) as info:
            validate(decl, num_classes=10)  # as for CIFAR-10
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(info.value)
    assert peak < 4 << 20, f"validation allocated {peak:,} bytes"  # a 10**9-filter conv would be 100+ GB


def _deep(n: int):
    value: list = []
    for _ in range(n):
        value = [value]
    return value


@pytest.mark.parametrize("decl", [
    _net({"type": "conv", "filters": 10 ** 400}),
    _net({"type": "scale", "factor": -(10 ** 400)}),
    _net({"type": ["conv"]}),
    _net({"type": {"a": 1}}),
    {"name": "x", "layers": [{"type": "relu"}], 1: 2, "zzz": 3},
    _net({"type": "relu", 7: 1, "q": 2}),
    {"layers": [_deep(100_000)]},
    _net({"type": "conv", "filters": None}),
    {"layers": [{"type": "flatten"}, {"type": "dense", "units": None}]},
    {"name": _deep(100_000), "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]},
], ids=["int-10**400", "factor-10**400", "type-list", "type-dict", "int-top-key", "int-layer-key", "deep-layer",
        "filters-null", "units-null", "deep-name"])
def test_hostile_declaration_values_only_ever_raise_declaration_error(decl):
    with pytest.raises(DeclarationError):
        validate(decl)


def test_a_100_mb_declaration_file_is_refused(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(100 << 20)
    with pytest.raises(DeclarationError, match=r"huge.json: a declaration over 1 MiB is not plausible"):
        load_declaration_file(path)


def test_a_100_mb_declaration_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(100 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(DeclarationError):
            load_declaration_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"read {peak / 2 ** 20:.0f} MiB to refuse it"


@pytest.mark.parametrize("suffix, text", [(".json", "[" * 200_000 + "]" * 200_000),
                                          (".toml", "a = " + "[" * 50_000 + "]" * 50_000)])
def test_a_deeply_nested_declaration_file_is_a_declaration_error(tmp_path, suffix, text):
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    with pytest.raises(DeclarationError):
        load_declaration_file(path)


def test_a_binary_declaration_file_is_a_declaration_error(tmp_path):
    path = tmp_path / "model.json"
    path.write_bytes(b"\xff\xfe" + os.urandom(64))
    with pytest.raises(DeclarationError):
        load_declaration_file(path)


def test_a_fifo_declaration_does_not_hang(tmp_path):
    path = tmp_path / "model.json"
    os.mkfifo(path)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("e", _catch(load_declaration_file, path)),
                              daemon=True)
    thread.start()
    thread.join(2)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY))  # unblock it, then fail
        thread.join(5)
        pytest.fail("load_declaration_file blocked on a FIFO")
    assert isinstance(result["e"], DeclarationError)


# ---------------------------------------------------------------------------------------------------
# Command-line values


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "argument --epochs: -1 is outside 1..10000"),
    (["--epochs", "0"], "argument --epochs: 0 is outside 1..10000"),
    (["--epochs", "1e3"], "argument --epochs: expected an integer, got '1e3'"),
    (["--batch-size", "1000000000000"], "argument --batch-size: 1000000000000 is outside 1..65536"),
    (["--batch-size", "10**12"], "argument --batch-size: expected an integer, got '10**12'"),
    (["--batch-size", "9" * 5000], "argument --batch-size: expected an integer, got '99999"),
    (["--lr", "nan"], "argument --lr: nan is outside 1e-12..100.0"),
    (["--lr", "inf"], "argument --lr: inf is outside 1e-12..100.0"),
    (["--lr", "1e309"], "argument --lr: 1e309 is outside 1e-12..100.0"),
    (["--lr", "-1"], "argument --lr: -1 is outside 1e-12..100.0"),
    (["--lr", "1000"], "argument --lr: 1000 is outside 1e-12..100.0"),
    (["--seed", "-1"], "argument --seed: -1 is outside 0..9223372036854775807"),
    (["--threads", "0"], "argument --threads: 0 is outside 1..1024"),
    (["--checkpoint-every", "-5"], "argument --checkpoint-every: -5 is outside 0..1000000000"),
    (["--translate", "17"], "argument --translate: 17 is outside 0..16"),
    (["--momentum", "1"], "argument --momentum: 1 is outside 0.0..0.999"),
    (["--weight-decay", "nan"], "argument --weight-decay: nan is outside 0.0..0.99"),
    (["--val-split", "-1"], "argument --val-split: -1 is outside 0..10000000"),
    (["--optimizer", "evil"], "argument --optimizer: invalid choice: 'evil'"),
    (["--max-steps", "0"], "argument --max-steps: 0 is outside 1..1000000000"),
])
def test_hostile_command_line_values_are_argparse_errors(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cifarlab train") and f"cifarlab train: error: {message}" in err


def test_hostile_model_file_on_the_command_line_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(_net({"type": "conv", "filters": 10 ** 12})))
    assert cli_main(["train", "--model", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}: layer 0 'conv_1' (conv): 'filters' = 1000000000000 is outside 1..8192\n")
    assert not (tmp_path / "runs").exists()


def test_a_real_cli_process_rejects_nan_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "cifarlab", "train", "--lr", "nan"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "cifarlab train: error: argument --lr: nan is outside 1e-12..100.0"
    assert "Traceback" not in proc.stderr
