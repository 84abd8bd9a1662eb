"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Write to a temporary file in the same folder, fsync it, rename it over the target, fsync the folder.
A crash (or SIGKILL, or a full disk) at any point leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_copy(path: Path, data: bytes) -> str:
    """``data`` written and fsynced into a new temporary file beside ``path``; its name (removed on failure)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file owner-only (0600); give it the usual permissions (0666 minus the umask).
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = _temporary_copy(path, data)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and not e.filename:  # a full disk ("[Errno 28]") says which file it hit
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_create_bytes(path: str | Path, data: bytes) -> None:
    """Like :func:`atomic_write_bytes`, but never replaces anything: FileExistsError if ``path`` exists
    (checked atomically by the final hard link, so a file appearing meanwhile is not overwritten either)."""
    path = Path(path)
    if os.path.lexists(path):
        raise FileExistsError(17, "File exists", str(path))
    tmp = _temporary_copy(path, data)
    try:
        os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    fsync_dir(path.parent)
