"""Download and unpack CIFAR-10 so that nothing half-written ever lands in the cache.

The archive goes to a temporary file, its md5 is checked *before* anything is extracted, members are
screened (no absolute paths, ``..``, links, devices or oversized files) and written into a temporary
folder, every file's md5 is checked, and only then is the folder renamed into place.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from .data import ARCHIVE_MD5, BIN_DIRNAME, FILE_MD5, verify_folder
from .errors import DataError
from .fsutil import fsync_dir

# The largest CIFAR-10 member is 30.7 MB; anything far bigger is not CIFAR-10 (or is a bomb).
MAX_MEMBER_BYTES = 64 << 20
MAX_TOTAL_BYTES = 256 << 20


def download_file(url: str, dest: Path, expected_md5: str | None, progress: bool = True,
                  timeout: float = 60.0) -> None:
    """Fetch ``url`` into ``dest`` via a temporary file; verify the md5 before the rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5()
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http/https only below)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"could not download {url}: {e}. Check the network, or download the archive "
                            f"yourself and pass it with --data-dir.") from None
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = _progress_bar(total, f"downloading {PurePosixPath(url).name}", progress)
        received = 0
        with response, os.fdopen(fd, "wb") as f:
            while block := response.read(1 << 16):
                f.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
        bar.close()
        if total is not None and received != total:
            raise DataError(f"download of {url} stopped after {received:,} of {total:,} bytes. "
                            f"Run the command again to retry.")
        if expected_md5 and digest.hexdigest() != expected_md5:
            raise DataError(f"{url}: md5 of the download is {digest.hexdigest()}, expected {expected_md5} "
                            f"(corrupt or not the official archive). Nothing was extracted; run again "
                            f"to retry, or check CIFARLAB_URL.")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _progress_bar(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                leave=False)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    path = PurePosixPath(name)
    why = None
    if name.startswith(("/", "\\")) or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        why = "an absolute path"
    elif ".." in path.parts:
        why = "a '..' component"
    elif member.issym() or member.islnk():
        why = f"a link (to {member.linkname!r})"
    elif member.isdev() or member.isfifo():
        why = "a device or FIFO"
    elif not (member.isfile() or member.isdir()):
        why = "not a regular file or folder"
    elif member.size > MAX_MEMBER_BYTES:
        why = f"{member.size:,} bytes, more than the {MAX_MEMBER_BYTES:,} any CIFAR-10 file needs"
    if why:
        raise DataError(f"{archive}: refusing member {name!r}: {why}. The archive is not a safe CIFAR-10 "
                        f"archive; nothing was extracted into the cache.")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest`` after screening every member; raise before writing anything."""
    archive = Path(archive)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: not a readable .tar.gz archive ({e}). Delete it and download again.") \
            from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{archive}: the archive is truncated or damaged ({e}). Delete it and download "
                            f"again.") from None
        total = 0
        for member in members:
            _check_member(member, archive)
            total += member.size
        if total > MAX_TOTAL_BYTES:
            raise DataError(f"{archive}: members add up to {total:,} bytes, more than CIFAR-10's archive "
                            f"can hold; refusing to extract.")
        for member in members:
            target = dest / member.name
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                src = tar.extractfile(member)
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{archive}: member {member.name!r} could not be read ({e}); the archive "
                                f"is truncated or damaged. Delete it and download again.") from None


def extract_archive_into_cache(archive: Path, cache: Path, expected_md5: str | None = ARCHIVE_MD5,
                               file_md5: dict[str, str] = FILE_MD5) -> Path:
    """Verify and unpack ``archive``; move the ``cifar-10-batches-bin`` folder into ``cache``."""
    from .data import md5_of

    archive = Path(archive)
    if expected_md5 and md5_of(archive) != expected_md5:
        raise DataError(f"{archive}: md5 differs from the official archive's {expected_md5}. Delete it "
                        f"and download again.")
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / BIN_DIRNAME
    if final.is_dir():
        return final
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        safe_extract(archive, staging)
        extracted = staging / BIN_DIRNAME
        if not extracted.is_dir():
            raise DataError(f"{archive}: no {BIN_DIRNAME}/ folder inside; this is not CIFAR-10's binary "
                            f"version archive.")
        verify_folder(extracted, file_md5, remember=False)
        try:
            os.rename(extracted, final)
        except OSError:
            if not final.is_dir():  # another process may have won the race with an identical copy
                raise
        fsync_dir(cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def fetch_cifar10(cache: Path, url: str, progress: bool = True, expected_md5: str = ARCHIVE_MD5,
                  file_md5: dict[str, str] = FILE_MD5) -> Path:
    """Download the official archive into ``cache`` (verified), unpack it, return the data folder."""
    if not url.startswith(("http://", "https://", "file://")):
        raise DataError(f"download URL {url!r}: expected http://, https:// or file://")
    cache = Path(cache)
    archive = cache / "cifar-10-binary.tar.gz"
    if not archive.exists():
        download_file(url, archive, expected_md5, progress=progress)
    try:
        return extract_archive_into_cache(archive, cache, expected_md5, file_md5)
    except DataError:
        archive.unlink(missing_ok=True)  # a bad archive must not poison the next attempt
        raise
