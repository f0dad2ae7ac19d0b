"""Queue path: enqueue N jobs, one worker process drains them; against raw JetStream.

Asman: ``jobs.submit`` (validate, job id, signed ``submitted`` by CAS, waiting-index entry) with
``ENQUEUE_CONCURRENCY`` submits in flight; then one ``Worker`` with the benchmark-only
``NoopRuntime`` (every job an instant success) drains the queue with 1 slot and with 10:
find it in the waiting index (live), signed ``claimed`` by CAS while the job is read and
verified, ``started`` and ``finished`` by CAS, the index entry marked done. The drain runs
in this process while nothing else does (the enqueuer is idle).

Raw: the same stream settings as the dispatch stream (work queue, file storage, R1); publish N
messages with ``js.publish`` (same concurrency), then a durable pull consumer drains them with
``fetch(1)`` + ``ack_sync()``, one at a time or 10 in flight.

Also measured: the lease protocol alone (``drain_protocol``: take, claim, start, finish
in 1 or 10 loops, no ``Worker`` around it), which splits the cost between the log layer and
the worker's own per-job work (job folder, log file, watcher, runtime calls).

Each repetition runs raw and Asman back to back; figures are medians over repetitions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.objstore import ObjectStoreBlobs
from asman.log.policy import Policy, new_private_queue
from asman.log.queues import write_policy
from asman.peer.worker import Worker, WorkerConfig
from bench.claiming import Claimer
from bench.common import log, median, nats_server, scratch, table
from bench.noop import NoopRuntime

ENQUEUE_CONCURRENCY = 32
IMAGE = "asman/busybox:local"


def definition(run: str, i: int) -> dict[str, Any]:
    return {"image": IMAGE, "command": ["true", run, str(i)]}


async def enqueue_asman(client: Log, queue: str, n: int) -> float:
    sem = asyncio.Semaphore(ENQUEUE_CONCURRENCY)

    async def one(i: int) -> None:
        async with sem:
            await jobs.submit(client, queue, definition(queue, i))

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t)


async def drain_asman(
    url: str, queue: str, n: int, slots: int, data_dir: Path, key: PeerKey | None = None
) -> float:
    async with Log(LogConfig(servers=(url,), echo=False), key or PeerKey.generate()) as wlog:
        blobs = ObjectStoreBlobs(wlog.js)
        await blobs.ensure()
        runtime = NoopRuntime()
        cfg = WorkerConfig(
            queues=(queue,),
            data_dir=data_dir,
            slots=slots,
            heartbeat_s=30.0,
            sweep_interval_s=3600.0,
        )
        worker = Worker(wlog, blobs, runtime, cfg)
        stop = asyncio.Event()
        t = time.perf_counter()
        task = asyncio.create_task(worker.run(stop))
        try:
            async with asyncio.timeout(max(120.0, n / 20)):
                while worker.jobs_done < n:
                    if task.done():
                        task.result()
                        raise RuntimeError("the worker stopped early")
                    # a 5 ms poll: at most 5 ms on a run of seconds, and it takes little CPU
                    # from the worker it measures (a 1 ms poll woke the loop about once a job)
                    await asyncio.sleep(0.005)
            rate = n / (time.perf_counter() - t)
        finally:
            stop.set()
            await task
    if runtime.runs != n:
        raise RuntimeError(f"{runtime.runs} runs for {n} jobs")
    return rate


async def drain_protocol(url: str, queue: str, n: int, inflight: int) -> float:
    """The lease protocol alone, without the worker around it (no job folder, log file,
    watcher or runtime): ``inflight`` loops of take a waiting job, ``claim``, ``start``,
    ``finish``.
    What the log layer costs per job; the worker's own per-job work is the difference."""
    async with Log(LogConfig(servers=(url,), echo=False), PeerKey.generate()) as wlog:
        done = 0
        finished = asyncio.Event()

        claimer = await Claimer(wlog, queue).open()

        async def loop() -> None:
            nonlocal done
            while True:
                lease = await claimer.next(1.0)
                if lease is None:
                    continue
                await lease.start()
                await lease.finish({"reason": "success", "exit_code": 0})
                done += 1
                if done >= n:
                    finished.set()

        t = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            loops = [tg.create_task(loop()) for _ in range(inflight)]
            async with asyncio.timeout(max(120.0, n / 20)):
                await finished.wait()
            rate = n / (time.perf_counter() - t)
            for task in loops:
                task.cancel()
        await claimer.close()
        return rate


async def raw_stream(js: Any) -> None:
    await js.add_stream(
        StreamConfig(
            name="RAWQ",
            subjects=["rawq.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=1,
        )
    )


async def enqueue_raw(js: Any, run: str, n: int) -> float:
    sem = asyncio.Semaphore(ENQUEUE_CONCURRENCY)
    payload = b"0" * 64  # a job id's worth

    async def one(i: int) -> None:
        async with sem:
            await js.publish(f"rawq.{run}.{i}", payload)

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t)


async def drain_raw(url: str, run: str, n: int, inflight: int) -> float:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        durable = f"raw-{run}"
        await js.add_consumer(
            "RAWQ",
            ConsumerConfig(
                durable_name=durable,
                filter_subject=f"rawq.{run}.>",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30.0,
                max_ack_pending=-1,
            ),
        )
        done = 0
        finished = asyncio.Event()

        async def loop() -> None:
            nonlocal done
            # one pull subscription per loop: concurrent fetches on one inbox steal each
            # other's status messages in nats-py
            sub = await js.pull_subscribe_bind(durable=durable, stream="RAWQ")
            while True:
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await msg.ack_sync()
                    done += 1
                    if done >= n:
                        finished.set()

        t = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            loops = [tg.create_task(loop()) for _ in range(inflight)]
            async with asyncio.timeout(max(120.0, n / 20)):
                await finished.wait()
            rate = n / (time.perf_counter() - t)
            for task in loops:
                task.cancel()
        return rate
    finally:
        await nc.close()


