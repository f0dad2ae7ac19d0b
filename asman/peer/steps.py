"""The folders a multi-step job's steps share on the worker, and what the worker does in them.

A job's ``volumes`` and the folders of its ``outputPaths`` live on the host under
``<attempt>/fs/<container path>`` and are bound writable into every step, next to ``/inputs``
(read-only) and ``/outputs``. The worker itself reads a step's ``stdin`` from them, writes its
``stdout``/``stderr`` into them and collects output paths from them, as root, in folders a
job's code wrote: so it never follows a symlink there, never leaves the folder a path maps to,
and takes only regular files, bounded in number (``max_files``).
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from asman.errors import InvalidPath
from asman.log.steps import OutputPath, has_wildcards

__all__ = ["Found", "SharedFolders"]


@dataclass(frozen=True, slots=True)
class Found:
    """A file an output path matched: its container path, its host file and size, and the
    root it was found under (the match of a wildcard path, or the path itself)."""

    path: str
    host: Path
    size: int
    root: str
    output: OutputPath


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class SharedFolders:
    """The mount table of one attempt: container folder → host folder."""

    def __init__(
        self, root: Path, inputs: Path, outputs: Path, folders: list[str], *, max_files: int
    ) -> None:
        self.root = root / "fs"
        self.max_files = max_files
        kept: list[str] = []
        for folder in sorted(folders, key=len):
            if not any(_inside(folder, k) for k in kept):
                kept.append(folder)
        self.folders = tuple(kept)
        self._table: list[tuple[str, Path, bool]] = [
            ("/inputs", inputs, False),
            ("/outputs", outputs, True),
            *((f, self.root / f.lstrip("/"), True) for f in kept),
        ]
        self._table.sort(key=lambda row: len(row[0]), reverse=True)

    def make(self) -> None:
        """Make the host folders, writable by the container's user (65534)."""
        for folder in self.folders:
            host = self.root / folder.lstrip("/")
            host.mkdir(parents=True, exist_ok=True)
            host.chmod(0o777)

    @property
    def mounts(self) -> tuple[tuple[Path, str], ...]:
        return tuple((self.root / f.lstrip("/"), f) for f in self.folders)

    def _host(self, path: str, *, writable: bool) -> tuple[Path, Path]:
        """(host path, host folder it must stay in) for container ``path``."""
        for folder, host, rw in self._table:
            if _inside(path, folder) and (rw or not writable):
                rel = path[len(folder) :].lstrip("/")
                return (host / rel if rel else host), host
        raise InvalidPath(path, "is in no folder the steps share")

    def _checked_parent(self, path: str, *, writable: bool) -> tuple[Path, Path]:
        host, base = self._host(path, writable=writable)
        if host == base:  # the shared folder itself: the worker made it, no symlink
            return base, base
        parent = host.parent.resolve()
        if not parent.is_relative_to(base.resolve()):
            raise InvalidPath(path, "leads out of its folder through a symlink")
        return parent / host.name, base

    def stdin_file(self, path: str) -> Path:
        """The host file holding a step's ``stdin``: a regular file, no symlink."""
        host, _ = self._checked_parent(path, writable=False)
        try:
            st = host.lstat()
        except OSError:
            raise InvalidPath(
                path, "does not exist: an earlier step or an input makes it"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidPath(path, "is not a regular file (a stdin must be one)")
        return host

    def open_redirect(self, path: str) -> BinaryIO:
        """A step's ``stdout``/``stderr`` file, made afresh (never through a symlink),
        owned by the container's user so the steps after it may change it."""
        host, base = self._checked_parent(path, writable=True)
        parent = host.parent
        parent.mkdir(parents=True, exist_ok=True)
        if not parent.resolve().is_relative_to(base.resolve()):
            raise InvalidPath(path, "leads out of its folder through a symlink")
        if host.is_symlink():
            host.unlink()
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, 65534, 65534)
            os.fchmod(fd, 0o666)
        except OSError:
            os.close(fd)
            raise
        return os.fdopen(fd, "wb")

    def collect(self, outputs: tuple[OutputPath, ...], note: list[str]) -> list[Found]:
        """The regular files the output paths name, at most ``max_files``; what is skipped
        is said in ``note``."""
        found: list[Found] = []
        for out in outputs:  # a file two outputs name is found (and uploaded) for each
            for root in self._matches(out, note):
                for path, host, size in self._files(root, out, note):
                    if len(found) >= self.max_files:
                        note.append(f"output path {path}: more than {self.max_files} files")
                        return found
                    found.append(Found(path, host, size, root, out))
        return found

    def _matches(self, out: OutputPath, note: list[str]) -> list[str]:
        if not has_wildcards(out.path):
            return [out.path]
        folder = out.folder
        pattern = out.path
        matches = []
        for path, _host, _st in self._walk(folder, note):
            if fnmatch.fnmatchcase(path, pattern):
                matches.append(path)
        return sorted(matches)

    def _walk(self, folder: str, note: list[str]) -> list[tuple[str, Path, os.stat_result]]:
        """Everything under container ``folder`` (folders and files), never following a
        symlink, at most 4 times ``max_files`` entries."""
        try:
            host, base = self._checked_parent(folder, writable=False)
        except InvalidPath as exc:
            note.append(str(exc))
            return []
        out: list[tuple[str, Path, os.stat_result]] = []
        pending = [(folder, host)]
        while pending and len(out) < self.max_files * 4:
            cpath, hpath = pending.pop()
            try:
                with os.scandir(hpath) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                child = f"{cpath.rstrip('/')}/{entry.name}"
                out.append((child, Path(entry.path), st))
                if stat.S_ISDIR(st.st_mode):
                    pending.append((child, Path(entry.path)))
        _ = base
        return out

    def _files(self, root: str, out: OutputPath, note: list[str]) -> list[tuple[str, Path, int]]:
        try:
            host, _ = self._checked_parent(root, writable=False)
            st = host.lstat()
        except InvalidPath as exc:
            note.append(f"output path {root}: {exc}")
            return []
        except OSError:
            note.append(f"output path {root}: not found")
            return []
        if stat.S_ISREG(st.st_mode):
            return [(root, host, st.st_size)]
        if stat.S_ISDIR(st.st_mode):
            return [
                (p, h, s.st_size) for p, h, s in self._walk(root, note) if stat.S_ISREG(s.st_mode)
            ]
        note.append(f"output path {root}: not a regular file or a folder")
        return []
