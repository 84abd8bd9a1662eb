"""Run folders have one owner, and a new run never writes into someone else's.

* :func:`check_run_name`: a run name is one plain path component (no ``/``, ``..``, absolute path,
  empty name, NUL or control character, leading dot or dash), so ``--name`` never escapes ``--runs-dir``.
* :class:`RunLock`: an exclusive ``fcntl.flock`` on ``RUN_DIR/.cifarlab.lock`` held for the whole run. A
  second process gets "run folder X is in use by PID N"; the kernel drops the lock when its owner dies
  (even by SIGKILL), so a crashed run's folder is free again with nothing to clean up. The lock is
  re-entrant within a process (``run`` holds it around training, evaluation and the report).
* :func:`claim`: the lock plus the rule that a new run only starts in a missing or empty folder;
  ``resume`` is the only way into an existing run, and only into one that has something to resume.
* Resume identity: :func:`data_identity` (what data a run trained on: counts, classes, content
  checksums, and the dataset registry's own identity when it offers one) and :func:`differences`,
  which names what changed between the saved and the requested run.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import unicodedata
from pathlib import Path

from .errors import CifarlabError, short_repr

LOCK_FILE = ".cifarlab.lock"
MAX_NAME = 128
# What a run writes before its first complete checkpoint: a run killed that early may be resumed
# (it starts from scratch). Anything else in a folder without a checkpoint is someone else's.
EARLY_FILES = {LOCK_FILE, "recipe.json", "dataset.json", "model.json", "metrics.csv", "checkpoints", "tensorboard"}


class RunFolderError(CifarlabError):
    """A run folder that is in use, holds another run, or is named unsafely."""


# ---------------------------------------------------------------------------------------------------
# Names


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a single plain path component; otherwise a one-line error saying why."""
    def bad(why: str):
        raise RunFolderError(f"run name {short_repr(name, 60)} is not allowed: {why}. Use letters, digits, "
                             f"'-', '_' or '.' (for example 'fast-seed1').")

    if not isinstance(name, str) or not name:
        bad("it is empty")
    if "\x00" in name:
        bad("it contains a NUL character")
    if "/" in name or "\\" in name or name.startswith("~"):
        bad("it must be one folder name, not a path (no '/', '\\' or '~')")
    if name in (".", "..") or name.startswith("."):
        bad("it must not start with '.' (no '..', no hidden folders)")
    if name.startswith("-"):
        bad("it must not start with '-'")
    if name != name.strip():
        bad("it starts or ends with white space")
    if any(unicodedata.category(ch)[0] == "C" for ch in name):
        bad("it contains a control or invisible formatting character")
    if len(name) > MAX_NAME or len(name.encode("utf-8", "surrogatepass")) > 255:
        bad(f"it is longer than {MAX_NAME} characters")
    return name


# ---------------------------------------------------------------------------------------------------
# The lock


_HELD: dict[str, list] = {}  # realpath of the lock file -> [fd, depth] for re-entrant use in one process


