"""Queues cost the server subjects, not consumers (issue 18), against a real nats-server.

The 2,000-queue test runs the benchmarks' no-op runtime instead of Docker: 2,000 containers
would take about seven minutes on this machine, and what is under test is the claim path
(finding, claiming and finishing each job on the log), not the container; every event is
still signed, compare-and-set and verified on a real server.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from asman.log import jobs, subjects, wire
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.objstore import ObjectStoreBlobs
from asman.log.workers import WorkerInfo, beat
from asman.peer.worker import Worker, WorkerConfig
from bench.noop import NoopRuntime

QUEUES = [f"many-{i:04d}" for i in range(2000)]


async def submit_each(client: Log, queues: list[str]) -> dict[str, str]:
    sem = asyncio.Semaphore(128)

    async def one(q: str) -> tuple[str, str]:
        async with sem:
            done = await jobs.submit(client, q, {"image": "asman/busybox:local", "command": q})
            return q, done.job_id

    return dict(await asyncio.gather(*(one(q) for q in queues)))


async def consumers(log: Log) -> int:
    total = 0
    names = (subjects.JOBS_STREAM, subjects.WAITING_STREAM, subjects.LOGS_STREAM)
    for name in (*names, subjects.WORKERS_STREAM):
        total += int((await log.js.stream_info(name)).state.consumer_count or 0)
    return total


async def test_a_worker_on_2000_queues_runs_a_job_on_each(nats_url: str, tmp_path: Path) -> None:
    """Past the wall: with a consumer per (queue, class), the 1,001st was refused (nats-server
    2.15's default of 1,000 consumers a stream). Half the jobs wait before the worker starts
    (its scans find them), half come after (its subscriptions bring them)."""
    async with (
        Log(LogConfig(servers=(nats_url,)), PeerKey.generate()) as client,
        Log(LogConfig(servers=(nats_url,), echo=False), PeerKey.generate()) as wlog,
    ):
        # each finished job's waiting entry becomes a tombstone: heard live, one per job
        finished: set[str] = set()
        all_done = asyncio.Event()

        def on_entry(subject: str, data: bytes) -> None:
            key, entry = subjects.waiting_key(subject), wire.parse_entry(data)
            if key is not None and entry is not None and entry.kind == wire.ENTRY_DONE:
                finished.add(key[2])
                if len(finished) == len(QUEUES):
                    all_done.set()

        unsubscribe = await client.on_message(f"{subjects.PREFIX}.waiting.*.*.*", on_entry)
        before = await submit_each(client, QUEUES[:1000])
        blobs = ObjectStoreBlobs(wlog.js)
        await blobs.ensure()
        runtime = NoopRuntime()
        config = WorkerConfig(
            queues=tuple(QUEUES), data_dir=tmp_path / "w", slots=8, heartbeat_s=120.0
        )
        worker = Worker(wlog, blobs, runtime, config)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            after = await submit_each(client, QUEUES[1000:])
            ended = asyncio.ensure_future(all_done.wait())
            await asyncio.wait([ended, task], timeout=120, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            assert not task.done(), task  # a worker never ends on its own
            assert all_done.is_set(), f"{len(finished)} of {len(QUEUES)} jobs finished"
        finally:
            stop.set()
            await task
            await unsubscribe()
        ids = {**before, **after}
        sample = QUEUES[::97]
        for q in sample:
            state = await jobs.read_job(client, q, ids[q])
            assert state is not None and state.reason == "success" and state.claims == 1
            assert state.result is not None and state.result.worker == wlog.peer_id
        assert runtime.runs == len(QUEUES)
        assert await consumers(client) == 0


async def test_a_queue_with_no_activity_leaves_nothing_behind(
    nats_url: str, tmp_path: Path
) -> None:
    """Retention of 2 s: a queue's job events, waiting entry, log chunks and heartbeats all
    age out on their own, and there is no consumer to delete."""
    config = LogConfig(servers=(nats_url,), retention_s=2, logs_retention_s=2, heartbeat_ttl_s=2)
    async with Log(config, PeerKey.generate()) as log:
        queue = "fleeting"
        submitted = await jobs.submit(log, queue, {"image": "asman/busybox:local", "command": "x"})
        await beat(log, WorkerInfo(log.peer_id, queue, slots=1, free_slots=1))

        async def left() -> dict[str, int]:
            out = {}
            for stream, flt in (
                (subjects.JOBS_STREAM, subjects.jobs_filter(queue)),
                (subjects.WAITING_STREAM, subjects.waiting_filter(queue)),
                (subjects.LOGS_STREAM, f"asman.logs.{queue}.*"),
                (subjects.WORKERS_STREAM, subjects.workers_filter(queue)),
            ):
                info = await log.js.stream_info(stream, subjects_filter=flt)
                out[stream] = sum((info.state.subjects or {}).values())
            return out

        assert (await left())[subjects.JOBS_STREAM] == 1
        assert await jobs.read_job(log, queue, submitted.job_id) is not None
        # the server ages messages out on its own clock and announces nothing: ask it again
        # until nothing is left, and fail past the deadline
        deadline = time.monotonic() + 30
        while any((remaining := await left()).values()):
            assert time.monotonic() < deadline, remaining
            await asyncio.sleep(0.2)
        assert await jobs.read_job(log, queue, submitted.job_id) is None
        assert await consumers(log) == 0
