"""A job attempt's folders on the worker: fresh ``inputs``/``outputs`` per attempt, removed
after, including the files the container made as uid 65534."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asman.errors import InvalidInput, InvalidPath

#: tries of a held data-dir lock, 50 ms apart, before it is taken as a live worker's
LOCK_TRIES = 10

__all__ = [
    "DataDirLock",
    "JobDir",
    "abandoned",
    "fresh_dir",
    "job_dir_at",
    "prepare_job_dir",
    "remove_job_dir",
]


@dataclass(frozen=True, slots=True)
class JobDir:
    """The host folders bound into one attempt's container."""

    inputs: Path
    outputs: Path
    root: Path


def fresh_dir(path: Path) -> None:
    """An empty folder at ``path`` (whatever was there is removed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        _rmtree(path)
    path.mkdir(parents=True)


# ---- job folders ---------------------------------------------------------------------------


def job_dir_at(root: Path, job_id: str, attempt: int) -> JobDir:
    """Where an attempt's folders go: ``<root>/<job_id>/<attempt>/{inputs,outputs}``
    (nothing is made)."""
    if not job_id or job_id in (".", "..") or "/" in job_id or "\0" in job_id:
        raise InvalidPath(job_id, "a job id must be a single folder name")
    base = root / job_id / str(int(attempt))
    return JobDir(inputs=base / "inputs", outputs=base / "outputs", root=base)


def prepare_job_dir(root: Path, job_id: str, attempt: int) -> JobDir:
    """Make fresh ``<root>/<job_id>/<attempt>/{inputs,outputs}``; outputs writable by 65534."""
    job_dir = job_dir_at(root, job_id, attempt)
    base, inputs, outputs = job_dir.root, job_dir.inputs, job_dir.outputs
    fresh_dir(base)
    inputs.mkdir()
    outputs.mkdir()
    base.chmod(0o755)
    inputs.chmod(0o755)
    outputs.chmod(0o777)  # the container's user (65534) writes here
    return job_dir


def remove_job_dir(job_dir: JobDir) -> None:
    """Delete an attempt's folders, including files the container made (owned by 65534)."""
    if job_dir.root.exists() or job_dir.root.is_symlink():
        _rmtree(job_dir.root)
    with contextlib.suppress(OSError):
        job_dir.root.parent.rmdir()  # the job's folder, once its last attempt is gone


def _rmtree(path: Path) -> None:
    def retry(fn: Callable[..., Any], target: str, exc_info: Any) -> None:
        if isinstance(exc_info[1], FileNotFoundError):
            return
        # A folder the container made read-only: make it writable and try again.
        os.chmod(os.path.dirname(target), 0o700)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, 0o700)
        fn(target)

    shutil.rmtree(path, onerror=retry)


# ---- build context archives ----------------------------------------------------------------


class DataDirLock:
    """An exclusive lock on the worker's data dir: one worker per data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> DataDirLock:

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock_soon(fd)
        except OSError:
            os.close(fd)
            holder = _pid_in(self.path)
            raise InvalidInput(
                f"another worker{f' (pid {holder})' if holder else ''} uses the data dir "
                f"{self.path.parent}: give this one its own --data-dir"
            ) from None
        # the holder's pid, for the operator (the lock, not the pid, says who holds it)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lock_soon(fd: int) -> None:
    """Lock ``fd``, waiting a moment if it is held: a sibling looking for orphans holds a
    free lock for an instant (``abandoned``); a live worker holds it for good."""
    import fcntl

    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if attempt == LOCK_TRIES - 1:
                raise
            time.sleep(0.05)


def _pid_in(lock: Path) -> int | None:
    try:
        text = lock.read_text()[:32].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def abandoned(data_dir: str) -> bool:
    """Whether the worker that used ``data_dir`` on this host is gone: its lock file is
    there and nobody holds the lock (the kernel drops it when its process dies). False for a
    data dir this host cannot see (another machine's, another mount namespace's) and for one
    a live worker holds, this process's own included."""
    import fcntl

    path = Path(data_dir) / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)
