"""The Python client: what the CLI is built on, and what scripts use.

    async with Client.connect(settings) as client:
        sub = await client.submit("my-queue", {"image": "alpine", "command": "echo hi"},
                                  files=[FileInput(Path("data.csv"), "data.csv")])
        state = await client.wait("my-queue", sub.job_id)
        await client.download_outputs(state, Path("outputs"))

Files become inputs: inline when small, blobs (by sha256, so a re-upload is skipped) when
large. Every download is checked against its sha256.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from asman.config import ClientSettings
from asman.errors import BlobCorrupt, BlobError, ConfigError, InvalidInput, InvalidPath
from asman.log import jobs, logstream, namespaces, workers
from asman.log.blobs import BlobInfo, BlobStore
from asman.log.connection import Log, LogConfig
from asman.log.control import with_namespace
from asman.log.definition import validate_relative_path
from asman.log.events import JobState, OutputFile
from asman.log.keys import PeerKey
from asman.log.logstream import LogChunk
from asman.log.migrate import Migration, migrate
from asman.log.objstore import ObjectStoreBlobs
from asman.log.workers import WorkerInfo
from asman.peer.callbacks import CallbackSender, CallbackSettings
from asman.peer.netguard import UrlPolicy

__all__ = ["Client", "FileInput", "NoBlobStore", "Progress", "collect_files", "open_blobs"]

#: Files up to this size are inlined in the definition (compute-queues' threshold).
INLINE_LIMIT = 200

#: a client's callbacks go where its user says (``Client.callback_sender``)
ANY_ADDRESS = UrlPolicy.parse(["0.0.0.0/0", "::/0"])

Progress = Callable[[str, int, int], None]
"""``progress(what, done_bytes, total_bytes)``: called as transfers move."""


@dataclass(frozen=True, slots=True)
class FileInput:
    """A local file and the name it gets under ``/inputs``."""

    path: Path
    name: str


def collect_files(specs: Iterable[str]) -> list[FileInput]:
    """``PATH`` → ``/inputs/<basename>``; ``PATH=NAME`` → ``/inputs/NAME``; a folder keeps its
    tree under its own name (or NAME)."""
    out: list[FileInput] = []
    for spec in specs:
        path_text, sep, name = spec.partition("=")
        path = Path(path_text).expanduser()
        if not path.exists():
            raise InvalidInput(f"file {path_text!r} does not exist (given as -f {spec!r})")
        base = name if sep else path.resolve().name
        validate_relative_path(base, "--file")
        if path.is_dir():
            for root, _dirs, files in os.walk(path):
                for f in sorted(files):
                    full = Path(root) / f
                    rel = full.relative_to(path).as_posix()
                    out.append(FileInput(full, f"{base}/{rel}"))
        elif path.is_file():
            out.append(FileInput(path, base))
        else:
            raise InvalidInput(f"{path_text!r} is neither a file nor a folder")
    names = [f.name for f in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise InvalidInput(
            f"two files would both be /inputs/{sorted(dupes)[0]}: rename one (-f PATH=NAME)"
        )
    return out


class NoBlobStore:
    """The blob store of a peer admitted for its queues only (``Log.confined``) and given no
    S3 store: the server's object store is one bucket for every queue, so the auth callout
    does not open it. Small inputs, outputs and logs travel inline and need no store;
    anything larger fails with this one line."""

    MESSAGE = (
        "this NATS server admits this connection for its queues only, and its object store "
        "holds every queue's blobs, so it is not open to it: give an S3 store for blobs "
        "(--blobs s3+https://HOST/BUCKET, env ASMAN_BLOBS; docs/operations.md, 'A public "
        "server')"
    )

    def _refuse(self, sha256: str = "") -> BlobError:
        return BlobError(self.MESSAGE, key=sha256)

    async def put_file(self, path: Path, *, sha256: str | None = None) -> BlobInfo:
        raise self._refuse(sha256 or "")

    async def put_bytes(self, data: bytes) -> BlobInfo:
        raise self._refuse()

    async def get_to_file(
        self, sha256: str, dest: Path, *, max_size: int | None = None
    ) -> BlobInfo:
        raise self._refuse(sha256)

    async def get_bytes(self, sha256: str, *, max_size: int) -> bytes:
        raise self._refuse(sha256)

    async def exists(self, sha256: str) -> BlobInfo | None:
        raise self._refuse(sha256)

    async def presigned_get(
        self, sha256: str, *, expires_s: int = 3600, filename: str | None = None
    ) -> str | None:
        return None

    async def presigned_put(self, sha256: str, *, expires_s: int = 3600) -> str | None:
        return None


async def open_blobs(settings: ClientSettings, log: Log) -> BlobStore:
    """The blob store the settings name: the object store unless an S3 URL is given (none
    for a peer the server admitted for its queues only: ``NoBlobStore``)."""
    if settings.blobs.url is None and log.confined:
        return NoBlobStore()
    if settings.blobs.url is None:
        store = ObjectStoreBlobs(
            log.js, replicas=settings.replicas, max_bytes=settings.blob_max_bytes
        )
        await store.ensure()
        return store
    from asman.peer.s3 import S3Blobs

    if not settings.blobs.access_key or not settings.blobs.secret_key:
        raise ConfigError(
            "an S3 blob store needs credentials: set ASMAN_S3_ACCESS_KEY and ASMAN_S3_SECRET_KEY "
            "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    s3 = S3Blobs.from_url(settings.blobs.url, settings.blobs.access_key, settings.blobs.secret_key)
    await s3.ensure()
    return s3


async def migrate_log(settings: ClientSettings, *, dry_run: bool = False) -> Migration:
    """Upgrade the log ``settings`` point at from wire v1 (``asman.log.migrate``)."""
    key = PeerKey.load_or_create(settings.key_file)
    log = Log(log_config(settings, name="asman-migrate"), key)
    try:
        await log.connect(setup=False)
        return await migrate(log, dry_run=dry_run)
    finally:
        await log.close()


def log_config(settings: ClientSettings, *, name: str = "asman", echo: bool = True) -> LogConfig:
    return LogConfig(
        echo=echo,
        servers=settings.servers,
        domain=settings.domain,
        creds=settings.creds,
        name=name,
        replicas=settings.replicas,
        retention_s=settings.retention_s,
        lease_ttl_s=settings.lease_ttl_s,
        max_attempts=settings.max_attempts,
        manage_streams=settings.manage_streams,
        update_streams=settings.update_streams,
        reads=settings.reads,
        inbox_prefix=settings.inbox_prefix,
        queues=settings.queues,
    )


class Client:
    """A connected client. ``async with Client.connect(settings) as client: ...``"""

    def __init__(self, log: Log, blobs: BlobStore) -> None:
        self.log = log
        self.blobs = blobs

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, settings: ClientSettings, *, name: str = "asman-client", echo: bool = True
    ) -> AsyncIterator[Client]:
        """``echo=False`` for a worker: its subscriptions never get its own publishes."""
        key = PeerKey.load_or_create(settings.key_file)
        async with Log(log_config(settings, name=name, echo=echo), key) as log:
            yield cls(log, await open_blobs(settings, log))

    @property
    def peer_id(self) -> str:
        return self.log.peer_id

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.log.close()

    # -- submit ------------------------------------------------------------------------

    async def file_refs(
        self, files: Sequence[FileInput], progress: Progress | None = None
    ) -> dict[str, dict[str, Any]]:
        """Data refs for ``files``: inline base64 when small, blobs (uploaded once) else."""
        refs: dict[str, dict[str, Any]] = {}
        total = sum(f.path.stat().st_size for f in files)
        done = 0
        for f in files:
            size = f.path.stat().st_size
            if size <= INLINE_LIMIT:
                data = await asyncio.to_thread(f.path.read_bytes)
                refs[f.name] = {"type": "base64", "value": base64.b64encode(data).decode()}
            else:
                info = await self.blobs.put_file(f.path)
                refs[f.name] = {"type": "blob", "value": info.sha256, "size": info.size}
            done += size
            if progress:
                progress("upload", done, total)
        return refs

    async def submit(
        self,
        queue: str,
        definition: Mapping[str, Any],
        *,
        files: Sequence[FileInput] = (),
        rerun: bool = False,
        progress: Progress | None = None,
        namespace: str | None = None,
        grace: namespaces.ReplaceGrace = namespaces.DEFAULT_GRACE,
        control: Mapping[str, Any] | None = None,
        callbacks: CallbackSender | None = None,
    ) -> jobs.Submitted:
        """Submit ``definition`` (plus ``files`` as inputs) to ``queue``; idempotent.

        The job is held for ``namespace`` (compute-queues'; ``_`` when None). The jobs this
        client holds there that the submission replaces are in ``Submitted.replacing``;
        ``replace`` releases them, each after its grace.

        ``control`` (``asman.log.control``) goes with it (its namespace and ``namespace`` are
        one); when this puts the job on the queue (created, or run again), ``callbacks``
        sends its ``queued`` callback."""
        final = dict(definition)
        if files:
            inputs = dict(final.get("inputs") or {})
            for name, ref in (await self.file_refs(files, progress)).items():
                if name in inputs:
                    raise InvalidPath(name, "is both in the definition's inputs and a --file")
                inputs[name] = ref
            final["inputs"] = inputs
        checked, named = with_namespace(control, namespace)
        sub = await namespaces.submit(
            self.log,
            queue,
            final,
            namespace=named,
            rerun=rerun,
            via="client",
            grace=grace,
            control=checked,
        )
        if callbacks is not None and (sub.created or sub.requeued):
            callbacks.queued(queue, sub.job_id, checked, sub.state.last_seq)
        return sub

    def callback_sender(self, settings: CallbackSettings | None = None) -> CallbackSender:
        """A sender of this client's callbacks, signed with its key. A client's user names
        the URLs itself, so they may be on any address (a gateway's and a worker's come from
        others, and are refused on loopback and private addresses); before it ends, it waits
        for deliveries underway for the whole delivery window."""
        settings = settings or CallbackSettings()
        settings = dataclasses.replace(settings, grace_s=settings.window_s)
        return CallbackSender(self.log.key, ANY_ADDRESS, settings)

    async def replace(
        self,
        replacements: Sequence[namespaces.Replacement],
        *,
        callbacks: CallbackSender | None = None,
    ) -> list[JobState | None]:
        """Release the jobs a submission replaced in its namespace, each after its grace
        (compute-queues': up to 8 s for a job older than a minute); their states after.
        A release that finished a job (it never ran) has ``callbacks`` send its
        ``finished`` callback."""
        on_finished = callbacks.finished if callbacks is not None else None
        return await namespaces.replace_now(self.log, replacements, on_finished)

    # -- read --------------------------------------------------------------------------

    async def state(self, queue: str, job_id: str) -> JobState:
        state = await jobs.read_job(self.log, queue, job_id)
        if state is None:
            from asman.errors import JobNotFound

            raise JobNotFound(queue, job_id)
        return state

    async def wait(self, queue: str, job_id: str, timeout: float | None = None) -> JobState:
        return await jobs.wait_finished(self.log, queue, job_id, timeout)

    def watch(self, queue: str, job_id: str) -> AsyncIterator[JobState]:
        return jobs.watch_job(self.log, queue, job_id)

    def watch_queue(self, queue: str) -> AsyncIterator[JobState]:
        return jobs.watch_queue(self.log, queue)

    async def logs(self, queue: str, job_id: str) -> list[LogChunk]:
        chunks, _ = await logstream.read_logs(self.log, await self.state(queue, job_id))
        return chunks

    def follow_logs(self, queue: str, job_id: str) -> AsyncIterator[LogChunk]:
        return logstream.follow_logs(self.log, queue, job_id)

    async def full_log(self, state: JobState) -> bytes:
        """The whole stored run log of a finished job (verified)."""
        if state.result is None or state.result.log is None:
            return b""
        return await self._blob_bytes(OutputFile("log", state.result.log))

    async def jobs(self, queue: str) -> list[JobState]:
        return await jobs.list_jobs(self.log, queue)

    async def workers(self, queue: str) -> list[WorkerInfo]:
        return await workers.list_workers(self.log, queue)

    async def cancel(
        self,
        queue: str,
        job_id: str,
        message: str = "cancelled",
        *,
        namespace: str | None = None,
        callbacks: CallbackSender | None = None,
    ) -> JobState:
        """Cancel a job you submitted; with ``namespace``, remove only that namespace (``*``:
        all you may) and cancel the job once no namespace holds it. When the cancel finished
        it (it never ran), ``callbacks`` sends its ``finished`` callback."""
        before = await self.state(queue, job_id)
        if before.finished:
            return before
        state = await jobs.cancel(self.log, queue, job_id, message, namespace=namespace)
        finished_here = state.result is not None and state.result.worker == self.log.peer_id
        if callbacks is not None and finished_here:
            callbacks.finished(state)
        return state

    # -- outputs -----------------------------------------------------------------------

    async def _blob_bytes(self, f: OutputFile) -> bytes:
        if f.blob.data is not None:
            if hashlib.sha256(f.blob.data).hexdigest() != f.blob.sha256:
                raise BlobCorrupt(f"inline output {f.path} does not match its sha256")
            return f.blob.data
        return await self.blobs.get_bytes(f.blob.sha256, max_size=f.blob.size)

    async def download_outputs(
        self, state: JobState, dest: Path, progress: Progress | None = None
    ) -> list[Path]:
        """Write every output of a finished job under ``dest`` (sha256 verified)."""
        if state.result is None:
            raise InvalidInput(f"job {state.job_id} has not finished: it has no outputs yet")
        written = []
        total = sum(f.blob.size for f in state.result.outputs)
        done = 0
        root = await asyncio.to_thread(dest.resolve)
        mode = await asyncio.to_thread(_file_mode)
        for f in state.result.outputs:
            validate_relative_path(f.path, "outputs")
            target = (root / f.path).resolve()
            if root not in target.parents:
                raise InvalidPath(f.path, "escapes the outputs folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.blob.data is not None:
                data = await self._blob_bytes(f)
                await asyncio.to_thread(target.write_bytes, data)
            else:
                await self.blobs.get_to_file(f.blob.sha256, target, max_size=f.blob.size)
                await asyncio.to_thread(os.chmod, target, mode)
            done += f.blob.size
            if progress:
                progress("download", done, total)
            written.append(target)
        return written


def _file_mode() -> int:
    """0666 less the process umask: what a plainly written file gets. Read from
    /proc/self/status: ``os.umask`` can only be read by setting it, for every thread at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644
