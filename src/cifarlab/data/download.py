"""Download and unpack a dataset archive so that nothing half-written ever lands in the cache.

The archive goes to a temporary file, its md5 is checked *before* anything is extracted, members are
screened (no absolute paths, ``..``, links, devices or oversized files) and written into a temporary
folder, every file's md5 is checked, and only then is the folder renamed into place.

Screening reads the (decompressed) archive through a reader that refuses to go past a fixed budget, and
checks each member as soon as its header is read, so a decompression bomb, a huge pax/long-name header
or millions of tiny members are refused after a bounded amount of work and memory.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import DataError
from ..fsutil import fsync_dir
from .base import md5_of, verify_files

# Defaults sized for the CIFAR archives: the largest member (CIFAR-100's train.bin) is 154 MB; anything
# far bigger is not one of them (or is a bomb).
MAX_MEMBER_BYTES = 192 << 20
MAX_TOTAL_BYTES = 256 << 20
MAX_MEMBERS = 64                 # the CIFAR archives have 9 and 6 entries
MAX_READ_BYTES = 4 << 20         # no single read of the tar stream may be larger (pax / long-name headers)
MAX_DOWNLOAD_BYTES = 512 << 20   # the official archives are 163-170 MB


@dataclass(frozen=True)
class ArchiveSpec:
    """An official archive: where it is, its md5, the folder inside it and that folder's files.

    ``file_md5`` are the official per-file checksums where they are published (CIFAR-10); otherwise
    ``file_sizes`` pin each file's exact size, and the archive's md5 is what vouches for the content.
    """

    title: str                     # "CIFAR-10", in messages
    url: str
    archive_name: str
    archive_md5: str
    folder: str                    # the folder inside the archive that holds the files
    file_md5: dict | None = None
    file_sizes: dict | None = None
    url_env: str = "CIFARLAB_URL"  # a mirror

    @property
    def files(self) -> list[str]:
        return sorted(self.file_md5 or self.file_sizes or {})

    def verify_folder(self, root: Path, hint: str, remember: bool = True) -> None:
        if self.file_md5:
            verify_files(root, self.file_md5, hint, remember=remember)
            return
        for name, size in (self.file_sizes or {}).items():
            path = Path(root) / name
            if not path.is_file():
                raise DataError(f"{path}: file is missing from the {self.title} folder. {hint}")
            if path.stat().st_size != size:
                raise DataError(f"{path}: {path.stat().st_size:,} bytes, expected {size:,} (the file is damaged "
                                f"or not {self.title}). {hint}")
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


def download_file(url: str, dest: Path, expected_md5: str | None, progress: bool = True,
                  timeout: float = 60.0) -> None:
    """Fetch ``url`` into ``dest`` via a temporary file; verify the md5 before the rename.

    Any failure (network error, server closing early, stalled connection, disk full, wrong md5) raises
    :class:`DataError` and leaves neither ``dest`` nor a partial file behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5()
    received = 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http/https only below)
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
                raise DataError(f"could not download {url}: {e}. Check the network, or download the archive "
                                f"yourself and pass it with --data-dir.") from None
            try:
                with response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.strip().isdigit() else None
                    if total is not None and total > MAX_DOWNLOAD_BYTES:
                        raise DataError(f"{url}: the server announces {total:,} bytes, far more than the "
                                        f"dataset archive; refusing to download it.")
                    bar = _progress_bar(total, f"downloading {PurePosixPath(url).name}", progress)
                    while block := response.read(1 << 16):
                        received += len(block)
                        if received > MAX_DOWNLOAD_BYTES:
                            raise DataError(f"{url}: more than {MAX_DOWNLOAD_BYTES:,} bytes, far more than the "
                                            f"dataset archive; stopped the download.")
                        f.write(block)
                        digest.update(block)
                        bar.update(len(block))
                    f.flush()
                    os.fsync(f.fileno())
                    bar.close()
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise DataError(f"download of {url} failed after {received:,} bytes ({type(e).__name__}: "
                                f"{getattr(e, 'strerror', None) or e}). Nothing was kept; run the command "
                                f"again to retry.") from None
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
    import sys

    from tqdm.auto import tqdm

    # Not into a log file: a bar there is hundreds of \r frames.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not (enabled and sys.stderr.isatty()), leave=False)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    path = PurePosixPath(name)
    why = None
    if name.startswith(("/", "\\")) or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        why = "an absolute path"
    elif ".." in path.parts:
        why = "a '..' component"
    elif member.issym() or member.islnk():
        why = f"a link (to {member.linkname[:100]!r})"
    elif member.isdev() or member.isfifo():
        why = "a device or FIFO"
    elif not (member.isfile() or member.isdir()):
        why = "not a regular file or folder"
    elif member.size > MAX_MEMBER_BYTES:
        why = f"{member.size:,} bytes, more than the {MAX_MEMBER_BYTES:,} any dataset file here needs"
    if why:
        shown = name if len(name) <= 120 else name[:100] + "..."
        raise DataError(f"{archive}: refusing member {shown!r}: {why}. The archive is not a safe dataset "
                        f"archive; nothing was extracted into the cache.")


