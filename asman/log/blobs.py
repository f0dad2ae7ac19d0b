"""Blobs: bytes addressed by their SHA-256, behind one ``BlobStore`` protocol.

Inputs, outputs and final logs larger than the inline limit live in a blob store under the key
``sha256/<hex>``. Two backends implement the protocol, one file each:

* ``asman.log.objstore.ObjectStoreBlobs`` -- the JetStream object store (``asman dev``, one node);
* ``asman.peer.s3.S3Blobs`` -- any S3 server through the ``minio`` SDK, with presigned URLs.

Rules every backend keeps:

* uploads stream from the file (never the whole file in memory) and are idempotent: a blob that
  is already stored is not sent again;
* every download is verified: bytes go to a temporary file beside the destination, their SHA-256
  and size are checked (``BlobCorrupt`` / ``BlobTooLarge``), and only then is the file renamed
  into place, so a half-written or wrong file never appears under the destination name;
* third-party exceptions are translated to ``asman.errors.BlobError`` and its subclasses.

The helpers here (hashing, key layout, ``FileSink``/``BytesSink``) are shared by the backends.
The sinks do blocking file I/O on purpose: backends call them in a worker thread
(``run_to_completion`` or ``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar, runtime_checkable

from asman.errors import BlobCorrupt, BlobError, BlobTooLarge

__all__ = [
    "BLOB_KEY_PREFIX",
    "READ_SIZE",
    "BlobInfo",
    "BlobStore",
    "BytesSink",
    "FileSink",
    "HashingReader",
    "TransferCancelled",
    "blob_key",
    "check_sha256",
    "run_to_completion",
    "sha256_bytes",
    "sha256_file",
    "sha256_file_async",
]

BLOB_KEY_PREFIX = "sha256/"
"""Every blob is stored under ``sha256/<64 lower-case hex digits>``."""

READ_SIZE = 1024 * 1024
"""Bytes read or written per call when streaming files."""

T = TypeVar("T")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SMALL = 1024 * 1024  # hash in the event loop below this size, in a thread above


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob: its key (``sha256/<hex>``), its SHA-256 (hex) and its size in bytes."""

    key: str
    sha256: str
    size: int


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed storage. Every method is a coroutine and never blocks the event loop."""

    async def put_file(self, path: Path, *, sha256: str | None = None) -> BlobInfo:
        """Store the file's bytes, streamed; skip the upload when the blob is already stored.

        ``sha256`` saves hashing the file first; a wrong one (or a file that changes while it
        is sent) raises ``BlobCorrupt`` and stores nothing under the wrong key.
        """
        ...

    async def put_bytes(self, data: bytes) -> BlobInfo:
        """Store bytes held in memory (idempotent, like ``put_file``)."""
        ...

    async def get_to_file(
        self, sha256: str, dest: Path, *, max_size: int | None = None
    ) -> BlobInfo:
        """Download into ``dest`` atomically, verified; ``BlobNotFound``, ``BlobCorrupt``,
        ``BlobTooLarge`` leave ``dest`` untouched."""
        ...

    async def get_bytes(self, sha256: str, *, max_size: int) -> bytes:
        """Download into memory, verified and bounded by ``max_size``."""
        ...

    async def exists(self, sha256: str) -> BlobInfo | None:
        """The blob's info when it is stored, else ``None``."""
        ...

    async def presigned_get(
        self, sha256: str, *, expires_s: int = 3600, filename: str | None = None
    ) -> str | None:
        """A URL anyone may GET the blob from until it expires; ``None`` if the store cannot
        presign. ``filename`` asks the server to send it as an attachment of that name."""
        ...

    async def presigned_put(self, sha256: str, *, expires_s: int = 3600) -> str | None:
        """A URL to PUT the blob's bytes to; ``None`` if the store cannot presign.

        The store does not check what arrives there: readers verify every download.
        """
        ...


def check_sha256(value: str) -> str:
    """Return ``value`` if it is 64 lower-case hex digits, else raise ``BlobError``."""
    if not isinstance(value, str) or _SHA256_RE.fullmatch(value) is None:
        raise BlobError(
            f"not a sha256: {value!r}: a blob is named by 64 lower-case hex digits", key=""
        )
    return value


def blob_key(sha256: str) -> str:
    """The key of a blob: ``sha256/<hex>`` (the hex is validated)."""
    return BLOB_KEY_PREFIX + check_sha256(sha256)


