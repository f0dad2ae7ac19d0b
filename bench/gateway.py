"""Gateway: submit and job-read requests/s, and Server-Sent Events fan-out to many watchers.

A gateway process (``bench.gateway_proc``: ``asman.gateway.serve`` with the per-client rate
limit lifted, since one load generator is one client) serves an aiohttp client in this
process (``CONCURRENCY`` requests in flight, keep-alive):

* submit: ``POST /api/v1/queues/{q}/jobs`` with a new definition each time (validated, signed
  by the gateway, CAS on the log, ticket published);
* read: ``GET /api/v1/queues/{q}/jobs/{job}`` (read and verify the job's events, fold, JSON);
* fan-out: ``watchers`` SSE streams on one queued job; then the job is cancelled through the
  gateway and we time, per watcher, from the cancel request to its ``finished`` state event.

Baselines: a bare aiohttp app in the same kind of process, with a JSON echo for the POST and
a constant JSON for the GET (what aiohttp itself costs on this box), and the raw NATS
request/reply rate on the same server (a responder and ``CONCURRENCY`` requests in flight,
64-byte payloads, nats-py): what one round trip to the log costs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp

from asman.log.server import free_port
from bench.common import ROOT, log, median, nats_server, percentile, scratch, table

CONCURRENCY = 32
IMAGE = "asman/busybox:local"
QUEUE = "gw"


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.gateway_proc", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


async def _wait_up(session: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(60):
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


def _stop(proc: subprocess.Popen[str]) -> int:
    """SIGTERM by PID; the process's peak RSS (KiB) from its last line."""
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    peak = 0
    for line in out.splitlines():
        if line.startswith("{"):
            peak = json.loads(line).get("peak_rss_kb", peak)
    return int(peak)


async def _load(
    session: aiohttp.ClientSession, n: int, request: Any, expect: tuple[int, ...]
) -> tuple[float, list[Any]]:
    sem = asyncio.Semaphore(CONCURRENCY)
    out: list[Any] = [None] * n

    async def one(i: int) -> None:
        async with sem, request(i) as resp:
            body = await resp.json()
            if resp.status not in expect:
                raise RuntimeError(f"HTTP {resp.status}: {body}")
            out[i] = body

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t), out


def _definition(i: int) -> dict[str, Any]:
    return {"image": IMAGE, "command": ["true", "gw", str(i)]}


async def _rates(base: str, n_submit: int, n_read: int) -> tuple[float, float, list[str]]:
    conn = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=conn) as session:
        submit_url = f"{base}/api/v1/queues/{QUEUE}/jobs"
        submit_rate, bodies = await _load(
            session,
            n_submit,
            lambda i: session.post(submit_url, json={"definition": _definition(i)}),
            (200, 201),
        )
        ids = [b.get("jobId") for b in bodies]
        if not all(isinstance(x, str) for x in ids):
            ids = [f"job{i}" for i in range(n_submit)]  # the bare app has no ids
        read_rate, _ = await _load(
            session,
            n_read,
            lambda i: session.get(f"{submit_url}/{ids[i % len(ids)]}"),
            (200,),
        )
    return submit_rate, read_rate, ids


async def _fanout(base: str, job: str, watchers: int) -> dict[str, Any]:
    url = f"{base}/api/v1/queues/{QUEUE}/jobs/{job}/events"
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        ready = 0
        all_ready = asyncio.Event()
        got: list[float] = []
        cancelled_at = 0.0

        async def watch() -> None:
            nonlocal ready
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"SSE HTTP {resp.status}")
                event = ""
                first = True
                async for raw in resp.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "state":
                        data = json.loads(line[5:])
                        if first:
                            first = False
                            ready += 1
                            if ready == watchers:
                                all_ready.set()
                        if data.get("state") == "finished":
                            got.append(time.perf_counter())
                            return

        tasks = [asyncio.create_task(watch()) for _ in range(watchers)]
        t_open = time.perf_counter()
        async with asyncio.timeout(120):
            await all_ready.wait()
        opened_s = time.perf_counter() - t_open
        cancelled_at = time.perf_counter()
        async with session.post(f"{base}/api/v1/queues/{QUEUE}/jobs/{job}/cancel", json={}) as r:
            if r.status >= 300:
                raise RuntimeError(f"cancel: HTTP {r.status}: {await r.text()}")
        done, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()
    delays = [(t - cancelled_at) * 1000 for t in got]
    return {
        "watchers": watchers,
        "delivered": len(delays),
        "open_all_s": opened_s,
        "delivery_ms": {
            "p50": median(delays),
            "p99": percentile(delays, 99),
            "max": max(delays) if delays else float("nan"),
        },
    }


