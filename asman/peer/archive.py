"""Unpacking build-context archives from the outside: tar (any compression) or zip, with
members that may not escape the destination (no absolute paths, no ``..``, no links out,
no device files) and bounded in count and total size."""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from asman.errors import InvalidInput, InvalidPath

__all__ = ["unpack_archive"]


def unpack_archive(
    archive: Path,
    dest: Path,
    *,
    max_bytes: int = 2 * 1024**3,
    max_members: int = 100_000,
) -> Path:
    """Unpack a .tar, .tar.gz (.bz2, .xz) or .zip (detected by magic bytes) into ``dest``.

    Refuses absolute names, ``..``, links leaving ``dest``, device files and FIFOs, more than
    ``max_members`` members or ``max_bytes`` unpacked. Returns ``dest``, or its only entry when
    that is a single top-level folder.
    """
    with archive.open("rb") as f:
        magic = f.read(4)
    dest.mkdir(parents=True, exist_ok=True)
    if magic[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        _unpack_zip(archive, dest, max_bytes, max_members)
    else:
        try:
            tar = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed just below)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidInput(
                f"build context {archive.name} is not a .tar, .tar.gz or .zip archive: {exc}"
            ) from exc
        with tar:
            _unpack_tar(tar, dest, max_bytes, max_members)
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return dest


def _member_name(name: str) -> str | None:
    """The member's normalized relative path; None for the archive root; refuses escapes."""
    if "\0" in name:
        raise InvalidPath(name, "contains a NUL byte")
    if name.startswith("/"):
        raise InvalidPath(name, "absolute paths are not allowed in an archive")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise InvalidPath(name, "'..' is not allowed in an archive")
    return "/".join(parts) or None


def _link_target(name: str, target: str) -> None:
    """Refuse a symlink whose target is absolute or leaves the archive's root."""
    if target.startswith("/") or "\0" in target:
        raise InvalidPath(name, f"symlink to {target!r}: absolute links are not allowed")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if joined == ".." or joined.startswith("../"):
        raise InvalidPath(name, f"symlink to {target!r} points outside the archive")


def _check_totals(count: int, total: int, max_members: int, max_bytes: int) -> None:
    if count > max_members:
        raise InvalidInput(f"the archive has more than {max_members} members")
    if total > max_bytes:
        raise InvalidInput(f"the archive unpacks to more than {max_bytes} bytes")


def _unpack_tar(tar: tarfile.TarFile, dest: Path, max_bytes: int, max_members: int) -> None:
    accepted: list[tarfile.TarInfo] = []
    total = 0
    try:
        for member in tar:
            name = _member_name(member.name)
            _check_totals(len(accepted) + 1, total + member.size, max_members, max_bytes)
            if name is None:
                continue
            if member.issym():
                _link_target(name, member.linkname)
            elif member.islnk():
                _member_name(member.linkname)
            elif member.isreg():
                total += member.size
            elif not member.isdir():
                raise InvalidPath(name, "device files, FIFOs and other specials are not allowed")
            accepted.append(member)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise InvalidInput(f"the build context archive is damaged: {exc}") from exc
    try:
        tar.extractall(dest, members=accepted, filter="data")
    except tarfile.FilterError as exc:
        raise InvalidPath(exc.tarinfo.name, str(exc)) from exc
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise InvalidInput(f"the build context archive is damaged: {exc}") from exc


def _unpack_zip(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    base = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_totals(len(infos), sum(i.file_size for i in infos), max_members, max_bytes)
            for info in infos:
                name = _member_name(info.filename)
                if name is None:
                    continue
                mode = info.external_attr >> 16
                target = base / name
                if not target.parent.resolve().is_relative_to(base) or (
                    target.is_symlink() and not target.resolve().is_relative_to(base)
                ):
                    raise InvalidPath(name, "would be written outside the archive's folder")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                elif stat.S_ISLNK(mode):
                    link = (
                        zf.read(info).decode("utf-8", "replace") if info.file_size < 4096 else "/"
                    )
                    _link_target(name, link)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.unlink(missing_ok=True)
                    os.symlink(link, target)
                elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                    raise InvalidPath(
                        name, "device files, FIFOs and other specials are not allowed"
                    )
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.unlink(missing_ok=True)
                    with zf.open(info) as src, target.open("xb") as out:
                        shutil.copyfileobj(src, out, 1024 * 1024)
                    target.chmod(0o755 if mode & 0o111 else 0o644)
    except zipfile.BadZipFile as exc:
        raise InvalidInput(f"the build context archive is damaged: {exc}") from exc
