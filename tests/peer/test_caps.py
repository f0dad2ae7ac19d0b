"""Every job runs capped (issue 13): memory, CPUs, processes, ``/dev/shm`` and ``/tmp``, read
from inside the container the way a job would see them; builds and downloads inside the job's
time. A real worker, a real Docker engine, a real nats-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from workerstack import IMAGE, Stack, job_text

from asman.log import jobs
from asman.peer.caps import DEFAULT_PIDS, DEFAULT_SHM, DEFAULT_TMP, host_memory_bytes

pytestmark = [pytest.mark.docker]

MIB = 1024 * 1024

#: what a job sees of its limits, on cgroup v1 or v2, one ``name value`` per line
PROBE = r"""
cg() { cat "/sys/fs/cgroup/$1" 2>/dev/null || cat "/sys/fs/cgroup/$2"; }
echo "memory $(cg memory.max memory/memory.limit_in_bytes)"
echo "pids $(cg pids.max pids/pids.max)"
echo "cpu $(cg cpu.max cpu/cpu.cfs_quota_us)"
echo "shm $(df -k /dev/shm | tail -1 | awk '{print $2}')"
echo "tmp $(df -k /tmp | tail -1 | awk '{print $2}')"
"""


def seen(stdout: str) -> dict[str, int]:
    """The probe's figures: bytes for memory, shm and tmp; pids; CPU quota in µs per 100 ms."""
    out: dict[str, int] = {}
    for line in stdout.splitlines():
        name, _, value = line.partition(" ")
        first = value.split()[0]  # cgroup v2's cpu.max is "<quota> <period>"
        out[name] = int(first) * (1024 if name in ("shm", "tmp") else 1)
    return out


async def probe(stack: Stack, queue: str, **definition: object) -> dict[str, int]:
    client = await stack.log()
    sub = await jobs.submit(
        client, queue, {"image": IMAGE, "command": ["sh", "-c", PROBE], **definition}
    )
    state = await jobs.wait_finished(client, queue, sub.job_id, 60)
    assert state.reason == "success", state.result
    return seen((await job_text(client, state))["stdout"])