async def _nats_rps(url: str, n: int) -> float:
    """Raw NATS request/reply on the same server: the floor under every gateway request."""
    import nats

    nc = await nats.connect(url)
    try:

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("bench.echo", cb=echo)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with gate:
                await nc.request("bench.echo", b"x" * 64, timeout=10)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - start)
    finally:
        await nc.close()


async def run(n_submit: int = 1000, n_read: int = 2000, watchers: int = 500) -> dict[str, Any]:
    with nats_server("gateway") as server, scratch("gateway") as work:
        raw_nats = await _nats_rps(server.url, n_read)
        log(f"raw nats request/reply: {raw_nats:.0f}/s")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = _spawn(["--nats", server.url, "--port", str(port), "--key-path",
                       str(work / "gateway.key")])  # fmt: skip
        try:
            async with aiohttp.ClientSession() as s:
                await _wait_up(s, f"{base}/healthz")
            submit_rate, read_rate, ids = await _rates(base, n_submit, n_read)
            log(f"gateway: submit {submit_rate:.0f}/s read {read_rate:.0f}/s")
            fan = await _fanout(base, ids[-1], watchers)
        finally:
            peak = _stop(proc) if proc.poll() is None else 0
        bport = free_port()
        bare = _spawn(["--bare", "--port", str(bport)])
        try:
            bbase = f"http://127.0.0.1:{bport}"
            async with aiohttp.ClientSession() as s:
                await _wait_up(s, f"{bbase}/api/v1/queues/x/jobs/y")
            bare_post, bare_get, _ = await _rates(bbase, n_submit, n_read)
        finally:
            if bare.poll() is None:
                _stop(bare)
    return {
        "concurrency": CONCURRENCY,
        "submit_rps": submit_rate,
        "read_rps": read_rate,
        "bare_aiohttp_post_rps": bare_post,
        "bare_aiohttp_get_rps": bare_get,
        "raw_nats_request_rps": raw_nats,
        "sse": fan,
        "gateway_peak_rss_mib": round(peak / 1024, 1),
    }


def render(r: dict[str, Any]) -> str:
    sse = r["sse"]
    first = table(
        f"Gateway, {r['concurrency']} requests in flight (requests/s)",
        ["request", "Asman gateway", "bare aiohttp", "raw NATS req/reply", "vs aiohttp",
         "vs NATS"],
        [
            ["POST job (submit)", r["submit_rps"], r["bare_aiohttp_post_rps"],
             r["raw_nats_request_rps"], r["submit_rps"] / r["bare_aiohttp_post_rps"],
             r["submit_rps"] / r["raw_nats_request_rps"]],
            ["GET job (read)", r["read_rps"], r["bare_aiohttp_get_rps"],
             r["raw_nats_request_rps"], r["read_rps"] / r["bare_aiohttp_get_rps"],
             r["read_rps"] / r["raw_nats_request_rps"]],
        ],
    )  # fmt: skip
    second = table(
        f"Gateway SSE fan-out: {sse['watchers']} watchers of one job, then a cancel",
        ["delivered", "all streams open (s)", "p50 ms", "p99 ms", "max ms", "gateway peak MiB"],
        [[f"{sse['delivered']}/{sse['watchers']}", sse["open_all_s"], sse["delivery_ms"]["p50"],
          sse["delivery_ms"]["p99"], sse["delivery_ms"]["max"], r["gateway_peak_rss_mib"]]],
    )  # fmt: skip
    return first + "\n\n" + second
