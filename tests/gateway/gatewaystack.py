"""Gateway test stack: a real nats-server, real gateways (``serve`` on free loopback ports),
and on demand real workers with the Docker engine. No stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from faults import stopped
from sseparse import read_events
from yarl import URL

from asman.gateway import GatewayConfig, GatewayLimits, serve
from asman.log.blobs import BlobStore
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.objstore import ObjectStoreBlobs
from asman.log.server import NatsServer, free_port
from asman.peer.docker import DockerRuntime
from asman.peer.worker import Worker, WorkerConfig

IMAGE = "asman/busybox:local"
# generous for tests that fire many requests; the rate-limit test sets its own
TEST_LIMITS = GatewayLimits(rate_per_s=10_000, rate_burst=100_000, max_streams_per_client=64)


class Gateway:
    """One running gateway (``serve`` in a task) and an HTTP session pointed at it."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.url = f"http://127.0.0.1:{config.port}"
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.http = aiohttp.ClientSession(base_url=self.url)

    async def start(self) -> Gateway:
        self.task = asyncio.create_task(serve(self.config, self.stop))
        async with asyncio.timeout(30):
            while True:
                if self.task.done():
                    self.task.result()  # raises what stopped it
                with contextlib.suppress(aiohttp.ClientError):
                    async with self.http.get("/healthz") as resp:
                        if resp.status == 200:
                            return self
                await asyncio.sleep(0.05)

    async def json(self, method: str, path: str | URL, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, path, **kwargs) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def wait_job(self, queue: str, job: str, *, timeout: float = 90) -> dict[str, Any]:
        """The job, as ``GET`` answers it, once it is finished."""
        return await self.wait_state(queue, job, lambda view: view["state"] == "finished", timeout)

    async def wait_state(
        self,
        queue: str,
        job: str,
        check: Callable[[dict[str, Any]], bool],
        timeout: float = 90,
    ) -> dict[str, Any]:
        """The job, as ``GET`` answers it, once its event stream sent a state for which
        ``check`` is true (a TimeoutError after ``timeout`` seconds)."""
        path = f"/api/v1/queues/{queue}/jobs/{job}"
        async with asyncio.timeout(timeout):
            async with self.http.get(f"{path}/events") as resp:
                assert resp.status == 200, await resp.text()
                async for ev in read_events(resp):
                    if ev["event"] in ("state", "end") and check(ev["data"]):
                        break
                else:
                    raise AssertionError(f"the event stream of job {job[:12]} ended early")
            status, body = await self.json("GET", path)
        assert status == 200, body
        return dict(body)


class Stack:
    """nats-server + gateways + workers + plain client peers, all stopped by ``close``."""

    def __init__(self, nats: NatsServer, tmp: Path) -> None:
        self.nats = nats
        self.tmp = tmp
        self.gateways: list[Gateway] = []
        self.workers: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
        self.logs: list[Log] = []

    def log_config(self, **overrides: Any) -> LogConfig:
        return LogConfig(servers=(self.nats.url,), **overrides)

    async def gateway(self, **overrides: Any) -> Gateway:
        overrides.setdefault("limits", TEST_LIMITS)
        overrides.setdefault("poll_s", 1.0)
        config = GatewayConfig(
            log=self.log_config(name="asman-gateway-test"),
            key_path=self.tmp / f"gateway{len(self.gateways)}.key",
            port=free_port(),
            **overrides,
        )
        gw = Gateway(config)
        self.gateways.append(gw)
        return await gw.start()

    async def peer(self) -> Log:
        log = Log(self.log_config(), PeerKey.generate())
        await log.connect()
        self.logs.append(log)
        return log

    async def worker(self, queue: str, blobs: BlobStore | None = None, **overrides: Any) -> Worker:
        log = await self.peer()
        if blobs is None:
            store = ObjectStoreBlobs(log.js)
            await store.ensure()
            blobs = store
        runtime = DockerRuntime()
        await runtime.__aenter__()
        config = WorkerConfig(
            queues=(queue,),
            data_dir=self.tmp / f"worker{len(self.workers)}",
            drain_grace_s=5.0,
            kill_grace_s=1.0,
            heartbeat_s=1.0,
            # the gateway and the S3 server of these tests are on loopback, as under
            # ``asman dev``: allowed, as its banner says (tests/peer/test_netguard.py has
            # the refusals)
            allow_urls=overrides.pop("allow_urls", ("127.0.0.1",)),
            **overrides,
        )
        worker = Worker(log, blobs, runtime, config)
        stop = asyncio.Event()

        async def run() -> None:
            try:
                await worker.run(stop)
            finally:
                await runtime.__aexit__(None, None, None)

        self.workers.append((stop, asyncio.create_task(run())))
        return worker

    async def close(self) -> None:
        """Stop everything, then fail the test if a worker or a gateway crashed, ended with
        an exception or did not stop within its deadline (every step still runs)."""
        failures: list[str] = []
        for stop, _ in self.workers:
            stop.set()
        for i, (_, task) in enumerate(self.workers):
            failures += await stopped(task, f"worker {i}")
        for gw in self.gateways:
            await gw.http.close()
            gw.stop.set()
            assert gw.task is not None
            failures += await stopped(gw.task, f"the gateway on port {gw.config.port}")
        for log in self.logs:
            failures += await stopped(asyncio.ensure_future(log.close()), "a peer's log")
        if failures:
            raise AssertionError("teardown: " + "; ".join(failures))


def replace_limits(**changes: Any) -> GatewayLimits:
    return dataclasses.replace(TEST_LIMITS, **changes)


async def on_the_log(
    peer: Log, subject: str, check: Callable[[], Awaitable[bool]], timeout: float = 60
) -> None:
    """Until ``check`` is true, looked at again on every message published on ``subject``
    (subscribed before the first look, so none is missed); a TimeoutError after ``timeout``
    seconds."""
    wake = asyncio.Event()
    stop = await peer.wake_on(subject, wake)
    try:
        async with asyncio.timeout(timeout):
            while True:
                wake.clear()
                if await check():
                    return
                await wake.wait()
    finally:
        await stop()
