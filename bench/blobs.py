"""Blob store throughput: ours against the raw client, same machine, same run.

Starts a nats-server (JetStream) and a SeaweedFS S3 server on loopback, writes one random file
(50 MiB by default) and times, per store:

* objstore: ``ObjectStoreBlobs.put_file``/``get_to_file`` vs nats-py ``obs.put(name, file)`` /
  ``obs.get(name, writeinto=file)`` / ``obs.get(name)`` (in memory);
* S3: ``S3Blobs.put_file``/``get_to_file`` vs minio ``put_object`` (16 MiB parts) /
  ``get_object`` streamed to a file in 1 MiB reads.

"ours" always does more than "raw": it hashes the file before a put (sha256 not given), checks
whether the blob exists, verifies the digest, and on a get verifies SHA-256 and size and renames
a temp file into place. MiB/s is size / wall time; the median and best of ``--repeat`` runs.

Run: ``.venv/bin/python bench/blobs.py [--size-mb 50] [--repeat 3] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS helper lives with the tests

from s3server import SeaweedS3  # noqa: E402

from asman.log.blobs import sha256_file  # noqa: E402
from asman.log.objstore import ObjectStoreBlobs  # noqa: E402
from asman.log.server import NatsServer  # noqa: E402
from asman.peer.s3 import PART_SIZE, S3Blobs  # noqa: E402

MIB = 1024 * 1024


@dataclass(frozen=True)
class Row:
    store: str
    op: str
    impl: str
    mib_s_median: float
    mib_s_best: float


async def _timed(
    size: int,
    repeat: int,
    fn: Callable[[], Awaitable[Any]],
    before: Callable[[], Awaitable[Any]] | None = None,
) -> tuple[float, float]:
    rates = []
    for _ in range(repeat):
        if before is not None:
            await before()
        t = time.perf_counter()
        await fn()
        rates.append(size / (time.perf_counter() - t) / MIB)
    return statistics.median(rates), max(rates)


async def bench_objstore(
    url: str, src: Path, size: int, digest: str, work: Path, repeat: int, memory_get: bool = True
) -> list[Row]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        ours = ObjectStoreBlobs(js)
        await ours.ensure()
        raw = await js.object_store(ours.bucket)
        key = f"sha256/{digest}"
        rows = []

        async def drop() -> None:
            if await ours.exists(digest) is not None:
                await raw.delete(key)

        m, b = await _timed(size, repeat, lambda: ours.put_file(src), before=drop)
        rows.append(Row("objstore", "put", "ours (hash file, put, verify)", m, b))
        m, b = await _timed(size, repeat, lambda: ours.put_file(src, sha256=digest), before=drop)
        rows.append(Row("objstore", "put", "ours (sha256 given, put, verify)", m, b))

        async def raw_put() -> None:
            f = await asyncio.to_thread(open, src, "rb")
            try:
                await raw.put("raw-object", f)
            finally:
                f.close()

        m, b = await _timed(size, repeat, raw_put)
        rows.append(Row("objstore", "put", "nats-py obs.put(file)", m, b))

        await ours.put_file(src, sha256=digest)
        m, b = await _timed(size, repeat, lambda: ours.get_to_file(digest, work / "ours.bin"))
        rows.append(Row("objstore", "get", "ours (direct get, verified)", m, b))

        async def raw_get_into() -> None:
            f = await asyncio.to_thread(open, work / "raw.bin", "wb")
            try:
                await raw.get("raw-object", writeinto=f)
            finally:
                f.close()

        m, b = await _timed(size, repeat, raw_get_into)
        rows.append(Row("objstore", "get", "nats-py obs.get(writeinto=file)", m, b))
        if memory_get:  # ~5 MiB/s: skipped for large files
            m, b = await _timed(size, 1, lambda: raw.get("raw-object"))
            rows.append(Row("objstore", "get", "nats-py obs.get() (memory, 1 run)", m, b))
        return rows
    finally:
        await nc.close()


async def bench_s3(
    server: SeaweedS3, src: Path, size: int, digest: str, work: Path, repeat: int
) -> list[Row]:
    client = server.client()
    bucket = "bench-blobs"
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    ours = S3Blobs(server.endpoint, server.access_key, server.secret_key, bucket, secure=False)
    rows = []

    async def drop() -> None:
        await asyncio.to_thread(client.remove_object, bucket, f"sha256/{digest}")

    m, b = await _timed(size, repeat, lambda: ours.put_file(src), before=drop)
    rows.append(Row("s3", "put", "ours (hash file, put, verify)", m, b))
    m, b = await _timed(size, repeat, lambda: ours.put_file(src, sha256=digest), before=drop)
    rows.append(Row("s3", "put", "ours (sha256 given, put, verify)", m, b))

    def raw_put() -> None:
        with open(src, "rb") as f:
            client.put_object(bucket, "raw-object", f, size, part_size=PART_SIZE)

    m, b = await _timed(size, repeat, lambda: asyncio.to_thread(raw_put))
    rows.append(Row("s3", "put", "minio put_object", m, b))

    m, b = await _timed(size, repeat, lambda: ours.get_to_file(digest, work / "ours-s3.bin"))
    rows.append(Row("s3", "get", "ours (verified)", m, b))

    def raw_get() -> None:
        resp = client.get_object(bucket, "raw-object")
        try:
            with open(work / "raw-s3.bin", "wb") as f:
                for data in resp.stream(MIB):
                    f.write(data)
        finally:
            resp.close()
            resp.release_conn()

    m, b = await _timed(size, repeat, lambda: asyncio.to_thread(raw_get))
    rows.append(Row("s3", "get", "minio get_object (1 MiB reads)", m, b))
    return rows


def write_random(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))


async def run(size_mb: int = 50, repeat: int = 3, memory_get: bool = True) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="asman-bench-blobs-"))
    nats_server = NatsServer(work / "nats")
    s3 = SeaweedS3(work / "s3")
    try:
        src = work / "src.bin"
        await asyncio.to_thread(write_random, src, size_mb)
        digest, size = await asyncio.to_thread(sha256_file, src)
        # One server at a time: on a 2-core box an idle peer still takes CPU.
        await asyncio.to_thread(nats_server.start)
        rows = await bench_objstore(
            nats_server.url, src, size, digest, work, repeat, memory_get=memory_get
        )
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(s3.start)
        rows += await bench_s3(s3, src, size, digest, work, repeat)
        for name in ("ours.bin", "ours-s3.bin"):
            copy, _ = await asyncio.to_thread(sha256_file, work / name)
            assert copy == digest, f"{name} differs from the source"
        return rows
    finally:
        await asyncio.to_thread(s3.stop)
        await asyncio.to_thread(nats_server.stop)
        shutil.rmtree(work, ignore_errors=True)


def render(rows: list[Row], size_mb: int, repeat: int) -> str:
    lines = [
        f"blob stores, {size_mb} MiB random file, median/best of {repeat} runs (MiB/s)",
        f"{'store':<9} {'op':<4} {'implementation':<36} {'median':>8} {'best':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r.store:<9} {r.op:<4} {r.impl:<36} {r.mib_s_median:>8.0f} {r.mib_s_best:>8.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.size_mb, args.repeat))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(render(rows, args.size_mb, args.repeat))


if __name__ == "__main__":
    main()