class _BoundedStream:
    """A read-only, seekable view of the decompressed archive that refuses to read or seek past
    ``limit`` bytes, or to read more than ``MAX_READ_BYTES`` at once."""

    mode = "rb"

    def __init__(self, raw, limit: int, archive: Path):
        self.raw, self.limit, self.archive, self.pos = raw, limit, archive, 0
        self.name = str(archive)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _refuse(self, what: str) -> DataError:
        return DataError(f"{self.archive}: {what}; a CIFAR archive is never that large, so it is refused "
                         f"(a decompression bomb or a damaged archive). Nothing was extracted into the cache.")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.limit - self.pos
        if size > MAX_READ_BYTES:
            raise self._refuse(f"a tar header or record asks to read {size:,} bytes at once")
        if self.pos + size > self.limit:
            raise self._refuse(f"the archive goes on past {self.limit:,} bytes")
        data = self.raw.read(size)
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: offset, 1: self.pos + offset}.get(whence)
        if target is None or target < 0:
            raise OSError("unsupported seek")
        if target > self.limit:
            raise self._refuse(f"the archive goes on past {self.limit:,} bytes")
        self.raw.seek(target)
        self.pos = target
        return target

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.raw.close()


def _open_decompressed(archive: Path):
    with open(archive, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(archive, "rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(archive, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(archive, "rb")
    return open(archive, "rb")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest`` after screening every member; raise before writing anything."""
    archive = Path(archive)
    try:
        stream = _BoundedStream(_open_decompressed(archive), MAX_TOTAL_BYTES + MAX_MEMBERS * 4 * tarfile.BLOCKSIZE
                                + MAX_READ_BYTES, archive)
    except OSError as e:
        raise DataError(f"{archive}: cannot read it ({e.strerror or e}).") from None
    with stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r:")
        except _READ_ERRORS as e:
            raise DataError(f"{archive}: not a readable .tar.gz archive ({e}). Delete it and download again.") \
                from None
        with tar:
            # Screen each member as its header is read: the first bad one stops the scan.
            members, total = [], 0
            while True:
                try:
                    member = tar.next()
                except _READ_ERRORS as e:
                    raise DataError(f"{archive}: the archive is truncated or damaged ({e}). Delete it and "
                                    f"download again.") from None
                if member is None:
                    break
                _check_member(member, archive)
                members.append(member)
                total += member.size
                if len(members) > MAX_MEMBERS:
                    raise DataError(f"{archive}: more than {MAX_MEMBERS} members; the CIFAR archives have 6-9. "
                                    f"Refusing to extract.")
                if total > MAX_TOTAL_BYTES:
                    raise DataError(f"{archive}: members add up to more than {MAX_TOTAL_BYTES:,} bytes, more "
                                    f"than a CIFAR archive holds; refusing to extract.")
            for member in members:
                target = dest / member.name
                try:
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                        out.flush()
                        os.fsync(out.fileno())
                except _READ_ERRORS as e:
                    raise DataError(f"{archive}: member {member.name!r} could not be extracted ({e}); the "
                                    f"archive is truncated or damaged. Delete it and download again.") from None


def extract_archive_into_cache(archive: Path, cache: Path, spec: ArchiveSpec, check_md5: bool = True,
                               hint: str = "") -> Path:
    """Verify and unpack ``archive``; move the spec's folder into ``cache``; return it."""
    archive = Path(archive)
    if check_md5 and md5_of(archive) != spec.archive_md5:
        raise DataError(f"{archive}: md5 differs from the official {spec.title} archive's {spec.archive_md5}. "
                        f"Delete it and download again.")
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / spec.folder
    if final.is_dir():
        return final
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        safe_extract(archive, staging)
        extracted = staging / spec.folder
        if not extracted.is_dir():
            raise DataError(f"{archive}: no {spec.folder}/ folder inside; this is not the {spec.title} archive "
                            f"({spec.archive_name}).")
        spec.verify_folder(extracted, hint, remember=False)
        try:
            os.rename(extracted, final)
        except OSError:
            if not final.is_dir():  # another process may have won the race with an identical copy
                raise
        fsync_dir(cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def fetch(spec: ArchiveSpec, cache: Path, url: str | None = None, progress: bool = True, hint: str = "") -> Path:
    """Download the official archive into ``cache`` (verified), unpack it, return the data folder."""
    url = url or os.environ.get(spec.url_env) or spec.url
    if not url.startswith(("http://", "https://", "file://")):
        raise DataError(f"download URL {url!r}: expected http://, https:// or file://")
    cache = Path(cache)
    archive = cache / spec.archive_name
    if not archive.exists():
        download_file(url, archive, spec.archive_md5, progress=progress)
    try:
        return extract_archive_into_cache(archive, cache, spec, hint=hint)
    except DataError:
        archive.unlink(missing_ok=True)  # a bad archive must not poison the next attempt
        raise
