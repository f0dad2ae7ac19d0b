"""S3Blobs against a real S3 server (SeaweedFS ``weed mini``)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from minio import Minio

from asman.errors import BlobCorrupt, BlobError, BlobNotFound, BlobTooLarge, ConfigError
from asman.log.blobs import BlobInfo, BlobStore, FileSink
from asman.peer.s3 import S3Blobs

if TYPE_CHECKING:
    from s3server import SeaweedS3


pytestmark = pytest.mark.s3


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def store(s3_server: SeaweedS3, s3_bucket: str) -> S3Blobs:
    return S3Blobs(
        s3_server.endpoint,
        s3_server.access_key,
        s3_server.secret_key,
        s3_bucket,
        secure=False,
        prefix="blobs",
    )


def raw_put(client: Minio, bucket: str, name: str, data: bytes) -> None:
    client.put_object(bucket, name, io.BytesIO(data), len(data))


async def test_is_a_blob_store(store: S3Blobs) -> None:
    assert isinstance(store, BlobStore)


async def test_file_round_trip_5mb(
    store: S3Blobs, s3_client: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 7)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    info = await store.put_file(src)
    assert info == BlobInfo(f"sha256/{sha(data)}", sha(data), len(data))
    # Stored under the prefix.
    assert s3_client.stat_object(s3_bucket, f"blobs/sha256/{sha(data)}").size == len(data)
    dest = tmp_path / "out" / "dest.bin"
    assert await store.get_to_file(info.sha256, dest) == info
    assert dest.read_bytes() == data
    assert leftovers(dest.parent) == ["dest.bin"]


async def test_multipart_upload(store: S3Blobs, tmp_path: Path) -> None:
    data = os.urandom(17 * 1024 * 1024)  # two parts of 16 MiB
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    info = await store.put_file(src, sha256=sha(data))
    assert await store.get_bytes(info.sha256, max_size=len(data)) == data


async def test_bytes_round_trip_and_exists(store: S3Blobs) -> None:
    data = b"hello s3 blobs"
    assert await store.exists(sha(data)) is None
    info = await store.put_bytes(data)
    assert await store.exists(sha(data)) == info
    assert await store.get_bytes(sha(data), max_size=100) == data


async def test_put_is_idempotent(
    store: S3Blobs, s3_client: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(100_000)
    src = tmp_path / "src"
    src.write_bytes(data)
    first = await store.put_file(src)
    name = f"blobs/{first.key}"
    mtime = s3_client.stat_object(s3_bucket, name).last_modified
    etag = s3_client.stat_object(s3_bucket, name).etag
    assert await store.put_file(src) == first
    assert await store.put_bytes(data) == first
    again = s3_client.stat_object(s3_bucket, name)
    assert (again.last_modified, again.etag) == (mtime, etag)


async def test_put_with_wrong_sha_stores_nothing(store: S3Blobs, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"some bytes")
    wrong = sha(b"other bytes")
    with pytest.raises(BlobCorrupt):
        await store.put_file(src, sha256=wrong)
    assert await store.exists(wrong) is None


async def test_missing_blob(store: S3Blobs, tmp_path: Path) -> None:
    missing = sha(b"never stored")
    with pytest.raises(BlobNotFound):
        await store.get_to_file(missing, tmp_path / "x")
    with pytest.raises(BlobNotFound):
        await store.get_bytes(missing, max_size=10)
    assert leftovers(tmp_path) == []


async def test_corrupt_blob_is_detected(
    store: S3Blobs, s3_client: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    good = os.urandom(3 * 1024 * 1024)
    info = await store.put_bytes(good)
    raw_put(s3_client, s3_bucket, f"blobs/{info.key}", b"evil" * 1000)
    with pytest.raises(BlobCorrupt):
        await store.get_to_file(info.sha256, tmp_path / "dest")
    assert leftovers(tmp_path) == []  # no dest, no temp file
    with pytest.raises(BlobCorrupt):
        await store.get_bytes(info.sha256, max_size=len(good))


async def test_large_corrupt_blob_is_detected_and_its_hash_thread_ends(
    store: S3Blobs, s3_client: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    """From 4 MiB a download hashes in a thread of its own: a replaced object of the same
    size is still refused, and no hashing thread outlives the download."""
    good = os.urandom(6 * 1024 * 1024)
    info = await store.put_bytes(good)
    raw_put(s3_client, s3_bucket, f"blobs/{info.key}", os.urandom(len(good)))
    with pytest.raises(BlobCorrupt, match="corrupt"):
        await store.get_to_file(info.sha256, tmp_path / "dest")
    assert leftovers(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name == "asman-sha256"]


async def test_max_size(store: S3Blobs, tmp_path: Path) -> None:
    info = await store.put_bytes(b"x" * 1000)
    with pytest.raises(BlobTooLarge):
        await store.get_to_file(info.sha256, tmp_path / "dest", max_size=999)
    with pytest.raises(BlobTooLarge):
        await store.get_bytes(info.sha256, max_size=10)
    assert leftovers(tmp_path) == []


async def test_cancelled_download_leaves_nothing(
    store: S3Blobs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(8 * 1024 * 1024)
    info = await store.put_bytes(data)
    started, aborted = threading.Event(), threading.Event()
    write, abort = FileSink.write, FileSink.abort

    def slow_write(self: FileSink, chunk: bytes) -> None:  # one 1 MiB read every 50 ms
        started.set()
        time.sleep(0.05)  # a slow disk: the download is still going when it is cancelled
        write(self, chunk)

    def watched_abort(self: FileSink) -> None:
        try:
            abort(self)
        finally:
            aborted.set()

    monkeypatch.setattr(FileSink, "write", slow_write)
    monkeypatch.setattr(FileSink, "abort", watched_abort)
    out = tmp_path / "out"
    task = asyncio.ensure_future(store.get_to_file(info.sha256, out / "dest"))
    assert await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the download thread stops at its next read and removes its temp file
    assert await asyncio.to_thread(aborted.wait, 10), "the download thread never stopped"
    assert leftovers(out) == []


async def test_presigned_get(store: S3Blobs) -> None:
    data = os.urandom(200_000)
    info = await store.put_bytes(data)
    url = await store.presigned_get(info.sha256, expires_s=60, filename='résumé "1".txt')
    assert url is not None
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == data
        disposition = resp.headers.get("Content-Disposition", "")
        assert disposition.startswith("attachment;") and "UTF-8''r%C3%A9sum%C3%A9" in disposition


async def test_presigned_put(store: S3Blobs) -> None:
    data = b"uploaded by a browser"
    url = await store.presigned_put(sha(data), expires_s=60)
    assert url is not None
    async with aiohttp.ClientSession() as http, http.put(url, data=data) as resp:
        assert resp.status == 200
    assert await store.get_bytes(sha(data), max_size=100) == data


async def test_presign_bounds(store: S3Blobs) -> None:
    with pytest.raises(BlobError, match="expiry"):
        await store.presigned_get(sha(b"x"), expires_s=8 * 24 * 3600)


async def test_ensure_creates_the_bucket(s3_server: SeaweedS3, s3_client: Minio) -> None:
    store = S3Blobs.from_url(
        f"s3+http://{s3_server.endpoint}/fresh-bucket-ensure/p",
        s3_server.access_key,
        s3_server.secret_key,
    )
    with pytest.raises(BlobError, match="does not exist"):
        await store.put_bytes(b"x")
    await store.ensure()
    await store.ensure()
    try:
        assert s3_client.bucket_exists("fresh-bucket-ensure")
        info = await store.put_bytes(b"x")
        assert await store.get_bytes(info.sha256, max_size=1) == b"x"
    finally:
        for obj in s3_client.list_objects("fresh-bucket-ensure", recursive=True):
            s3_client.remove_object("fresh-bucket-ensure", obj.object_name or "")
        s3_client.remove_bucket("fresh-bucket-ensure")


async def test_wrong_credentials(s3_server: SeaweedS3, s3_bucket: str) -> None:
    store = S3Blobs(s3_server.endpoint, s3_server.access_key, "wrong", s3_bucket, secure=False)
    with pytest.raises(BlobError, match="access key"):
        await store.put_bytes(b"x")


async def test_unreachable_endpoint() -> None:
    store = S3Blobs("127.0.0.1:1", "a", "b", "bucket", secure=False, connect_timeout_s=1)
    with pytest.raises(BlobError, match="cannot reach"):
        await store.exists(sha(b"x"))


async def test_rejects_bad_sha(store: S3Blobs, tmp_path: Path) -> None:
    with pytest.raises(BlobError, match="not a sha256"):
        await store.get_to_file("abc", tmp_path / "x")
    with pytest.raises(BlobError, match="not a sha256"):
        await store.presigned_get("A" * 64)


@pytest.mark.parametrize(
    ("url", "endpoint", "secure", "bucket", "prefix"),
    [
        ("s3+http://127.0.0.1:9000/bk1", "127.0.0.1:9000", False, "bk1", ""),
        ("s3+http://127.0.0.1:9000/bk1/a/b/", "127.0.0.1:9000", False, "bk1", "a/b/"),
        ("s3+https://minio.example.org/bk1/x", "minio.example.org", True, "bk1", "x/"),
        (
            "s3://s3.eu-west-1.amazonaws.com/bk1?region=eu-west-1",
            "s3.eu-west-1.amazonaws.com",
            True,
            "bk1",
            "",
        ),
        ("s3://bk1/pre?endpoint=http://127.0.0.1:8333", "127.0.0.1:8333", False, "bk1", "pre/"),
    ],
)
def test_from_url(url: str, endpoint: str, secure: bool, bucket: str, prefix: str) -> None:
    store = S3Blobs.from_url(url, "k", "s")
    assert (store.endpoint, store.secure, store.bucket, store.prefix) == (
        endpoint,
        secure,
        bucket,
        prefix,
    )


@pytest.mark.parametrize(
    "url",
    ["http://h/b", "s3+http://h", "s3+http:///b", "s3://b?endpoint=ftp://x", "s3+http://h/B_"],
)
def test_from_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        S3Blobs.from_url(url, "k", "s")