def _sha256_bytes_sync(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


async def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of ``data``; large inputs are hashed in a thread."""
    if len(data) < _SMALL:
        return _sha256_bytes_sync(data)
    return await asyncio.to_thread(_sha256_bytes_sync, data)


def sha256_file(path: Path | str) -> tuple[str, int]:
    """Hex SHA-256 and size of a file, read in 1 MiB chunks. Blocking: call it in a thread
    (or use ``sha256_file_async``)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


async def sha256_file_async(path: Path | str) -> tuple[str, int]:
    """``sha256_file`` in a worker thread."""
    return await asyncio.to_thread(sha256_file, path)


async def run_to_completion(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread`` that, when cancelled, still waits for the thread to finish before
    re-raising ``CancelledError`` -- so cleanup never races a thread still writing a file."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


class TransferCancelled(Exception):
    """Raised inside a worker thread to stop a transfer whose awaiting task was cancelled.

    Never reaches callers: the task sees ``asyncio.CancelledError``.
    """


class HashingReader:
    """Wraps a binary file: ``read`` passes bytes through and hashes/counts them.

    Used by uploads to check that what was sent is what the key promises. When ``stop`` is set
    (the awaiting task was cancelled), the next ``read`` raises ``TransferCancelled``.
    """

    def __init__(self, raw: BinaryIO, *, stop: threading.Event | None = None) -> None:
        self._raw = raw
        self._stop = stop
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if self._stop is not None and self._stop.is_set():
            raise TransferCancelled("upload cancelled")
        data = self._raw.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


#: From this announced size on, S3 downloads hash in a thread of their own.
HASH_THREAD_MIN_SIZE = 4 * 1024 * 1024


class _HashThread:
    """SHA-256 in a thread of its own, fed in order through a bounded queue. hashlib
    releases the GIL on large buffers, so hashing a download overlaps with receiving and
    writing it (on this VM a download hashed inline runs at half the speed of one that is
    not hashed). The thread starts with the first bytes; ``hexdigest`` ends the feed, and
    ``close`` stops the thread either way (a sink that is aborted)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._thread: threading.Thread | None = None
        self._ended = False

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._ended:
            raise RuntimeError("the hash was already read: no more bytes can be added")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="asman-sha256", daemon=True)
            self._thread.start()
        self._queue.put(data if isinstance(data, bytes) else bytes(data))

    def close(self) -> None:
        self._ended = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()


class _Verifier:
    """Hashes and counts incoming bytes, enforces the size bound, checks the end result."""

    def __init__(
        self,
        sha256: str,
        *,
        max_size: int | None = None,
        expected_size: int | None = None,
        hash_thread: bool = False,
    ) -> None:
        self.sha256 = sha256
        self.key = blob_key(sha256)
        self.max_size = max_size
        self.expected_size = expected_size
        self.size = 0
        if max_size is not None and expected_size is not None and expected_size > max_size:
            raise self._too_large(expected_size)
        # the same update/hexdigest either way
        self._hash: _HashThread | Any = _HashThread() if hash_thread else hashlib.sha256()

    def _too_large(self, size: int) -> BlobTooLarge:
        return BlobTooLarge(
            f"blob {self.key} is {size} bytes, over the limit of {self.max_size} bytes",
            key=self.key,
        )

    def _take(self, data: bytes | bytearray | memoryview) -> None:
        self.size += len(data)
        if self.max_size is not None and self.size > self.max_size:
            raise self._too_large(self.size)
        if self.expected_size is not None and self.size > self.expected_size:
            raise BlobCorrupt(
                f"blob {self.key} sent more than the {self.expected_size} bytes it announced",
                key=self.key,
            )
        self._hash.update(data)

    def current_hexdigest(self) -> str:
        """Hex SHA-256 of the bytes taken so far (with a hash thread: ends the feed)."""
        return str(self._hash.hexdigest())

    def _close_hash(self) -> None:
        if isinstance(self._hash, _HashThread):
            self._hash.close()

    def verify(self) -> BlobInfo:
        if self.expected_size is not None and self.size != self.expected_size:
            raise BlobCorrupt(
                f"blob {self.key} is truncated: got {self.size} of {self.expected_size} bytes",
                key=self.key,
            )
        got = str(self._hash.hexdigest())
        if got != self.sha256:
            raise BlobCorrupt(
                f"blob {self.key} is corrupt: its bytes hash to {got}; "
                "the stored copy is damaged or was replaced, upload it again",
                key=self.key,
            )
        return BlobInfo(self.key, self.sha256, self.size)


class BytesSink(_Verifier):
    """Collects a blob in memory, verified. Blocking-free; large batches may be given to
    ``write_many`` in a thread to keep hashing off the event loop."""

    def __init__(
        self, sha256: str, *, max_size: int | None = None, expected_size: int | None = None
    ) -> None:
        super().__init__(sha256, max_size=max_size, expected_size=expected_size)
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._take(data)
        self._parts.append(data)

    def write_many(self, parts: Iterable[bytes]) -> None:
        for data in parts:
            self.write(data)

    def commit(self) -> bytes:
        """Verify and return the bytes (``BlobCorrupt`` on a mismatch)."""
        self.verify()
        data = b"".join(self._parts)
        self._parts = []
        return data

    def abort(self) -> None:
        self._parts = []


class FileSink(_Verifier):
    """Writes a blob to a temporary file beside ``dest`` and renames it into place once
    verified. Blocking file I/O: call ``open``/``write_many``/``commit``/``abort`` in a thread.

    Use as::

        sink = FileSink(dest, sha256, max_size=..., expected_size=...)
        sink.open()
        try:
            ... sink.write(chunk) ...
            info = sink.commit()
        except BaseException:
            sink.abort()
            raise
    """

    def __init__(
        self,
        dest: Path,
        sha256: str,
        *,
        max_size: int | None = None,
        expected_size: int | None = None,
        hash_thread: bool = False,
    ) -> None:
        super().__init__(
            sha256, max_size=max_size, expected_size=expected_size, hash_thread=hash_thread
        )
        self.dest = Path(dest)
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None

    def open(self) -> None:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".part"
        )
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._file is not None, "FileSink.open() was not called"
        self._take(data)
        self._file.write(data)

    def write_many(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in parts:
            self.write(data)

    def commit(self) -> BlobInfo:
        """Verify, close and rename into place (``BlobCorrupt`` on a mismatch; the temp file
        is left for ``abort`` to remove)."""
        assert self._file is not None and self._tmp is not None, "FileSink.open() was not called"
        info = self.verify()
        self._file.close()
        os.replace(self._tmp, self.dest)
        self._tmp = None
        return info

    def abort(self) -> None:
        """Close and remove the temporary file; safe to call more than once."""
        self._close_hash()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
            self._tmp = None