class RunLock:
    """``with RunLock(run_dir):`` exclusive ownership of a run folder for the block (creates the folder)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.created: list[Path] = []  # folders this lock made (the run folder and missing parents)
        self.key: str | None = None

    def __enter__(self) -> "RunLock":
        self.created = _make_folder(self.run_dir)
        path = self.run_dir / LOCK_FILE
        self.key = os.path.realpath(path)
        held = _HELD.get(self.key)
        if held is not None:
            held[1] += 1
            return self
        fd = _acquire(path, self.run_dir)
        _HELD[self.key] = [fd, 1]
        return self

    def __exit__(self, *exc) -> None:
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[self.key]
        fd = held[0]
        try:
            # Unlinked while still locked: a process that opened the old file finds, once it holds the
            # lock, that the path no longer names its file, and starts over (see _acquire).
            os.unlink(self.run_dir / LOCK_FILE)
        except OSError:
            pass
        os.close(fd)
        for folder in reversed(self.created):  # a run that stopped before writing anything leaves no
            try:                                 # empty folder behind (nor an empty --runs-dir)
                folder.rmdir()
            except OSError:
                break


def _make_folder(run_dir: Path) -> list[Path]:
    """Create the run folder (and missing parents); return the folders created, outermost first."""
    # One stat, not is_dir() then exists(): a run starting at the same moment may create the folder
    # between two checks, and that must not read as "exists and is not a folder".
    try:
        is_folder = stat.S_ISDIR(os.stat(run_dir).st_mode)
    except FileNotFoundError:
        is_folder = None if not run_dir.is_symlink() else False  # a dangling link is not a folder
    except OSError as e:
        raise RunFolderError(f"{run_dir}: cannot read the run folder ({e.strerror or e}).") from None
    if is_folder:
        return []
    if is_folder is False:
        raise RunFolderError(f"{run_dir}: exists and is not a folder; choose another --name or --runs-dir.")
    missing = [run_dir] + [p for p in run_dir.parents if not p.exists()]
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            created.append(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise RunFolderError(f"{folder}: exists and is not a folder; choose another --name or "
                                     f"--runs-dir.") from None
            # else: made by a process starting at the same moment; the lock decides who runs
        except OSError as e:
            raise RunFolderError(f"{e.filename or folder}: cannot create the run folder ({e.strerror or e}).") \
                from None
    return created


def _acquire(path: Path, run_dir: Path) -> int:
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise RunFolderError(f"{path}: cannot create the run folder's lock file ({e.strerror or e}).") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"run folder {run_dir} is in use by {_owner(path)}; wait for it to finish "
                                     f"(or stop it), or choose another --name.") from None
            raise RunFolderError(f"{path}: cannot lock the run folder ({e.strerror or e}).") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the owner removed the file as we opened it: lock the current one instead
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise RunFolderError(f"run folder {run_dir}: could not take its lock (it keeps changing hands).")


def _owner(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"PID {int(text)}" if text.isdigit() else "another process"


def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds the run folder's lock ("PID N"), or None if nobody does."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _owner(path)
    finally:
        os.close(fd)
    return None


# ---------------------------------------------------------------------------------------------------
# New runs and resumed runs


def contents(run_dir: Path) -> list[str]:
    try:
        return sorted(p.name for p in Path(run_dir).iterdir() if p.name != LOCK_FILE)
    except FileNotFoundError:
        return []


def check_new_run_folder(run_dir: Path) -> None:
    """A new run starts only in a missing or empty folder."""
    found = contents(run_dir)
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise RunFolderError(f"{run_dir} is not empty (it holds {shown}); a new run never writes into an existing "
                             f"folder. Pass --resume to continue the run there, or choose another --name.")


def check_resumable_without_checkpoint(run_dir: Path) -> None:
    """--resume in a folder without a complete checkpoint starts from scratch only if the folder holds
    nothing but what a run writes before its first checkpoint (it was killed that early)."""
    foreign = [name for name in contents(run_dir) if name not in EARLY_FILES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunFolderError(f"{run_dir}: nothing to resume (no training checkpoint in {run_dir / 'checkpoints'}), "
                             f"and the folder holds {shown}, which is not a run's; not writing into it. "
                             f"Choose another --name.")


@contextlib.contextmanager
def claim(run_dir: str | Path, resume: bool):
    """Own ``run_dir`` for the block: lock it; a new run needs it missing or empty."""
    with RunLock(run_dir) as lock:
        if not resume:
            check_new_run_folder(Path(run_dir))
        yield lock


# ---------------------------------------------------------------------------------------------------
# Resume identity


def _tensor_sha256(*tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(__import__("torch").uint8).numpy()))
    return digest.hexdigest()


def data_identity(data) -> dict:
    """What a run trained and validated on: the dataset's own identity (name, files, checksums) where it
    offers one, and always the counts, classes and a checksum of the images and labels themselves."""
    ident = {}
    offered = getattr(data, "identity", None)
    if callable(offered):
        offered = offered()
    if isinstance(offered, dict):
        ident.update(json.loads(json.dumps(offered, default=str)))
    ident.update({
        "name": getattr(data, "name", ident.get("name", "cifar10")),
        "spec": getattr(data, "spec", "") or getattr(data, "name", "cifar10"),
        "classes": list(data.classes),
        "image_shape": list(data.train.images.shape[1:]),
        "train_images": len(data.train),
        "train_sha256": _tensor_sha256(data.train.images, data.train.labels),
        "test_images": len(data.test),
        "test_sha256": _tensor_sha256(data.test.images, data.test.labels),
    })
    ident.pop("root", None)  # where the files are is not what they are
    return ident


# What decides whether a resume sees the same data. The rest of a dataset's identity (file format,
# file checksums, whether they were verified) is stored as a record: the same images read from the
# binary or the python version, or a photo folder that was moved, are the same data.
COMPARED = ("name", "classes", "image_shape", "train_subset", "train_images", "train_sha256",
            "test_images", "test_sha256", "content_sha256", "image_size")


def identity_differences(saved: dict | None, now: dict) -> list[str]:
    if not saved:
        return []  # a run saved before identities were recorded
    out = []
    for key in COMPARED:
        a, b = saved.get(key), now.get(key)
        if a == b or key not in saved:
            continue
        if key.endswith("sha256"):
            out.append(f"data {key} {str(a)[:12]}... (saved) vs {str(b)[:12]}... (now)")
        else:
            out.append(f"data {key} {short_repr(a, 60)} (saved) vs {short_repr(b, 60)} (now)")
    return out


def declaration_differences(saved: dict, now: dict) -> list[str]:
    """Layer by layer: what differs between two validated declarations."""
    out = []
    for key in sorted((set(saved) | set(now)) - {"layers", "description"}):
        if saved.get(key) != now.get(key):
            out.append(f"model {key} {short_repr(saved.get(key), 40)} (saved) vs {short_repr(now.get(key), 40)} (now)")
    a, b = saved.get("layers", []), now.get("layers", [])
    if len(a) != len(b):
        out.append(f"model has {len(a)} layers (saved) vs {len(b)} (now)")
    for i, (la, lb) in enumerate(zip(a, b)):
        if la != lb:
            keys = sorted(k for k in set(la) | set(lb) if la.get(k) != lb.get(k))
            detail = ", ".join(f"{k} {short_repr(la.get(k), 30)} vs {short_repr(lb.get(k), 30)}" for k in keys[:4])
            out.append(f"model layer {i} {la.get('name', '?')!r}: {detail} (saved vs now)")
        if len(out) >= 6:
            break
    return out
