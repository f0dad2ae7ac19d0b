"""TES path: a one-executor task through GA4GH TES next to the same job through Asman's API.

One gateway and one worker (the real ``DockerRuntime``, 1 slot) on one nats-server, in this
process. Per job, the time from the HTTP request that creates it to the client reading it
finished from the gateway:

* TES: ``POST /q/<q>/ga4gh/tes/v1/tasks`` with one executor (``true <i>``), the worker runs it
  as a one-step job (shared folders, step result), then ``GET …/tasks/<id>?view=BASIC``
  answers ``COMPLETE`` with the executor's log;
* Asman (the baseline): ``POST /api/v1/queues/<q>/jobs`` with ``{"image", "command"}`` (the
  same container), then ``GET /api/v1/queues/<q>/jobs/<id>`` answers ``finished``.

Both wait for the ``finished`` event on a NATS subscription (no polling). The runs alternate,
TES then Asman, so both see the same load; each job is new (the index and a run nonce are
in its command), so nothing comes from cache.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
from nats.aio.msg import Msg

from asman.errors import EnvelopeError
from asman.gateway import GatewayConfig, GatewayLimits, serve
from asman.log import subjects, wire
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.objstore import ObjectStoreBlobs
from asman.log.server import free_port
from asman.peer.docker import DockerRuntime
from asman.peer.worker import Worker, WorkerConfig
from bench.common import log, median, nats_server, percentile, scratch, table

IMAGE = "asman/busybox:local"
QUEUE = "tesbench"


async def _gateway(url: str, work: Path) -> tuple[str, asyncio.Event, asyncio.Task[None]]:
    port = free_port()
    config = GatewayConfig(
        log=LogConfig(servers=(url,)),
        key_path=work / "gateway.key",
        port=port,
        limits=GatewayLimits(rate_per_s=10_000, rate_burst=100_000),
    )
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(serve(config, stop, ready.set))
    async with asyncio.timeout(30):
        await ready.wait()
    return f"http://127.0.0.1:{port}", stop, task


async def run(n: int = 20) -> dict[str, Any]:
    tes_ms: list[float] = []
    asman_ms: list[float] = []
    nonce = secrets.token_hex(4)
    with nats_server("tes") as server, scratch("tes") as work:
        base, stop_gw, gw = await _gateway(server.url, work)
        async with (
            Log(LogConfig(servers=(server.url,)), PeerKey.generate()) as client,
            Log(LogConfig(servers=(server.url,), echo=False), PeerKey.generate()) as wlog,
            DockerRuntime() as runtime,
            aiohttp.ClientSession(base_url=base) as http,
        ):
            blobs = ObjectStoreBlobs(wlog.js)
            await blobs.ensure()
            worker = Worker(
                wlog,
                blobs,
                runtime,
                WorkerConfig(queues=(QUEUE,), data_dir=work / "worker", heartbeat_s=30.0),
            )
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop))
            finished: set[str] = set()
            arrived = asyncio.Event()

            async def on_event(msg: Msg) -> None:
                try:
                    opened = wire.open_envelope(msg.data, msg.subject)
                except EnvelopeError:
                    return
                if opened.event.get("type") == "finished":
                    finished.add(msg.subject)
                    arrived.set()

            async def wait_finished(job: str) -> None:
                subject = subjects.job_subject(QUEUE, job)
                async with asyncio.timeout(60):
                    while subject not in finished:
                        arrived.clear()
                        await arrived.wait()

            async def read_until(path: str, key: str, value: str) -> dict[str, Any]:
                """GET ``path`` until ``key`` is ``value`` (at most 2 s): the ``finished`` a
                subscriber saw may reach the stream a moment after the subscriber."""
                deadline = time.monotonic() + 2.0
                while True:
                    async with http.get(path) as resp:
                        got: dict[str, Any] = await resp.json()
                    if got.get(key) == value or time.monotonic() > deadline:
                        return got
                    await asyncio.sleep(0.002)

            async def through_tes(i: int) -> float:
                t = time.perf_counter()
                body = {"executors": [{"image": IMAGE, "command": ["true", nonce, str(i)]}]}
                tes_base = f"/q/{QUEUE}/ga4gh/tes/v1"
                async with http.post(f"{tes_base}/tasks", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    job = (await resp.json())["id"]
                await wait_finished(job)
                got = await read_until(f"{tes_base}/tasks/{job}?view=BASIC", "state", "COMPLETE")
                if got["state"] != "COMPLETE":
                    raise RuntimeError(f"TES task ended {got['state']}: {got}")
                return (time.perf_counter() - t) * 1000

            async def through_asman(i: int) -> float:
                t = time.perf_counter()
                definition = {"image": IMAGE, "command": ["true", nonce, str(i), "asman"]}
                path = f"/api/v1/queues/{QUEUE}/jobs"
                async with http.post(path, json={"definition": definition}) as resp:
                    assert resp.status in (200, 201), await resp.text()
                    job = (await resp.json())["jobId"]
                await wait_finished(job)
                got = await read_until(f"{path}/{job}", "reason", "success")
                if got.get("reason") != "success":
                    raise RuntimeError(f"job ended {got.get('reason')}: {got}")
                return (time.perf_counter() - t) * 1000

            sub = await client.nc.subscribe(subjects.jobs_filter(QUEUE), cb=on_event)
            try:
                await worker.beaten.wait()
                for i in range(n + 2):  # the first 2 warm up
                    took_tes = await through_tes(i)
                    took_asman = await through_asman(i)
                    if i >= 2:
                        tes_ms.append(took_tes)
                        asman_ms.append(took_asman)
            finally:
                await sub.unsubscribe()
                stop.set()
                await task
                stop_gw.set()
                await gw
    ratios = [a / b for a, b in zip(tes_ms, asman_ms, strict=True)]
    log(f"tes: TES p50 {median(tes_ms):.0f} ms, Asman API p50 {median(asman_ms):.0f} ms")
    return {
        "n_jobs": n,
        "tes_ms": {"p50": median(tes_ms), "p90": percentile(tes_ms, 90)},
        "asman_api_ms": {"p50": median(asman_ms), "p90": percentile(asman_ms, 90)},
        "tes_ratio": median(tes_ms) / median(asman_ms),
        "tes_ratio_median_of_pairs": median(ratios),
    }


def render(r: dict[str, Any]) -> str:
    return table(
        f"TES path, {r['n_jobs']} one-executor `true` tasks one at a time (ms)",
        ["what", "p50", "p90"],
        [
            ["TES: POST task → GET COMPLETE", r["tes_ms"]["p50"], r["tes_ms"]["p90"]],
            ["Asman API: POST job → GET finished", r["asman_api_ms"]["p50"],
             r["asman_api_ms"]["p90"]],
            ["ratio (median TES / median Asman API)", r["tes_ratio"], "-"],
        ],
    )  # fmt: skip
