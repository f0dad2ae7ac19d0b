"""Blobs on any S3 server (AWS, MinIO, SeaweedFS, R2, ...) through the ``minio`` SDK.

Objects are stored under ``<prefix>sha256/<hex>`` in one bucket. Browsers and other peers move
bytes without a gateway in the middle through presigned URLs.

The ``minio`` SDK is synchronous: every call runs in a worker thread (``asyncio.to_thread``), a
download or upload as one thread call that streams in 1 MiB reads (uploads in 16 MiB multipart
parts) and hashes on the way. A cancelled download stops at the next read and leaves nothing
behind. minio and urllib3 exceptions become ``asman.errors.BlobError`` and its subclasses here.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import check_bucket_name

from asman.errors import (
    BlobCorrupt,
    BlobError,
    BlobNotFound,
    BlobTooLarge,
    BlobUnavailable,
    ConfigError,
)
from asman.log.blobs import (
    HASH_THREAD_MIN_SIZE,
    READ_SIZE,
    BlobInfo,
    BytesSink,
    FileSink,
    HashingReader,
    TransferCancelled,
    blob_key,
    check_sha256,
    sha256_bytes,
    sha256_file_async,
)

__all__ = ["PART_SIZE", "S3Blobs"]

PART_SIZE = 16 * 1024 * 1024
"""Multipart part size for uploads (objects up to this size go in one PUT)."""

_MAX_EXPIRY_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
_NOT_FOUND = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}

T = TypeVar("T")


class S3Blobs:
    """``BlobStore`` on one S3 bucket.

    ``endpoint`` is ``host[:port]`` (no scheme); ``secure`` picks HTTPS. Objects go under
    ``prefix`` (``""`` or a path that gets a trailing ``/``). ``BlobInfo.key`` stays the logical
    ``sha256/<hex>``, the same for every store. Credentials are passed in, never read from the
    environment here.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool,
        region: str = "us-east-1",
        prefix: str = "",
        part_size: int = PART_SIZE,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        ca_file: str | None = None,
    ) -> None:
        if "://" in endpoint or "/" in endpoint or not endpoint:
            raise ConfigError(
                f"S3 endpoint {endpoint!r}: give host[:port] without a scheme or path "
                "(secure=True for HTTPS), or use S3Blobs.from_url()"
            )
        try:
            check_bucket_name(bucket)
        except ValueError as exc:
            raise ConfigError(f"S3 bucket name {bucket!r}: {exc}") from exc
        prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        self.region = region
        self.prefix = f"{prefix}/" if prefix else ""
        self.part_size = part_size
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_file or certifi.where(),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,  # a known region saves a GetBucketLocation round trip
                http_client=http,
            )
        except ValueError as exc:
            raise ConfigError(f"S3 endpoint {endpoint!r}: {exc}") from exc

    @classmethod
    def from_url(cls, url: str, access_key: str, secret_key: str, **kwargs: Any) -> S3Blobs:
        """Build from a URL. Accepted forms::

            s3+http://HOST[:PORT]/BUCKET[/PREFIX]     plain HTTP (a local MinIO or SeaweedFS)
            s3+https://HOST[:PORT]/BUCKET[/PREFIX]    HTTPS
            s3://HOST[:PORT]/BUCKET[/PREFIX]          HTTPS
            s3://BUCKET[/PREFIX]?endpoint=http://HOST:PORT
                                                      AWS-CLI style: the bucket is the host
                                                      part, the endpoint a query parameter

        A ``region=`` query parameter sets the region (default ``us-east-1``). Keyword
        arguments are passed on to the constructor. Example:
        ``S3Blobs.from_url("s3+http://127.0.0.1:8333/asman/blobs", key, secret)``.
        """
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        kwargs.setdefault("region", query.get("region", ["us-east-1"])[-1])
        path = parts.path.strip("/")
        if "endpoint" in query:
            if parts.scheme != "s3":
                raise ConfigError(f"S3 URL {url!r}: ?endpoint= goes with the s3:// form")
            ep = urllib.parse.urlsplit(query["endpoint"][-1])
            if ep.scheme not in ("http", "https") or not ep.netloc:
                raise ConfigError(f"S3 URL {url!r}: endpoint must be http(s)://HOST[:PORT]")
            secure = ep.scheme == "https"
            endpoint, bucket, prefix = ep.netloc, parts.netloc, path
        else:
            schemes = {"s3": True, "s3+https": True, "s3+http": False}
            if parts.scheme not in schemes:
                raise ConfigError(
                    f"S3 URL {url!r}: use s3+http://HOST:PORT/BUCKET[/PREFIX], "
                    "s3+https://... or s3://..."
                )
            secure = schemes[parts.scheme]
            endpoint = parts.netloc
            bucket, _, prefix = path.partition("/")
        if not endpoint or not bucket:
            raise ConfigError(f"S3 URL {url!r}: it names no endpoint or no bucket")
        return cls(endpoint, access_key, secret_key, bucket, secure=secure, prefix=prefix, **kwargs)

    def __repr__(self) -> str:
        scheme = "s3+https" if self.secure else "s3+http"
        return f"S3Blobs({scheme}://{self.endpoint}/{self.bucket}/{self.prefix})"

    def _object(self, sha256: str) -> tuple[str, str]:
        key = blob_key(sha256)
        return key, self.prefix + key

    # -- bucket ------------------------------------------------------------------------------

    async def ensure(self) -> None:
        """Create the bucket if it is missing (safe to race with other peers)."""

        def make() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket, location=self.region)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        await self._call("", make)

    # -- BlobStore ---------------------------------------------------------------------------

    async def exists(self, sha256: str) -> BlobInfo | None:
        key, obj = self._object(sha256)
        try:
            stat = await self._call(key, self._client.stat_object, self.bucket, obj)
        except BlobNotFound:
            return None
        return BlobInfo(key, sha256, int(stat.size or 0))

    async def put_file(self, path: Path, *, sha256: str | None = None) -> BlobInfo:
        if sha256 is None:
            sha256, size = await sha256_file_async(path)
        else:
            check_sha256(sha256)
            size = (await asyncio.to_thread(Path(path).stat)).st_size
        key, obj = self._object(sha256)
        found = await self.exists(sha256)
        if found is not None:
            return found

        def upload(stop: threading.Event) -> BlobInfo:
            with open(path, "rb") as f:
                return self._upload_sync(key, obj, sha256, f, size, str(path), stop)

        return await self._call(key, upload, cancellable=True)

    async def put_bytes(self, data: bytes) -> BlobInfo:
        sha256 = await sha256_bytes(data)
        key, obj = self._object(sha256)
        found = await self.exists(sha256)
        if found is not None:
            return found

        def upload(stop: threading.Event) -> BlobInfo:
            return self._upload_sync(key, obj, sha256, io.BytesIO(data), len(data), "bytes", stop)

        return await self._call(key, upload, cancellable=True)

    async def get_to_file(
        self, sha256: str, dest: Path, *, max_size: int | None = None
    ) -> BlobInfo:
        key, obj = self._object(sha256)

        def download(stop: threading.Event) -> BlobInfo:
            with self._get(obj) as resp:
                size = _length(resp)
                sink = FileSink(
                    Path(dest),
                    sha256,
                    max_size=max_size,
                    expected_size=size,
                    hash_thread=size is None or size >= HASH_THREAD_MIN_SIZE,
                )
                sink.open()
                try:
                    _pump(resp, sink.write, stop)
                    return sink.commit()
                except BaseException:
                    sink.abort()
                    raise

        return await self._call(key, download, cancellable=True)

    async def get_bytes(self, sha256: str, *, max_size: int) -> bytes:
        key, obj = self._object(sha256)

        def download(stop: threading.Event) -> bytes:
            with self._get(obj) as resp:
                sink = BytesSink(sha256, max_size=max_size, expected_size=_length(resp))
                _pump(resp, sink.write, stop)
                return sink.commit()

        return await self._call(key, download, cancellable=True)

    async def presigned_get(
        self, sha256: str, *, expires_s: int = 3600, filename: str | None = None
    ) -> str | None:
        key, obj = self._object(sha256)
        headers: dict[str, str | list[str] | tuple[str]] | None = (
            {"response-content-disposition": _attachment(filename)} if filename else None
        )
        # Signing is local computation once the region is known (it is: set in __init__).
        with self._translate(key):
            return str(
                self._client.presigned_get_object(
                    self.bucket, obj, expires=_expiry(expires_s), response_headers=headers
                )
            )

    async def presigned_put(self, sha256: str, *, expires_s: int = 3600) -> str | None:
        key, obj = self._object(sha256)
        with self._translate(key):
            return str(self._client.presigned_put_object(self.bucket, obj, _expiry(expires_s)))

    # -- objects by name: s3:// inputs and outputs of a job, in any bucket these credentials
    # -- reach (asman.peer.s3objects) -----------------------------------------------------

    async def get_object_to_file(self, bucket: str, name: str, dest: Path, *, max_size: int) -> int:
        """Download ``s3://bucket/name`` to ``dest``; at most ``max_size`` bytes (the size the
        server announces is not trusted: the bytes are counted). Returns the size."""

        def download(stop: threading.Event) -> int:
            size = 0
            resp = self._client.get_object(bucket, name)
            try:
                with open(dest, "wb") as f:
                    for data in resp.stream(READ_SIZE, decode_content=False):
                        if stop.is_set():
                            raise TransferCancelled("download cancelled")
                        size += len(data)
                        if size > max_size:
                            raise BlobTooLarge(
                                f"s3://{bucket}/{name} is over the limit of {max_size} bytes",
                                key=name,
                            )
                        f.write(data)
            except BaseException:
                Path(dest).unlink(missing_ok=True)
                raise
            finally:
                resp.close()
                resp.release_conn()
            return size

        return await self._call(name, download, cancellable=True, bucket=bucket)

    async def put_object_file(self, bucket: str, name: str, path: Path) -> None:
        """Upload the file ``path`` to ``s3://bucket/name``."""

        def upload() -> None:
            self._client.fput_object(bucket, name, str(path), part_size=self.part_size)

        await self._call(name, upload, bucket=bucket)

    async def list_objects(self, bucket: str, prefix: str, *, limit: int) -> list[tuple[str, int]]:
        """(name, size) of the objects under ``prefix``, at most ``limit`` (more: BlobError)."""

        def listing() -> list[tuple[str, int]]:
            out: list[tuple[str, int]] = []
            for obj in self._client.list_objects(bucket, prefix=prefix, recursive=True):
                if obj.is_dir or obj.object_name is None:
                    continue
                if len(out) >= limit:
                    raise BlobError(
                        f"s3://{bucket}/{prefix} holds more than {limit} objects", key=prefix
                    )
                out.append((obj.object_name, int(obj.size or 0)))
            return out

        return await self._call(prefix, listing, bucket=bucket)

    # -- blocking parts (run in a worker thread) ----------------------------------------------

    def _upload_sync(
        self,
        key: str,
        obj: str,
        sha256: str,
        f: BinaryIO,
        size: int,
        source: str,
        stop: threading.Event,
    ) -> BlobInfo:
        reader = HashingReader(f, stop=stop)
        changed = BlobCorrupt(
            f"{source} does not hash to {sha256}: it changed while it was sent, or the "
            "sha256 given for it is wrong; nothing was stored",
            key=key,
        )
        try:
            self._client.put_object(
                self.bucket,
                obj,
                cast(BinaryIO, reader),
                length=size,
                part_size=self.part_size,
                content_type="application/octet-stream",
            )
        except OSError as exc:  # minio: "stream having not enough data" (the file shrank)
            if isinstance(exc, urllib3.exceptions.HTTPError):
                raise
            raise changed from exc
        if reader.size != size or reader.hexdigest() != sha256:
            with contextlib.suppress(MinioException, urllib3.exceptions.HTTPError):
                self._client.remove_object(self.bucket, obj)
            raise changed
        return BlobInfo(key, sha256, size)

    @contextlib.contextmanager
    def _get(self, obj: str) -> Iterator[Any]:
        resp = self._client.get_object(self.bucket, obj)
        try:
            yield resp
        finally:
            resp.close()
            resp.release_conn()

    # -- threads and errors -----------------------------------------------------------------

    async def _call(
        self,
        key: str,
        fn: Callable[..., T],
        *args: Any,
        cancellable: bool = False,
        bucket: str | None = None,
    ) -> T:
        """Run a blocking minio call in a thread; translate its exceptions.

        ``cancellable`` functions take a ``threading.Event`` as their only argument and stop
        at the next read once it is set (set when the awaiting task is cancelled).
        """
        stop = threading.Event()
        call_args = (stop,) if cancellable else args
        with self._translate(key, bucket):
            try:
                return await asyncio.to_thread(fn, *call_args)
            except asyncio.CancelledError:
                stop.set()
                raise

    @contextlib.contextmanager
    def _translate(self, key: str, bucket: str | None = None) -> Iterator[None]:
        where = f"S3 bucket {bucket or self.bucket} at {self.endpoint}"
        try:
            yield
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                raise BlobNotFound(f"blob {key} is not in {where}", key=key) from exc
            if exc.code == "NoSuchBucket":
                raise BlobError(
                    f"{where}: the bucket does not exist: create it (S3Blobs.ensure())", key=key
                ) from exc
            if exc.code in _DENIED:
                raise BlobError(
                    f"{where} refused the request ({exc.code}): check the access key, the "
                    "secret key and the bucket's policy",
                    key=key,
                ) from exc
            raise BlobError(f"{where}: {exc.code}: {exc.message}", key=key) from exc
        except (ServerError, InvalidResponseError) as exc:
            raise BlobError(f"{where} answered with an error: {exc}", key=key) from exc
        except MinioException as exc:
            raise BlobError(f"{where}: {exc}", key=key) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise BlobUnavailable(
                f"cannot reach {where}: {type(exc).__name__}: {exc}: check the endpoint and "
                "that the server is up",
                key=key,
            ) from exc


def _length(resp: Any) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _pump(resp: Any, write: Callable[[bytes], None], stop: threading.Event) -> None:
    """Copy the response body to ``write`` in 1 MiB reads, raw (no content decoding)."""
    for data in resp.stream(READ_SIZE, decode_content=False):
        if stop.is_set():
            raise TransferCancelled("download cancelled")
        write(data)


def _expiry(expires_s: int) -> timedelta:
    if not 1 <= expires_s <= _MAX_EXPIRY_S:
        raise BlobError(f"presigned URL expiry {expires_s}s: must be 1s to 7 days")
    return timedelta(seconds=expires_s)


def _attachment(filename: str) -> str:
    """A Content-Disposition for ``filename`` (its last path part), safe for any name."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1] or "blob"
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = "".join(c if c.isprintable() and c not in '"\\;' else "_" for c in ascii_name)
    quoted = urllib.parse.quote(name, safe="")
    return f"attachment; filename=\"{ascii_name or 'blob'}\"; filename*=UTF-8''{quoted}"
