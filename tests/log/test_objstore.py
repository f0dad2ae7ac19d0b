"""ObjectStoreBlobs against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from asman.errors import BlobCorrupt, BlobError, BlobFull, BlobNotFound, BlobTooLarge
from asman.log.blobs import BlobInfo, BlobStore, FileSink, sha256_file
from asman.log.objstore import ObjectStoreBlobs
from asman.log.server import NatsServer, free_port


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest.fixture
async def store(js: Any) -> ObjectStoreBlobs:
    s = ObjectStoreBlobs(js)
    await s.ensure()
    return s


async def stream_msgs(js: Any, store: ObjectStoreBlobs) -> int:
    return int((await js.stream_info(store.stream)).state.messages)


def write_random(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1024 * 1024))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A folder for downloads (tmp_path also holds the nats-server's store)."""
    return tmp_path / "out"


async def test_is_a_blob_store(store: ObjectStoreBlobs) -> None:
    assert isinstance(store, BlobStore)


async def test_file_round_trip_5mb(store: ObjectStoreBlobs, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    info = await store.put_file(src)
    assert info == BlobInfo(f"sha256/{sha(data)}", sha(data), len(data))
    dest = tmp_path / "out" / "dest.bin"
    got = await store.get_to_file(info.sha256, dest)
    assert got == info
    assert dest.read_bytes() == data
    assert leftovers(dest.parent) == ["dest.bin"]


async def test_bytes_round_trip_and_exists(store: ObjectStoreBlobs) -> None:
    data = b"hello blobs"
    assert await store.exists(sha(data)) is None
    info = await store.put_bytes(data)
    assert info.key == f"sha256/{sha(data)}" and info.size == len(data)
    assert await store.exists(sha(data)) == info
    assert await store.get_bytes(sha(data), max_size=100) == data


async def test_empty_blob(store: ObjectStoreBlobs, tmp_path: Path) -> None:
    info = await store.put_bytes(b"")
    assert info.size == 0
    assert await store.get_bytes(info.sha256, max_size=0) == b""
    await store.get_to_file(info.sha256, tmp_path / "empty")
    assert (tmp_path / "empty").read_bytes() == b""


async def test_put_is_idempotent(store: ObjectStoreBlobs, js: Any, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "src"
    src.write_bytes(data)
    first = await store.put_file(src)
    count = await stream_msgs(js, store)
    assert await store.put_file(src) == first
    assert await store.put_file(src, sha256=first.sha256) == first
    assert await store.put_bytes(data) == first
    assert await stream_msgs(js, store) == count  # nothing sent again


async def test_concurrent_puts_keep_one_copy(store: ObjectStoreBlobs, js: Any) -> None:
    data = os.urandom(5 * 128 * 1024)
    infos = await asyncio.gather(*(store.put_bytes(data) for _ in range(4)))
    assert len(set(infos)) == 1
    assert await stream_msgs(js, store) == 5 + 1  # one set of chunks and one meta: no orphans
    assert await store.get_bytes(sha(data), max_size=len(data)) == data


async def test_put_with_wrong_sha_stores_nothing(
    store: ObjectStoreBlobs, js: Any, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(400_000))
    before = await stream_msgs(js, store)
    wrong = sha(b"something else")
    with pytest.raises(BlobCorrupt):
        await store.put_file(src, sha256=wrong)
    assert await store.exists(wrong) is None
    assert await stream_msgs(js, store) == before  # chunks purged


async def test_missing_blob(store: ObjectStoreBlobs, out: Path) -> None:
    missing = sha(b"never stored")
    with pytest.raises(BlobNotFound):
        await store.get_to_file(missing, out / "x")
    with pytest.raises(BlobNotFound):
        await store.get_bytes(missing, max_size=10)
    assert leftovers(out) == []


async def test_corrupt_blob_is_detected(store: ObjectStoreBlobs, js: Any, out: Path) -> None:
    good, evil = b"the real bytes" * 1000, b"other bytes" * 1000
    raw = await js.object_store(store.bucket)
    await raw.put(f"sha256/{sha(good)}", evil)  # a consistent object, under the wrong key
    with pytest.raises(BlobCorrupt):
        await store.get_to_file(sha(good), out / "dest")
    assert leftovers(out) == []  # no dest, no temp file
    with pytest.raises(BlobCorrupt):
        await store.get_bytes(sha(good), max_size=1 << 20)


async def test_tampered_chunks_are_detected(store: ObjectStoreBlobs, js: Any, out: Path) -> None:
    chunk = 128 * 1024
    data = os.urandom(3 * chunk)
    info = await store.put_bytes(data)
    raw = await js.object_store(store.bucket)
    subject = f"$O.{store.bucket}.C.{(await raw.get_info(info.key)).nuid}"
    first = await js.get_msg(store.stream, subject=subject, seq=1, next=True)
    # Replace the first chunk with other bytes of the same size: count and size still match.
    await js.delete_msg(store.stream, first.seq)
    await js.publish(subject, os.urandom(chunk))
    with pytest.raises(BlobCorrupt, match="corrupt"):
        await store.get_to_file(info.sha256, out / "dest")
    assert leftovers(out) == []
    # Drop a chunk: the blob is truncated.
    second = await js.get_msg(store.stream, subject=subject, seq=first.seq + 1, next=True)
    await js.delete_msg(store.stream, second.seq)
    with pytest.raises(BlobCorrupt, match="truncated"):
        await store.get_bytes(info.sha256, max_size=len(data))


async def test_max_size(store: ObjectStoreBlobs, out: Path) -> None:
    info = await store.put_bytes(b"x" * 1000)
    with pytest.raises(BlobTooLarge):
        await store.get_to_file(info.sha256, out / "dest", max_size=999)
    with pytest.raises(BlobTooLarge):
        await store.get_bytes(info.sha256, max_size=10)
    assert leftovers(out) == []
    assert await store.get_bytes(info.sha256, max_size=1000) == b"x" * 1000


async def test_cancelled_download_leaves_nothing(
    store: ObjectStoreBlobs, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = await store.put_bytes(os.urandom(4 * 1024 * 1024))
    started = threading.Event()
    write_many = FileSink.write_many

    def slow_write_many(self: FileSink, parts: Any) -> None:
        started.set()
        time.sleep(0.2)
        write_many(self, parts)

    monkeypatch.setattr(FileSink, "write_many", slow_write_many)
    monkeypatch.setattr("asman.log.objstore._READ_BATCH", 4)
    task = asyncio.ensure_future(store.get_to_file(info.sha256, out / "dest"))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(out) == []  # the writing thread was waited for, the temp file removed


async def test_cannot_presign(store: ObjectStoreBlobs) -> None:
    info = await store.put_bytes(b"abc")
    assert await store.presigned_get(info.sha256) is None
    assert await store.presigned_put(info.sha256) is None


async def test_rejects_bad_sha(store: ObjectStoreBlobs, tmp_path: Path) -> None:
    for bad in ["", "abc", "A" * 64, "g" * 64, "../" + "a" * 61]:
        with pytest.raises(BlobError, match="not a sha256"):
            await store.exists(bad)
        with pytest.raises(BlobError, match="not a sha256"):
            await store.get_to_file(bad, tmp_path / "x")


async def test_interoperates_with_nats_py_object_store(
    store: ObjectStoreBlobs, js: Any, tmp_path: Path
) -> None:
    raw = await js.object_store(store.bucket)
    ours = os.urandom(700_000)
    info = await store.put_bytes(ours)
    assert (await raw.get(info.key)).data == ours
    theirs = os.urandom(500_000)
    await raw.put(f"sha256/{sha(theirs)}", theirs)
    assert await store.get_bytes(sha(theirs), max_size=1 << 20) == theirs


async def test_deleted_blob_is_missing_and_can_be_put_again(
    store: ObjectStoreBlobs, js: Any
) -> None:
    info = await store.put_bytes(b"short lived")
    raw = await js.object_store(store.bucket)
    await raw.delete(info.key)
    assert await store.exists(info.sha256) is None
    assert await store.put_bytes(b"short lived") == info
    assert await store.get_bytes(info.sha256, max_size=100) == b"short lived"


async def test_ensure_is_idempotent_and_updates(js: Any) -> None:
    store = ObjectStoreBlobs(js, bucket="B2")
    await store.ensure()
    await store.ensure()
    aged = ObjectStoreBlobs(js, bucket="B2", max_age_s=3600)
    await aged.ensure()
    cfg = (await js.stream_info("OBJ_B2")).config
    assert cfg.max_age == 3600 and cfg.allow_direct
    await store.ensure()  # a peer with default settings leaves the operator's limits alone
    assert (await js.stream_info("OBJ_B2")).config.max_age == 3600
    await ObjectStoreBlobs(js, bucket="B2", max_age_s=0).ensure()  # 0 removes the limit
    assert not (await js.stream_info("OBJ_B2")).config.max_age


async def test_missing_bucket(js: Any) -> None:
    store = ObjectStoreBlobs(js, bucket="NOPE")
    with pytest.raises(BlobError, match="ensure"):
        await store.exists(sha(b"x"))
    with pytest.raises(BlobError, match="ensure"):
        await store.put_bytes(b"x")


async def test_closed_connection(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    store = ObjectStoreBlobs(nc.jetstream(timeout=1))
    await store.ensure()
    await nc.close()
    with pytest.raises(BlobError):
        await store.exists(sha(b"x"))


async def test_reads_another_domain_through_a_leaf_node(tmp_path: Path) -> None:
    """A leaf with its own JetStream domain reaches the hub's bucket only via the domain prefix."""
    leaf_port = free_port()
    hub_conf = tmp_path / "hub.conf"
    hub_conf.write_text(
        f'server_name: hub\njetstream {{ store_dir: "{tmp_path / "hub"}", domain: hub }}\n'
        f"leafnodes {{ listen: 127.0.0.1:{leaf_port} }}\n"
    )
    leaf_conf = tmp_path / "leaf.conf"
    leaf_conf.write_text(
        f'server_name: leaf\njetstream {{ store_dir: "{tmp_path / "leaf"}", domain: leaf }}\n'
        f'leafnodes {{ remotes = [ {{ urls: ["nats-leaf://127.0.0.1:{leaf_port}"] }} ] }}\n'
    )
    hub = NatsServer(tmp_path / "hub", config=hub_conf)
    leaf = NatsServer(tmp_path / "leaf", config=leaf_conf)
    await asyncio.to_thread(hub.start)
    try:
        await asyncio.to_thread(leaf.start)
        try:
            hub_nc = await nats.connect(hub.url)
            leaf_nc = await nats.connect(leaf.url)
            try:
                data = os.urandom(2_000_000)
                on_hub = ObjectStoreBlobs(hub_nc.jetstream())
                await on_hub.ensure()
                info = await on_hub.put_bytes(data)
                await asyncio.sleep(0.3)  # leaf interest propagation
                via_leaf = ObjectStoreBlobs(leaf_nc.jetstream(domain="hub"))
                assert await via_leaf.exists(info.sha256) == info
                assert await via_leaf.get_bytes(info.sha256, max_size=len(data)) == data
                local = ObjectStoreBlobs(leaf_nc.jetstream())  # the leaf's own domain
                with pytest.raises(BlobError, match="ensure"):
                    await local.get_bytes(info.sha256, max_size=len(data))
            finally:
                await leaf_nc.close()
                await hub_nc.close()
        finally:
            await asyncio.to_thread(leaf.stop)
    finally:
        await asyncio.to_thread(hub.stop)


@pytest.mark.slow
async def test_50mb_round_trip(store: ObjectStoreBlobs, tmp_path: Path) -> None:
    src = tmp_path / "big"
    await asyncio.to_thread(write_random, src, 50)
    hexdigest, size = await asyncio.to_thread(sha256_file, src)
    info = await store.put_file(src, sha256=hexdigest)
    assert info.size == size == 50 * 1024 * 1024
    dest = tmp_path / "copy"
    assert await store.get_to_file(hexdigest, dest) == info
    assert await asyncio.to_thread(sha256_file, dest) == (hexdigest, size)


async def test_a_full_bucket_refuses_clearly_and_keeps_nothing_of_the_blob(
    js: Any, tmp_path: Path
) -> None:
    """Issue 13: the bucket had no size limit, so one job's outputs could fill the storage the
    log needs. A bucket at its limit refuses the blob with a reason, and the chunks sent
    before the refusal are purged."""
    store = ObjectStoreBlobs(js, bucket="SMALL", max_bytes=1024 * 1024)
    await store.ensure()
    assert (await js.stream_info("OBJ_SMALL")).config.max_bytes == 1024 * 1024
    big = tmp_path / "big"
    write_random(big, 3)
    with pytest.raises(BlobFull, match="is full") as caught:
        await store.put_file(big)
    assert "--blob-max-bytes" in str(caught.value)
    assert await stream_msgs(js, store) == 0  # the partial upload is gone
    assert await store.exists(sha256_file(big)[0]) is None
    small = await store.put_bytes(b"still room for this")
    assert await store.get_bytes(small.sha256, max_size=100) == b"still room for this"


async def test_a_new_bucket_has_a_size_limit_and_an_operator_may_change_it(js: Any) -> None:
    await ObjectStoreBlobs(js, bucket="B3").ensure()
    assert (await js.stream_info("OBJ_B3")).config.max_bytes == 10 * 1024**3
    await ObjectStoreBlobs(js, bucket="B3", max_bytes=2 * 1024**3).ensure()
    assert (await js.stream_info("OBJ_B3")).config.max_bytes == 2 * 1024**3
    await ObjectStoreBlobs(js, bucket="B3").ensure()  # defaults leave the operator's limit
    assert (await js.stream_info("OBJ_B3")).config.max_bytes == 2 * 1024**3
    await ObjectStoreBlobs(js, bucket="B3", max_bytes=0).ensure()  # 0 removes it
    assert (await js.stream_info("OBJ_B3")).config.max_bytes == -1


async def test_a_small_server_gets_the_largest_limit_it_can_reserve(tmp_path: Path) -> None:
    """A laptop's nats-server may have less than 10 GiB to reserve: the default bucket then
    takes what the server grants instead of failing; an explicit limit it cannot reserve is
    an error that names the fix."""
    conf = tmp_path / "small.conf"
    conf.write_text(f'jetstream {{ store_dir: "{tmp_path / "js"}", max_file_store: 1GB }}\n')
    server = NatsServer(tmp_path, config=conf).start()
    try:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ObjectStoreBlobs(js).ensure()
            granted = (await js.stream_info("OBJ_ASMAN_BLOBS")).config.max_bytes
            assert 64 * 1024**2 <= granted <= 1024**3
            with pytest.raises(BlobError, match=r"cannot reserve.*max_file_store"):
                await ObjectStoreBlobs(js, bucket="BIG", max_bytes=5 * 1024**3).ensure()
        finally:
            await nc.close()
    finally:
        server.stop()
