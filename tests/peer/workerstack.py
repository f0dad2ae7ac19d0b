"""A worker stack for tests (see conftest.py): a real nats-server, real Docker workers and
the JetStream object store, with helpers to run jobs and read what they left."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import docker
from faults import stopped

from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.events import JobState
from asman.log.keys import PeerKey
from asman.log.logstream import read_logs
from asman.log.objstore import ObjectStoreBlobs
from asman.peer.docker import DockerRuntime
from asman.peer.outputs import load_outputs
from asman.peer.worker import Worker, WorkerConfig

IMAGE = "asman/busybox:local"


class Stack:
    def __init__(self, nats_url: str, tmp: Path) -> None:
        self.nats_url = nats_url
        self.tmp = tmp
        self.client: Log | None = None
        self.tasks: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
        self.logs: list[Log] = []

    async def log(self, **overrides: Any) -> Log:
        cfg = LogConfig(**{"servers": (self.nats_url,), **overrides})
        log = Log(cfg, PeerKey.generate())
        await log.connect()
        self.logs.append(log)
        return log

    async def blobs(self, log: Log) -> ObjectStoreBlobs:
        store = ObjectStoreBlobs(log.js)
        await store.ensure()
        return store

    async def start_worker(
        self, queue: str, *, blobs: Any = None, via: str | None = None, **overrides: Any
    ) -> Worker:
        """A worker on ``queue`` in a task of this stack; ``via``: the NATS URL it connects
        to (a ``faults.LinkProxy`` in front of the server), else the server's."""
        log = await self.log(
            servers=(via or self.nats_url,), lease_ttl_s=overrides.pop("lease_ttl_s", 30.0)
        )
        runtime = DockerRuntime()
        await runtime.__aenter__()
        cfg = WorkerConfig(
            queues=overrides.pop("queues", (queue,)),
            data_dir=self.tmp / f"worker{len(self.tasks)}",
            drain_grace_s=overrides.pop("drain_grace_s", 5.0),
            kill_grace_s=1.0,
            heartbeat_s=1.0,
            **overrides,
        )
        worker = Worker(log, blobs or await self.blobs(log), runtime, cfg)
        stop = asyncio.Event()

        async def run() -> None:
            try:
                await worker.run(stop)
            finally:
                await runtime.__aexit__(None, None, None)

        self.tasks.append((stop, asyncio.create_task(run())))
        return worker

    async def close(self) -> None:
        """Stop every worker; fails the test when one crashed (its task ended with an
        exception) or hung (did not stop within 30 s of being told to)."""
        for stop, _ in self.tasks:
            stop.set()
        faults: list[str] = []
        for i, (_, task) in enumerate(self.tasks):
            faults += await stopped(task, f"worker {i}")
        for log in self.logs:
            await log.close()
        if faults:
            raise AssertionError("; ".join(faults))


async def run_job(
    client: Log, queue: str, definition: dict[str, Any], timeout: float = 60
) -> JobState:
    sub = await jobs.submit(client, queue, definition)
    return await jobs.wait_finished(client, queue, sub.job_id, timeout)


async def output_bytes(blobs: Any, state: JobState) -> dict[str, bytes]:
    assert state.result is not None
    out = {}
    for f in await load_outputs(blobs, state.result):
        out[f.path] = (
            f.blob.data
            if f.blob.data is not None
            else await blobs.get_bytes(f.blob.sha256, max_size=10**9)
        )
    return out


async def job_text(client: Log, state: JobState) -> dict[str, str]:
    chunks, _ = await read_logs(client, state)
    text: dict[str, str] = {}
    for c in chunks:
        text[c.stream] = text.get(c.stream, "") + c.data.decode()
    return text


def containers_of(job_id: str) -> list[Any]:
    client = docker.from_env()
    try:
        return client.containers.list(all=True, filters={"label": f"asman.job={job_id}"})
    finally:
        client.close()