async def test_a_job_that_asks_nothing_runs_under_the_default_caps(stack: Stack) -> None:
    """Before: no memory limit, no CPU quota, no pids limit unless the operator set them."""
    await stack.start_worker("dflt", slots=2)
    limits = await probe(stack, "dflt")
    assert limits["memory"] == max(256 * MIB, host_memory_bytes() // 2)
    assert limits["pids"] == DEFAULT_PIDS
    assert limits["shm"] == DEFAULT_SHM
    assert limits["tmp"] == DEFAULT_TMP
    assert limits["cpu"] > 0  # a quota, not -1 (none)


async def test_a_job_may_ask_for_less_or_up_to_the_ceiling_never_more(stack: Stack) -> None:
    await stack.start_worker(
        "ceil",
        memory_limit_bytes=512 * MIB,
        cpus_limit=1.0,
        pids_limit=64,
        shm_limit_bytes=16 * MIB,
        tmp_limit_bytes=8 * MIB,
    )
    under = await probe(stack, "ceil", shmSize="4m", requirements={"memory": "256m", "cpus": 0.5})
    assert under == {
        "memory": 256 * MIB,
        "pids": 64,
        "cpu": 50_000,
        "shm": 4 * MIB,
        "tmp": 8 * MIB,
    }
    over = await probe(stack, "ceil", shmSize="1g", requirements={"cpus": 16})
    assert over == {
        "memory": 512 * MIB,
        "pids": 64,
        "cpu": 100_000,
        "shm": 16 * MIB,
        "tmp": 8 * MIB,
    }


async def test_shared_memory_is_bounded(stack: Stack) -> None:
    """Before: 2 GiB written to /dev/shm raised the host's shared memory by 2 GB."""
    client = await stack.log()
    await stack.start_worker("shm", shm_limit_bytes=8 * MIB)
    script = "head -c 64m /dev/zero > /dev/shm/big; echo exit=$?; du -k /dev/shm/big"
    sub = await jobs.submit(
        client, "shm", {"image": IMAGE, "command": ["sh", "-c", script], "shmSize": "1g"}
    )
    state = await jobs.wait_finished(client, "shm", sub.job_id, 60)
    out = (await job_text(client, state))["stdout"]
    assert "exit=1" in out
    assert int(out.split()[-2]) <= 8 * 1024  # KiB written: at most the cap


async def test_a_build_runs_inside_the_jobs_time(stack: Stack) -> None:
    """Before: a build ran 80 s under ``maxDuration: "5s"`` and the job ended success."""
    client = await stack.log()
    await stack.start_worker("bt")
    definition = {
        # a Dockerfile of its own: a build cached from an earlier run would take no time
        "build": {"dockerfile": f"FROM {IMAGE}\nRUN echo {uuid.uuid4().hex} && sleep 60\n"},
        "command": "echo never",
        "maxDuration": "3s",
    }
    t = time.monotonic()
    sub = await jobs.submit(client, "bt", definition)
    state = await jobs.wait_finished(client, "bt", sub.job_id, 60)
    assert state.reason == "timed_out", state.result
    assert time.monotonic() - t < 30
    assert "timed out after 3s" in (await job_text(client, state)).get("system", "")


async def test_a_cancel_stops_a_build_within_seconds(stack: Stack) -> None:
    """Before: a cancel during a 40 s build stopped the lease renewal, and the same worker
    claimed the job twice more, building in parallel."""
    client = await stack.log()
    await stack.start_worker("bc")
    dockerfile = f"FROM {IMAGE}\nRUN echo building {uuid.uuid4().hex} && sleep 60\n"
    definition = {"build": {"dockerfile": dockerfile}}
    sub = await jobs.submit(client, "bc", definition)
    async with asyncio.timeout(60):
        async for state in jobs.watch_job(client, "bc", sub.job_id):
            if state.lease is not None:
                break
    t = time.monotonic()
    await jobs.cancel(client, "bc", sub.job_id)
    state = await jobs.wait_finished(client, "bc", sub.job_id, 60)
    assert state.reason == "cancelled"
    assert time.monotonic() - t < 15
    assert state.claims == 1


@pytest.fixture
async def trickle(unused_tcp_port: int) -> AsyncIterator[str]:
    """A URL on loopback that sends one byte a second, for ever."""

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        while True:
            await resp.write(b"x")
            await asyncio.sleep(1)

    app = web.Application()
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        yield f"http://127.0.0.1:{unused_tcp_port}/slow"
    finally:
        await runner.cleanup()


async def test_a_slow_download_ends_with_the_jobs_time(stack: Stack, trickle: str) -> None:
    """Before: a slow URL input held a slot 120 s under ``maxDuration: "2s"``."""
    client = await stack.log()
    await stack.start_worker("dl", allow_urls=(trickle.split("/")[2],))
    definition = {
        "image": IMAGE,
        "command": "true",
        "inputs": {"big.bin": {"type": "url", "value": trickle}},
        "maxDuration": "2s",
    }
    t = time.monotonic()
    sub = await jobs.submit(client, "dl", definition)
    state = await jobs.wait_finished(client, "dl", sub.job_id, 60)
    assert state.reason == "timed_out", state.result
    assert time.monotonic() - t < 20


async def test_a_cancel_stops_a_download_at_once(stack: Stack, trickle: str) -> None:
    """Before: a cancel sent 48 s into a download was acted on when the download failed."""
    client = await stack.log()
    await stack.start_worker("dc", allow_urls=(trickle.split("/")[2],))
    sub = await jobs.submit(
        client,
        "dc",
        {
            "image": IMAGE,
            "command": "true",
            "inputs": {"big.bin": {"type": "url", "value": trickle}},
        },
    )
    async with asyncio.timeout(60):
        async for state in jobs.watch_job(client, "dc", sub.job_id):
            if state.lease is not None:
                break
    t = time.monotonic()
    await jobs.cancel(client, "dc", sub.job_id)
    state = await jobs.wait_finished(client, "dc", sub.job_id, 60)
    assert state.reason == "cancelled"
    assert time.monotonic() - t < 15
