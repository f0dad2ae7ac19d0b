"""Latency: jobs submitted one at a time to an idle worker; against a raw JetStream round trip.

Asman: one ``Worker`` (1 slot, the benchmark-only ``NoopRuntime``) waits on an empty queue.
A client subscribes to the queue's job subjects, verifies every event it receives
(``wire.open_envelope``: a client believes only verified events), and submits N jobs one
after the other, each once the previous one's result is visible. Per job:

* submit→started: from calling ``jobs.submit`` to receiving the worker's verified ``started``;
* submit→result visible: to receiving the verified ``finished``.

Raw: a work-queue stream (file storage) and a pull consumer waiting in ``fetch(1)``; the client
publishes a message with ``js.publish`` (acked by the stream), the consumer acks it and answers
on a core NATS subject the client listens to. From publish to answer: one JetStream request /
reply round trip through a work queue, the floor for "submit → a worker reacts".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from asman.errors import EnvelopeError
from asman.log import jobs, subjects, wire
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.objstore import ObjectStoreBlobs
from asman.peer.worker import Worker, WorkerConfig
from bench.common import log, median, nats_server, percentile, scratch, table
from bench.noop import NoopRuntime

QUEUE = "latency"


async def asman_latency(
    url: str, n: int, data_dir: Any, tag: str = ""
) -> tuple[list[float], list[float]]:
    async with (
        Log(LogConfig(servers=(url,)), PeerKey.generate()) as client,
        Log(LogConfig(servers=(url,), echo=False), PeerKey.generate()) as wlog,
    ):
        blobs = ObjectStoreBlobs(wlog.js)
        await blobs.ensure()
        worker = Worker(
            wlog,
            blobs,
            NoopRuntime(),
            WorkerConfig(queues=(QUEUE,), data_dir=data_dir, slots=1, heartbeat_s=30.0),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        seen: dict[tuple[str, str], float] = {}
        arrived = asyncio.Event()

        async def on_event(msg: Msg) -> None:
            now = time.perf_counter()
            try:
                opened = wire.open_envelope(msg.data, msg.subject)
            except EnvelopeError:
                return
            seen.setdefault((msg.subject, str(opened.event.get("type"))), now)
            arrived.set()

        sub = await client.nc.subscribe(subjects.jobs_filter(QUEUE), cb=on_event)
        started: list[float] = []
        finished: list[float] = []
        try:
            await asyncio.sleep(0.5)  # the worker is up and waiting in fetch
            for i in range(n + 5):  # the first 5 warm up
                definition = {"image": "asman/busybox:local", "command": ["true", tag, str(i)]}
                t = time.perf_counter()
                sub_result = await jobs.submit(client, QUEUE, definition)
                subject = subjects.job_subject(QUEUE, sub_result.job_id)
                async with asyncio.timeout(30):
                    while (subject, "finished") not in seen:
                        arrived.clear()
                        await arrived.wait()
                if i >= 5:
                    started.append((seen[(subject, "started")] - t) * 1000)
                    finished.append((seen[(subject, "finished")] - t) * 1000)
        except BaseException as exc:
            log(f"latency: stopped after {len(started)} jobs: {exc!r}")
            raise
        finally:
            await sub.unsubscribe()
            stop.set()
            await task
    return started, finished


async def raw_latency(url: str, n: int) -> list[float]:
    nc = await nats.connect(url)
    worker_nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name="RAWLAT",
                subjects=["rawlat.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
        wjs = worker_nc.jetstream()
        await wjs.add_consumer(
            "RAWLAT",
            ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0),
        )
        psub = await wjs.pull_subscribe_bind(durable="w", stream="RAWLAT")

        async def serve() -> None:
            while True:
                try:
                    msgs = await psub.fetch(1, timeout=5.0)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await msg.ack()
                    await worker_nc.publish("rawlat-reply", msg.data)

        answered: asyncio.Queue[float] = asyncio.Queue()

        async def on_reply(msg: Msg) -> None:
            answered.put_nowait(time.perf_counter())

        await nc.subscribe("rawlat-reply", cb=on_reply)
        server = asyncio.create_task(serve())
        out: list[float] = []
        try:
            await asyncio.sleep(0.2)
            for i in range(n + 5):
                t = time.perf_counter()
                await js.publish(f"rawlat.{i}", b"0" * 64)
                async with asyncio.timeout(10):
                    got = await answered.get()
                if i >= 5:
                    out.append((got - t) * 1000)
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
        return out
    finally:
        await worker_nc.close()
        await nc.close()


def _stats(xs: list[float]) -> dict[str, float]:
    return {
        "p50": median(xs),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "max": max(xs),
    }


async def run(n: int = 300) -> dict[str, Any]:
    with nats_server("latency") as server, scratch("latency", fast=True) as work:
        raw = await raw_latency(server.url, n)
        log(f"latency raw p50={median(raw):.2f} ms")
        started, finished = await asman_latency(server.url, n, work / "worker")
    started_s, raw_s = _stats(started), _stats(raw)
    return {
        "n_jobs": n,
        "submit_started_ms": started_s,
        "submit_result_visible_ms": _stats(finished),
        "raw_request_reply_ms": raw_s,
        "submit_started_p50_ms": started_s["p50"],
        "submit_started_p99_ms": started_s["p99"],
        "raw_request_reply_p50_ms": raw_s["p50"],
    }


def render(r: dict[str, Any]) -> str:
    rows = []
    for label, key in (
        ("Asman submit → started", "submit_started_ms"),
        ("Asman submit → result visible", "submit_result_visible_ms"),
        ("raw JetStream publish → worker's reply", "raw_request_reply_ms"),
    ):
        s = r[key]
        rows.append([label, s["p50"], s["p90"], s["p99"], s["max"]])
    return table(
        f"Latency, {r['n_jobs']} jobs one at a time, idle worker (ms)",
        ["what", "p50", "p90", "p99", "max"],
        rows,
    )