async def run(n: int = 2000, repeat: int = 3) -> dict[str, Any]:
    results: dict[str, list[float]] = {
        k: []
        for k in (
            "raw_enqueue",
            "raw_fetch1",
            "raw_fetch1_10",
            "asman_enqueue",
            "asman_drain_1",
            "asman_drain_10",
            "asman_drain_10_private",
            "protocol_1",
            "protocol_10",
        )
    }
    with nats_server("queue") as server, scratch("queue", fast=True) as work:
        async with Log(LogConfig(servers=(server.url,)), PeerKey.generate()) as client:
            await raw_stream(client.js)
            for rep in range(repeat):
                for inflight, key in ((1, "raw_fetch1"), (10, "raw_fetch1_10")):
                    name = f"r{rep}i{inflight}"
                    results["raw_enqueue"].append(await enqueue_raw(client.js, name, n))
                    results[key].append(await drain_raw(server.url, name, n, inflight))
                for slots, key in ((1, "asman_drain_1"), (10, "asman_drain_10")):
                    queue = f"bench-r{rep}-s{slots}"
                    results["asman_enqueue"].append(await enqueue_asman(client, queue, n))
                    results[key].append(
                        await drain_asman(server.url, queue, n, slots, work / queue)
                    )
                # the same drain on a private queue whose policy lists the worker's key
                wkey = PeerKey.generate()
                private = new_private_queue(client.peer_id)
                await write_policy(client, private, _trusting(client, wkey, private))
                await enqueue_asman(client, private, n)
                results["asman_drain_10_private"].append(
                    await drain_asman(server.url, private, n, 10, work / f"p{rep}", wkey)
                )
                for inflight, key in ((1, "protocol_1"), (10, "protocol_10")):
                    queue = f"proto-r{rep}-i{inflight}"
                    await enqueue_asman(client, queue, n)
                    results[key].append(await drain_protocol(server.url, queue, n, inflight))
                log(
                    f"queue rep {rep + 1}/{repeat}: "
                    + ", ".join(f"{k}={v[-1]:.0f}/s" for k, v in results.items())
                )
    med = {k: median(v) for k, v in results.items()}
    return {
        "n_jobs": n,
        "repeat": repeat,
        "enqueue_concurrency": ENQUEUE_CONCURRENCY,
        "samples_jobs_per_s": results,
        "median_jobs_per_s": med,
        "queue_drain_jobs_per_s": med["asman_drain_10"],
        "queue_drain_1slot_jobs_per_s": med["asman_drain_1"],
        "raw_fetch1_jobs_per_s": med["raw_fetch1"],
        "raw_fetch1_10_inflight_jobs_per_s": med["raw_fetch1_10"],
        "enqueue_jobs_per_s": med["asman_enqueue"],
        "raw_enqueue_jobs_per_s": med["raw_enqueue"],
        "drain_vs_raw_fetch1": med["asman_drain_10"] / med["raw_fetch1"],
        "drain_1slot_vs_raw_fetch1": med["asman_drain_1"] / med["raw_fetch1"],
        "drain_10_vs_raw_10_inflight": med["asman_drain_10"] / med["raw_fetch1_10"],
        "enqueue_vs_raw": med["asman_enqueue"] / med["raw_enqueue"],
        "private_drain_10_jobs_per_s": med["asman_drain_10_private"],
        "private_vs_open_drain_10": med["asman_drain_10_private"] / med["asman_drain_10"],
        "protocol_1_jobs_per_s": med["protocol_1"],
        "protocol_10_jobs_per_s": med["protocol_10"],
    }


def _trusting(client: Log, worker: PeerKey, queue: str) -> Callable[[Policy | None], Policy]:
    policy = replace(Policy.private(queue, client.peer_id), workers=frozenset({worker.peer_id}))
    return lambda _: policy


def render(r: dict[str, Any]) -> str:
    m = r["median_jobs_per_s"]
    rows = [
        ["enqueue", f"{ENQUEUE_CONCURRENCY} in flight", m["asman_enqueue"], m["raw_enqueue"],
         r["enqueue_vs_raw"]],
        ["drain, 1 slot / 1 in flight", "fetch(1)+ack_sync", m["asman_drain_1"], m["raw_fetch1"],
         r["drain_1slot_vs_raw_fetch1"]],
        ["drain, 10 slots / 10 in flight", "fetch(1)+ack_sync", m["asman_drain_10"],
         m["raw_fetch1_10"], r["drain_10_vs_raw_10_inflight"]],
        ["drain, 10 slots vs raw 1 in flight", "issue-7 ratio", m["asman_drain_10"],
         m["raw_fetch1"], r["drain_vs_raw_fetch1"]],
        ["drain, 10 slots, private queue", "the same, open queue", m["asman_drain_10_private"],
         m["asman_drain_10"], r["private_vs_open_drain_10"]],
        ["lease protocol only, 1 in flight", "no worker around it", m["protocol_1"],
         m["raw_fetch1"], m["protocol_1"] / m["raw_fetch1"]],
        ["lease protocol only, 10 in flight", "no worker around it", m["protocol_10"],
         m["raw_fetch1_10"], m["protocol_10"] / m["raw_fetch1_10"]],
    ]  # fmt: skip
    return table(
        f"Queue path: {r['n_jobs']:,} no-op jobs per run, median of {r['repeat']} (jobs/s)",
        ["what", "raw baseline", "Asman", "raw JetStream", "ratio"],
        rows,
    )
