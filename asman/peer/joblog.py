"""A job's output while it runs: batched to the log stream, bounded, and kept whole for the end.

Lines are never sent one message each: chunks are gathered and flushed every
``flush_interval_s`` or when ``batch_bytes`` are waiting. Live streaming stops after
``live_limit`` bytes (with a notice); the full log, up to ``total_limit`` bytes, is kept and
stored as a blob when the job finishes: in memory while it is under ``spill_bytes`` (most
logs: no file, no thread hop to read it back), in a file past that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from asman.errors import AsmanError
from asman.escape import one_line
from asman.log.connection import Log
from asman.log.events import now_ms
from asman.log.logstream import append_logs

__all__ = ["SPILL_BYTES", "JobLog"]

logger = logging.getLogger(__name__)

#: Up to this size a log is kept in memory (most logs: no file, no thread hop to read it).
SPILL_BYTES = 256 * 1024


class JobLog:
    """Collects (stream, bytes) chunks of one attempt. Use as an async context manager."""

    def __init__(
        self,
        log: Log,
        queue: str,
        job_id: str,
        attempt: int,
        file: Path,
        *,
        batch_bytes: int = 64 * 1024,
        flush_interval_s: float = 0.1,
        live_limit: int = 4 * 1024 * 1024,
        total_limit: int = 64 * 1024 * 1024,
        spill_bytes: int = SPILL_BYTES,
    ) -> None:
        self.log = log
        self.queue = queue
        self.job_id = job_id
        self.attempt = attempt
        self.file = file
        self.build_file = file.with_name(file.name + ".build")
        self.batch_bytes = batch_bytes
        self.flush_interval_s = flush_interval_s
        self.live_limit = live_limit
        self.total_limit = total_limit
        self.spill_bytes = spill_bytes
        self._pending: list[tuple[str, int, bytes]] = []
        self._pending_bytes = 0
        self._live_bytes = 0
        self._sizes = {"run": 0, "build": 0}
        self._truncated = {"run": False, "build": False}
        self._live_cut = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._memory: dict[str, bytearray] = {"run": bytearray(), "build": bytearray()}
        self._handles: dict[str, BinaryIO] = {}  # the kinds spilled to a file

    async def __aenter__(self) -> JobLog:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)
        elif self._pending:
            await self.flush()
        for handle in self._handles.values():
            handle.close()

    @property
    def spilled(self) -> bool:
        """Whether a log went to a file (under the job's folder)."""
        return bool(self._handles)

    def content(self, kind: str) -> bytes | Path:
        """The whole ``run`` or ``build`` log once closed: its bytes, or the file it spilled
        to."""
        return self._path(kind) if kind in self._handles else bytes(self._memory[kind])

    def _path(self, kind: str) -> Path:
        return self.build_file if kind == "build" else self.file

    def _keep(self, kind: str, data: bytes) -> None:
        handle = self._handles.get(kind)
        if handle is None:
            memory = self._memory[kind]
            if len(memory) + len(data) <= self.spill_bytes:
                memory += data
                return
            path = self._path(kind)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self._handles[kind] = open(path, "wb")  # noqa: SIM115 - closed in __aexit__
            handle.write(memory)
            self._memory[kind] = bytearray()
        handle.write(data)

    @property
    def run_size(self) -> int:
        return self._sizes["run"]

    @property
    def build_size(self) -> int:
        return self._sizes["build"]

    def write(self, stream: str, data: bytes) -> None:
        """Record a chunk of ``stream`` (stdout, stderr, build or system)."""
        if not data:
            return
        kind = "build" if stream == "build" else "run"
        room = self.total_limit - self._sizes[kind]
        if room > 0:
            part = data[:room]
            self._keep(kind, part)
            self._sizes[kind] += len(part)
        elif not self._truncated[kind]:
            self._truncated[kind] = True
            note = f"\n[asman: log over {self.total_limit} bytes, the rest was dropped]\n"
            self._keep(kind, note.encode())
        if self._live_cut:
            return
        if self._live_bytes + len(data) > self.live_limit:
            self._live_cut = True
            data = (
                f"\n[asman: live log over {self.live_limit} bytes; the rest is in the result]\n"
            ).encode()
            stream = "system"
        self._live_bytes += len(data)
        self._pending.append((stream, now_ms(), data))
        self._pending_bytes += len(data)
        if self._task is None and not self._closing:
            # the flusher starts with the first output: a silent job costs no task
            self._task = asyncio.get_running_loop().create_task(
                self._flusher(), name=f"joblog-{self.job_id[:8]}"
            )
        if self._pending_bytes >= self.batch_bytes:
            self._wake.set()

    async def on_output(self, stream: str, data: bytes) -> None:
        """``Runtime.run``'s output callback."""
        self.write(stream, data)

    def system(self, text: str) -> None:
        """A line from Asman itself (pulling, timed out, …), shown with the job's output.
        What a job controls in it (a file name, an error's text) is escaped: control
        characters and undecodable bytes become ``\\n``, ``\\x1b``, ``\\udcff``, so one
        line stays one line."""
        self.write("system", f"[asman] {one_line(text)}\n".encode())

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        # keep each message well under the event size limit
        start = 0
        while start < len(batch):
            size, end = 0, start
            while end < len(batch) and (end == start or size + len(batch[end][2]) < 512 * 1024):
                size += len(batch[end][2])
                end += 1
            try:
                await append_logs(self.log, self.queue, self.job_id, self.attempt, batch[start:end])
            except AsmanError as exc:
                logger.warning("job=%s could not stream logs: %s", self.job_id, exc)
            start = end

    async def _flusher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()
            if self._closing:
                await self.flush()
                return
