"""Blobs in the JetStream object store (bucket ``ASMAN_BLOBS``): the embedded default.

The bucket is an ordinary JetStream object store (stream ``OBJ_<bucket>``, chunks on
``$O.<bucket>.C.<nuid>``, one JSON meta message per object on ``$O.<bucket>.M.<base64 name>``),
so ``nats object`` and other clients can read what Asman writes and the other way round.
Objects are named ``sha256/<hex>``.

Why not nats-py's ``ObjectStore.get``: it reads the chunks through an ordered push consumer whose
flow-control replies are sent from a task that polls every 0.25 s, so a read stalls on every
flow-control window (~15-30 MiB/s, nats-io/nats.py#703). Reads here use batched *direct get*
(``$JS.API.DIRECT.GET.<stream>`` with ``next_by_subj`` and ``batch``, nats-server 2.11+): one
request per batch of chunks, no consumer to create or delete, the next request sent before the
previous batch is written out (in a thread) and hashed. Writes publish the chunks with a bounded
window of asynchronous publishes and publish the meta message only after the digest matched the
key, so a wrong ``sha256`` never becomes visible.

Requests go to the JetStreamContext's API prefix, so a context made with ``domain=`` reads
and writes that domain's bucket.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

import nats.errors
import nats.js.errors
from nats.js import api
from nats.nuid import NUID

from asman.errors import BlobCorrupt, BlobError, BlobFull, BlobNotFound, BlobUnavailable
from asman.log.blobs import (
    BlobInfo,
    BytesSink,
    FileSink,
    blob_key,
    check_sha256,
    run_to_completion,
    sha256_bytes,
    sha256_file_async,
)

__all__ = ["DEFAULT_BUCKET", "ObjectStoreBlobs"]

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "ASMAN_BLOBS"
DEFAULT_CHUNK_SIZE = 128 * 1024  # the object store's default; must stay under max_payload

_STREAM_NOT_FOUND = 10059  # JetStream err_code
_STREAM_NAME_IN_USE = 10058
_WRONG_LAST_SEQUENCE = 10071
_STORE_FAILED = 10077  # "maximum bytes exceeded" when the bucket is full (discard new)
_INSUFFICIENT_STORAGE = 10047  # the server cannot reserve a stream's max_bytes
DEFAULT_MAX_BYTES = 10 * 1024**3  # a new bucket's size limit unless one is given
_MIN_DEFAULT_BYTES = 64 * 1024**2
_ROLLUP = {api.Header.ROLLUP.value: "sub"}
_DIGEST_PREFIX = "SHA-256="

_READ_BATCH = 64  # chunks per direct-get request (8 MiB at the default chunk size)
_PUBLISH_WINDOW = 64  # unacknowledged chunk publishes in flight
_FILE_BLOCK = 8  # chunks read from the file per thread call
_CATCH_UP_TRIES = 4  # a replica that answers a direct get may lag a moment behind the leader

T = TypeVar("T")


class ObjectStoreBlobs:
    """``BlobStore`` on a JetStream object store bucket.

    ``js`` is a connected ``JetStreamContext`` (its domain/prefix is honoured). ``replicas``,
    ``max_age_s`` and ``max_bytes`` configure the bucket when ``ensure()`` creates it (default: 1
    replica, no age limit, 10 GiB; 0 removes a limit); on an existing bucket ``ensure()`` changes
    only the ones given, so a peer with default settings never shrinks a bucket an operator made
    with 3 replicas. ``timeout`` bounds every single wait on the server (one request, one batch, one
    publish window), not a whole transfer. The object store cannot presign: ``presigned_get``
    and ``presigned_put`` return None.
    """

    def __init__(
        self,
        js: Any,
        *,
        bucket: str = DEFAULT_BUCKET,
        replicas: int | None = None,
        max_age_s: int | None = None,
        max_bytes: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float = 30.0,
    ) -> None:
        self._js = js
        self._nc = js._nc  # nats-py exposes neither the connection nor the API prefix publicly
        self._api_prefix: str = js._prefix
        self.bucket = bucket
        self.stream = f"OBJ_{bucket}"
        self.replicas = replicas
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self.timeout = timeout
        self._nuid = NUID()

    # -- names (the object store's own layout, shared with every nats client) -----------------

    def _chunk_subject(self, nuid: str) -> str:
        return f"$O.{self.bucket}.C.{nuid}"

    def _meta_subject(self, key: str) -> str:
        return f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(key.encode()).decode()}"

    def _stream_config(self) -> api.StreamConfig:
        # The same stream nats-py's create_object_store (and nats.go) makes.
        return api.StreamConfig(
            name=self.stream,
            subjects=[f"$O.{self.bucket}.C.>", f"$O.{self.bucket}.M.>"],
            max_age=float(self.max_age_s) if self.max_age_s else None,
            max_bytes=_limit(self.max_bytes, DEFAULT_MAX_BYTES),
            storage=api.StorageType.FILE,
            num_replicas=self.replicas or 1,
            discard=api.DiscardPolicy.NEW,
            allow_rollup_hdrs=True,
            allow_direct=True,
        )

    # -- bucket ------------------------------------------------------------------------------

    async def ensure(self) -> None:
        """Create the bucket, or bring an existing one in line: direct get on, and the age
        limit, size limit and replicas if they were given. Safe to call from many peers at
        once.

        A bucket created with the default size limit on a server with less storage to reserve
        gets the largest limit the server grants (halving down to 64 MiB), so blobs can never
        fill the storage the log itself needs; an explicit ``max_bytes`` the server cannot
        reserve is an error that says so."""
        async with self._translate(""):
            try:
                info = await self._js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                try:
                    await self._create()
                    return
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code != _STREAM_NAME_IN_USE:
                        raise
                info = await self._js.stream_info(self.stream)  # another peer created it
            cfg = info.config
            changed = not cfg.allow_direct
            cfg.allow_direct = True
            if self.max_age_s is not None and float(cfg.max_age or 0) != float(self.max_age_s):
                cfg.max_age = float(self.max_age_s) or None
                changed = True
            if self.max_bytes is not None and (cfg.max_bytes or -1) != _limit(self.max_bytes, 0):
                cfg.max_bytes = _limit(self.max_bytes, 0)
                changed = True
            if self.replicas is not None and (cfg.num_replicas or 1) != self.replicas:
                cfg.num_replicas = self.replicas
                changed = True
            if changed:
                try:
                    await self._js.update_stream(cfg)
                except nats.js.errors.APIError as exc:
                    if exc.err_code == _INSUFFICIENT_STORAGE:
                        raise self._cannot_reserve(cfg.max_bytes) from exc
                    raise

    async def _create(self) -> None:
        cfg = self._stream_config()
        limit = cfg.max_bytes or -1
        while True:
            try:
                await self._js.add_stream(cfg)
                return
            except nats.js.errors.APIError as exc:
                if exc.err_code != _INSUFFICIENT_STORAGE:
                    raise
                if self.max_bytes is not None or limit // 2 < _MIN_DEFAULT_BYTES:
                    raise self._cannot_reserve(limit) from exc
                limit //= 2
                cfg.max_bytes = limit
                log.warning(
                    "the NATS server cannot reserve the default size for object store bucket "
                    "%s; trying max_bytes=%d (set --blob-max-bytes to choose)",
                    self.bucket,
                    cfg.max_bytes,
                )

    def _cannot_reserve(self, max_bytes: int | None) -> BlobError:
        return BlobError(
            f"object store bucket {self.bucket}: the NATS server cannot reserve max_bytes="
            f"{max_bytes} of storage: give a smaller --blob-max-bytes, or raise the server's "
            "jetstream max_file_store"
        )

    # -- BlobStore ---------------------------------------------------------------------------

    async def exists(self, sha256: str) -> BlobInfo | None:
        key = blob_key(sha256)
        info = await self._meta(key)
        if info is None:
            return None
        return BlobInfo(key, sha256, int(info.size or 0))

    async def put_file(self, path: Path, *, sha256: str | None = None) -> BlobInfo:
        if sha256 is None:
            sha256, _ = await sha256_file_async(path)
        key = blob_key(sha256)
        found, meta_seq = await self._meta_at(key)
        if found is not None:
            return BlobInfo(key, sha256, int(found.size or 0))
        f: BinaryIO = await asyncio.to_thread(open, path, "rb")
        try:
            return await self._upload(key, sha256, f, meta_seq, in_thread=True, source=str(path))
        finally:
            await asyncio.to_thread(f.close)

    async def put_bytes(self, data: bytes) -> BlobInfo:
        sha256 = await sha256_bytes(data)
        key = blob_key(sha256)
        found, meta_seq = await self._meta_at(key)
        if found is not None:
            return BlobInfo(key, sha256, int(found.size or 0))
        return await self._upload(
            key, sha256, io.BytesIO(data), meta_seq, in_thread=False, source="bytes"
        )

    async def get_to_file(
        self, sha256: str, dest: Path, *, max_size: int | None = None
    ) -> BlobInfo:
        check_sha256(sha256)
        return await self._download(sha256, lambda size: _FileTarget(dest, sha256, max_size, size))

    async def get_bytes(self, sha256: str, *, max_size: int) -> bytes:
        check_sha256(sha256)
        return await self._download(sha256, lambda size: _BytesTarget(sha256, max_size, size))

    async def presigned_get(
        self, sha256: str, *, expires_s: int = 3600, filename: str | None = None
    ) -> str | None:
        check_sha256(sha256)
        return None

    async def presigned_put(self, sha256: str, *, expires_s: int = 3600) -> str | None:
        check_sha256(sha256)
        return None

    # -- meta ------------------------------------------------------------------------------

    async def _meta(self, key: str) -> api.ObjectInfo | None:
        """The object's live meta, or None when it is missing or deleted."""
        info, _ = await self._meta_at(key)
        return info

    async def _meta_at(self, key: str) -> tuple[api.ObjectInfo | None, int]:
        """The live meta (None if missing or deleted) and the stream sequence of the meta
        message (0 when there is none): the compare-and-set token for publishing a new one."""
        async with self._translate(key):
            try:
                msg = await self._js.get_last_msg(self.stream, self._meta_subject(key))
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code == _STREAM_NOT_FOUND:
                    raise self._no_bucket(key) from exc
                return None, 0
        seq = int(msg.seq or 0)
        try:
            info: api.ObjectInfo = api.ObjectInfo.from_response(json.loads(msg.data))
        except (ValueError, TypeError, KeyError) as exc:
            raise BlobCorrupt(f"blob {key}: unreadable object store meta", key=key) from exc
        if info.deleted:
            return None, seq
        if info.is_link():
            raise BlobError(
                f"blob {key} is an object store link, which Asman does not follow", key=key
            )
        return info, seq

    def _no_bucket(self, key: str) -> BlobError:
        return BlobError(
            f"object store bucket {self.bucket} does not exist: create it with "
            "ObjectStoreBlobs.ensure() (asman dev does this)",
            key=key,
        )

    # -- upload ----------------------------------------------------------------------------

    async def _upload(
        self, key: str, sha256: str, f: BinaryIO, meta_seq: int, *, in_thread: bool, source: str
    ) -> BlobInfo:
        """Publish the chunks, check the digest, then publish the meta message with
        compare-and-set on ``meta_seq`` (the meta seen before): if a peer stored the same blob
        meanwhile, theirs is kept and our chunks are purged."""
        nuid = self._nuid.next().decode()
        subject = self._chunk_subject(nuid)
        block = self.chunk_size * _FILE_BLOCK
        h = _Hasher()
        chunks = 0
        published = False
        acks = _Acks(self._nc, self.timeout, _PUBLISH_WINDOW)
        try:
            async with self._translate(key), acks:
                while True:
                    if in_thread:  # read and hash in one trip to the thread
                        data = await run_to_completion(h.read_from, f, block)
                    else:
                        data = f.read(block)
                        await h.update(data)
                    if not data:
                        break
                    view = memoryview(data)
                    for start in range(0, len(data), self.chunk_size):
                        await acks.publish(subject, bytes(view[start : start + self.chunk_size]))
                        chunks += 1
                await acks.wait_all()
            digest = h.digest()
            if digest.hex() != sha256:
                raise BlobCorrupt(
                    f"{source} hashes to {digest.hex()}, not to {sha256}: it changed while "
                    "it was sent, or the sha256 given for it is wrong; nothing was stored",
                    key=key,
                )
            info = api.ObjectInfo(
                name=key,
                bucket=self.bucket,
                nuid=nuid,
                size=h.size,
                chunks=chunks,
                digest=_DIGEST_PREFIX + base64.urlsafe_b64encode(digest).decode(),
                mtime=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                options=api.ObjectMetaOptions(max_chunk_size=self.chunk_size),
            )
            headers = {**_ROLLUP, api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(meta_seq)}
            async with self._translate(key):
                try:
                    await self._js.publish(
                        self._meta_subject(key),
                        json.dumps(info.as_dict()).encode(),
                        timeout=self.timeout,
                        headers=headers,
                    )
                    published = True
                except nats.js.errors.APIError as exc:
                    if exc.err_code != _WRONG_LAST_SEQUENCE:
                        raise
                    theirs = await self._meta(key)  # a peer stored it first: keep theirs
                    if theirs is None:
                        raise BlobError(
                            f"blob {key} was deleted while it was stored: store it again",
                            key=key,
                        ) from exc
                    return BlobInfo(key, sha256, int(theirs.size or 0))
            log.debug("blob stored key=%s size=%d chunks=%d", key, h.size, chunks)
            return BlobInfo(key, sha256, h.size)
        finally:
            if not published:
                await asyncio.shield(self._purge(subject))

    async def _purge(self, subject: str) -> None:
        """Remove the chunks of an upload that did not complete (best effort)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._js.purge_stream(self.stream, subject=subject)
        except Exception as exc:  # cleanup must not hide the error that got us here
            log.warning("could not purge unused blob chunks subject=%s: %r", subject, exc)

    # -- download --------------------------------------------------------------------------

    async def _download(self, sha256: str, target: Callable[[int], _Target[T]]) -> T:
        key = blob_key(sha256)
        for attempt in range(2):
            info = await self._meta(key)
            if info is None:
                raise BlobNotFound(
                    f"blob {key} is not in object store bucket {self.bucket}", key=key
                )
            size = int(info.size or 0)
            sink = target(size)  # raises BlobTooLarge when size > max_size
            await sink.open()
            try:
                got = await self._read_chunks(key, info, sink)
                if got < int(info.chunks or 0):
                    # Short: the object was replaced (chunks purged) while we read it?
                    now = await self._meta(key)
                    if attempt == 0 and (now is None or now.nuid != info.nuid):
                        await sink.abort()
                        continue
                    raise BlobCorrupt(
                        f"blob {key} is truncated: {got} of {info.chunks} chunks in the bucket",
                        key=key,
                    )
                _check_digest(key, info, sink.hexdigest())
                return await sink.commit()
            except BaseException:
                await sink.abort()
                raise
        raise BlobNotFound(f"blob {key} vanished while it was read", key=key)  # pragma: no cover

    async def _read_chunks(self, key: str, info: api.ObjectInfo, sink: _Target[Any]) -> int:
        """Stream the object's chunks into ``sink``; return how many arrived.

        While one batch is written out (in a thread), the next one is already requested.
        """
        total = int(info.chunks or 0)
        if total == 0:
            return 0
        subject = self._chunk_subject(info.nuid)
        got = 0
        seq = 1
        tries = 0
        writing: asyncio.Future[None] | None = None
        asking: asyncio.Future[tuple[list[bytes], int]] | None = None
        reader = _DirectGet(self._nc, self._api_prefix, self.stream, self.timeout)
        ask = reader.batch
        async with self._translate(key), reader:
            asking = asyncio.ensure_future(ask(seq, subject, min(_READ_BATCH, total)))
            try:
                while asking is not None:
                    datas, last_seq = await asking
                    asking = None
                    if datas:
                        got += len(datas)
                        seq = last_seq + 1
                        tries = 0
                    else:  # a replica behind the leader, or the chunks were purged
                        tries += 1
                        if tries > _CATCH_UP_TRIES:
                            break
                        await asyncio.sleep(0.01 * 2**tries)
                    if got < total:  # ask for the next batch before writing this one out
                        asking = asyncio.ensure_future(
                            ask(seq, subject, min(_READ_BATCH, total - got))
                        )
                    if writing is not None:
                        await writing
                        writing = None
                    if datas:
                        writing = asyncio.ensure_future(sink.write_many(datas))
                if writing is not None:
                    await writing
                    writing = None
            finally:
                if asking is not None:
                    asking.cancel()
                    await asyncio.gather(asking, return_exceptions=True)
                if writing is not None:
                    # Never leave a thread writing into a file that abort() is about to remove.
                    await asyncio.gather(writing, return_exceptions=True)
        return got

    # -- errors ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _translate(self, key: str) -> AsyncIterator[None]:
        """nats exceptions in, asman exceptions out."""
        try:
            yield
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as exc:
            raise self._no_bucket(key) from exc
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STORE_FAILED and "maximum bytes" in (exc.description or ""):
                raise BlobFull(
                    f"object store bucket {self.bucket} is full (its max_bytes is reached); "
                    "nothing was stored: the operator can raise the limit (--blob-max-bytes "
                    "with --update-streams), shorten --retention, or use an S3 store",
                    key=key,
                ) from exc
            raise BlobError(
                f"object store bucket {self.bucket}: JetStream refused the request "
                f"(code {exc.code}, err_code {exc.err_code}): {exc.description}",
                key=key,
            ) from exc
        except (
            TimeoutError,
            nats.errors.TimeoutError,
            nats.errors.NoServersError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
        ) as exc:
            raise BlobUnavailable(
                f"object store bucket {self.bucket}: NATS did not answer in {self.timeout:g}s "
                f"({type(exc).__name__}): check the connection to the server",
                key=key,
            ) from exc
        except nats.errors.Error as exc:
            raise BlobError(f"object store bucket {self.bucket}: {exc}", key=key) from exc


class _Acks:
    """JetStream publishes with a window of unacknowledged ones, acks read on our own inbox.

    nats-py's ``publish_async`` leaves its future pending for good when the server answers
    with an error (``APIError.from_error`` raises inside the reply handler,
    nats-io/nats.py#985), so a full bucket looked like a timeout. Each publish here carries
    the reply subject ``<inbox>.<n>``; an error answer fails that publish with the server's
    error, and ``publish``/``wait_all`` raise it.
    """

    def __init__(self, nc: Any, timeout: float, window: int) -> None:
        self._nc = nc
        self._timeout = timeout
        self._window = window
        self._inbox = ""
        self._sub: Any = None
        self._sent = 0
        self._pending: collections.OrderedDict[int, asyncio.Future[None]] = (
            collections.OrderedDict()
        )

    async def __aenter__(self) -> _Acks:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and not issubclass(kind, asyncio.CancelledError):
            # A stream stores a publish some time after the server read it: wait for the
            # answers still due, so a purge that follows comes after every chunk we sent.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await asyncio.gather(*self._pending.values(), return_exceptions=True)
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()

    async def publish(self, subject: str, data: bytes) -> None:
        while len(self._pending) >= self._window:
            await self._wait_oldest()
        n = self._sent
        self._sent += 1
        self._pending[n] = asyncio.get_running_loop().create_future()
        await self._nc.publish(subject, data, reply=f"{self._inbox}.{n}")

    async def wait_all(self) -> None:
        while self._pending:
            await self._wait_oldest()

    async def _wait_oldest(self) -> None:
        n, fut = next(iter(self._pending.items()))
        try:
            async with asyncio.timeout(self._timeout):
                await fut
        finally:
            self._pending.pop(n, None)

    async def _on_ack(self, msg: Any) -> None:
        try:
            fut = self._pending.get(int(msg.subject.rsplit(".", 1)[1]))
        except ValueError:
            return
        if fut is None or fut.done():
            return
        if msg.headers and msg.headers.get(api.Header.STATUS) == "503":
            fut.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            resp = json.loads(msg.data)
        except ValueError:
            fut.set_exception(BlobError(f"an unreadable publish ack: {msg.data[:200]!r}"))
            return
        err = resp.get("error") if isinstance(resp, dict) else None
        if err:
            fut.set_exception(_api_error(err))
        else:
            fut.set_result(None)


def _api_error(err: dict[str, Any]) -> nats.js.errors.APIError:
    """The nats-py error class for a JetStream error answer, made rather than raised."""
    kind = {
        503: nats.js.errors.ServiceUnavailableError,
        500: nats.js.errors.ServerError,
        404: nats.js.errors.NotFoundError,
        400: nats.js.errors.BadRequestError,
    }.get(err.get("code", 0), nats.js.errors.APIError)
    return kind(
        code=err.get("code"), err_code=err.get("err_code"), description=err.get("description")
    )


def _limit(value: int | None, default: int) -> int:
    """A byte limit as JetStream spells it: ``None`` → ``default``, 0 → -1 (no limit)."""
    if value is None:
        value = default
    return value if value > 0 else -1


class _DirectGet:
    """Batched direct get (``<api prefix>.DIRECT.GET.<stream>``) over one inbox.

    ``batch(seq, subject, n)`` asks for up to ``n`` messages on ``subject`` from stream sequence
    ``seq`` on and returns their payloads and the sequence of the last one. One request is in
    flight at a time, so the inbox never mixes two answers.
    """

    def __init__(self, nc: Any, api_prefix: str, stream: str, timeout: float) -> None:
        self._nc = nc
        self._subject = f"{api_prefix}.DIRECT.GET.{stream}"
        self._stream = stream
        self._timeout = timeout
        self._inbox: str = nc.new_inbox()
        self._sub: Any = None
        self._parts: list[bytes] = []
        self._last = 0
        self._done: asyncio.Future[None] | None = None

    async def __aenter__(self) -> _DirectGet:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _on_msg(self, msg: Any) -> None:
        done = self._done
        if done is None or done.done():
            return
        hdrs = msg.headers or {}
        status = hdrs.get(api.Header.STATUS)
        if status is None:
            self._parts.append(msg.data)
            self._last = int(hdrs.get("Nats-Sequence", 0))
            if "Nats-Num-Pending" not in hdrs:  # a server before 2.11 answers one message
                done.set_result(None)
        elif status in ("204", "404"):  # end of batch / nothing (more) on the subject
            done.set_result(None)
        elif status == "503":  # no responders: no such stream (or direct get is off)
            done.set_exception(nats.errors.NoRespondersError())
        else:
            done.set_exception(
                BlobError(
                    f"direct get on stream {self._stream} failed: "
                    f"{status} {hdrs.get(api.Header.DESCRIPTION, '')}"
                )
            )

    async def batch(self, seq: int, subject: str, n: int) -> tuple[list[bytes], int]:
        self._parts, self._last = [], 0
        self._done = done = asyncio.get_running_loop().create_future()
        req = {"seq": seq, "next_by_subj": subject, "batch": n}
        await self._nc.publish(self._subject, json.dumps(req).encode(), reply=self._inbox)
        async with asyncio.timeout(self._timeout):
            await done
        return self._parts, self._last


def _check_digest(key: str, info: api.ObjectInfo, got_hex: str) -> None:
    """The bytes must hash to the key, and to the digest the object store recorded."""
    digest = (info.digest or "").strip()
    if digest[: len(_DIGEST_PREFIX)].upper() == _DIGEST_PREFIX:
        try:
            recorded = base64.urlsafe_b64decode(digest[len(_DIGEST_PREFIX) :] + "==").hex()
        except ValueError:
            recorded = ""
        if recorded != got_hex:
            raise BlobCorrupt(
                f"blob {key} is corrupt: its chunks do not match the object store digest",
                key=key,
            )


class _Hasher:
    """SHA-256 and byte count of an upload, hashed in a thread for large blocks."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def read_from(self, f: BinaryIO, n: int) -> bytes:
        """Read up to ``n`` bytes and hash them (blocking: run in a thread)."""
        data = f.read(n)
        self.size += len(data)
        self._h.update(data)
        return data

    async def update(self, data: bytes) -> None:
        self.size += len(data)
        if len(data) >= 1024 * 1024:
            await asyncio.to_thread(self._h.update, data)
        else:
            self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()


class _Target(Generic[T]):
    """Where downloaded chunks go; each call runs its blocking part in a thread."""

    async def open(self) -> None:
        pass

    async def write_many(self, parts: list[bytes]) -> None:
        raise NotImplementedError

    def hexdigest(self) -> str:
        raise NotImplementedError

    async def commit(self) -> T:
        raise NotImplementedError

    async def abort(self) -> None:
        pass


class _FileTarget(_Target[BlobInfo]):
    def __init__(self, dest: Path, sha256: str, max_size: int | None, size: int) -> None:
        self._sink = FileSink(Path(dest), sha256, max_size=max_size, expected_size=size)

    async def open(self) -> None:
        await run_to_completion(self._sink.open)

    async def write_many(self, parts: list[bytes]) -> None:
        await run_to_completion(self._sink.write_many, parts)

    def hexdigest(self) -> str:
        return self._sink.current_hexdigest()

    async def commit(self) -> BlobInfo:
        return await run_to_completion(self._sink.commit)

    async def abort(self) -> None:
        await run_to_completion(self._sink.abort)


class _BytesTarget(_Target[bytes]):
    def __init__(self, sha256: str, max_size: int | None, size: int) -> None:
        self._sink = BytesSink(sha256, max_size=max_size, expected_size=size)

    async def write_many(self, parts: list[bytes]) -> None:
        await run_to_completion(self._sink.write_many, parts)

    def hexdigest(self) -> str:
        return self._sink.current_hexdigest()

    async def commit(self) -> bytes:
        return await run_to_completion(self._sink.commit)

    async def abort(self) -> None:
        self._sink.abort()
