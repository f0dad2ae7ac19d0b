"""Many queues: what a hub's queues cost the server, and a worker on one of them (issue 18).

On one nats-server (and, with ``cluster_queues``, on a 3-node R3 cluster of
deploy/nats/cluster), in the same run:

1. **Empty hub.** Restart the server (so memory is measured in the same state both times),
   then: its resident memory, its CPU over ``idle_s`` seconds with nothing to do, and the
   submit→started latency of a worker serving one queue (``bench.latency``'s probe: one job
   at a time, a no-op runtime, p50 over ``probe`` jobs).
2. **Fill.** ``queues`` queues with one queued job each (timed, for the record).
3. **Full hub.** Restart, and the same three measures. The ratios full ÷ empty are the figures:
   the probe's latency (target at most 1.2), memory per idle queue ((full - empty) ÷ queues,
   target < 1 KiB), idle CPU (flat).

On the cluster, a node is then restarted (``kill -9``, start) and every queue's job must still
wait in the index. No consumer is created by any of it: the figures are subjects only.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asman.errors import LogError
from asman.log import jobs, subjects, wire
from asman.log.connection import Log, LogConfig, translate_errors
from asman.log.keys import PeerKey
from asman.log.server import NatsServer
from bench.common import ROOT, log, percentile, rss_kb, scratch, table
from bench.latency import asman_latency

sys.path.insert(0, str(ROOT / "tests" / "federation"))  # the deploy/nats launcher of the tests
from topology import Topology

IMAGE = "asman/busybox:local"
FILL_CONCURRENCY = 256


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = 100  # os.sysconf("SC_CLK_TCK") on Linux
    return (int(fields[11]) + int(fields[12])) / ticks


async def fill(url: str, queues: int, replicas: int = 1) -> float:
    """One queued job on each of ``queues`` queues; returns queues per second."""
    async with Log(LogConfig(servers=(url,), replicas=replicas), PeerKey.generate()) as client:
        sem = asyncio.Semaphore(FILL_CONCURRENCY)

        async def one(i: int) -> None:
            async with sem:
                await jobs.submit(client, f"q{i:06d}", {"image": IMAGE, "command": ["true"]})

        t = time.perf_counter()
        for start in range(0, queues, 10_000):
            await asyncio.gather(*(one(i) for i in range(start, min(queues, start + 10_000))))
        return queues / (time.perf_counter() - t)


async def waiting_total(url: str) -> int:
    """Entries of every queue's waiting index that say a job waits."""
    async with Log(LogConfig(servers=(url,), manage_streams=False), PeerKey.generate()) as lg:
        raw = await lg.read_subject(subjects.WAITING_STREAM, "asman.waiting.>")
    return sum(1 for ev in raw if (e := wire.parse_entry(ev.data)) and e.kind == wire.ENTRY_WAITING)


async def consumers(url: str) -> int:
    async with Log(LogConfig(servers=(url,), manage_streams=False), PeerKey.generate()) as lg:
        total = 0
        for name in (subjects.JOBS_STREAM, subjects.WAITING_STREAM):
            with translate_errors(f"reading stream {name}"):
                info = await lg.js.stream_info(name)
            total += int(info.state.consumer_count or 0)
        return total


async def measure(
    url: str, pids: list[int], idle_s: float, probe: int, work: Path
) -> dict[str, Any]:
    """Memory, idle CPU (of every server process) and the probe's latency, in that order."""
    await asyncio.sleep(2.0)  # the server settles after its start (a one-off, not a wait)
    rss = sum(rss_kb(pid) for pid in pids)
    cpu0 = sum(cpu_s(pid) for pid in pids)
    await asyncio.sleep(idle_s)
    idle_cpu = (sum(cpu_s(pid) for pid in pids) - cpu0) / idle_s
    run = str(time.monotonic_ns())  # new jobs each time (the same ones would be cached)
    started, _ = await asman_latency(url, probe, work / f"probe-{run}", tag=run)
    return {
        "rss_kb": rss,
        "idle_cpu_fraction": round(idle_cpu, 4),
        "probe_started_p50_ms": round(percentile(started, 50), 3),
        "probe_started_p90_ms": round(percentile(started, 90), 3),
    }


@contextlib.contextmanager
def one_server(work: Path) -> Iterator[NatsServer]:
    server = NatsServer(work / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def single(queues: int, idle_s: float, probe: int) -> dict[str, Any]:
    with scratch("queues") as work, one_server(work) as server:
        assert server.pid is not None
        await fill(server.url, 1)  # the streams, and one queue
        server.restart()
        assert server.pid is not None
        empty = await measure(server.url, [server.pid], idle_s, probe, work)
        log(f"queues: empty hub {empty}")
        rate = await fill(server.url, queues)
        log(f"queues: {queues} queues filled at {rate:.0f}/s")
        server.restart()
        assert server.pid is not None
        full = await measure(server.url, [server.pid], idle_s, probe, work)
        log(f"queues: full hub {full}")
        waiting = await waiting_total(server.url)
        made = await consumers(server.url)
    return _compare("single node", queues, rate, empty, full, waiting, made)


async def clustered(queues: int, idle_s: float, probe: int) -> dict[str, Any]:
    with scratch("queues-r3") as work:
        topo = Topology(work, "cluster", ["nats-1", "nats-2", "nats-3"])
        topo.start()
        try:
            url = topo.urls()[0]
            pids = lambda: [n.server.pid for n in topo.nodes.values() if n.server.pid]  # noqa: E731
            streams = [subjects.JOBS_STREAM, subjects.WAITING_STREAM]

            async def restart() -> None:
                """The whole cluster, from its store dirs (memory measured alike both times)."""
                await asyncio.to_thread(topo.stop)
                await asyncio.to_thread(topo.start)
                await asyncio.to_thread(topo.wait_leaders, streams)

            await fill(url, 1, replicas=3)
            await restart()
            empty = await measure(url, pids(), idle_s, probe, work)
            log(f"queues r3: empty {empty}")
            rate = await fill(url, queues, replicas=3)
            log(f"queues r3: {queues} queues filled at {rate:.0f}/s")
            await restart()
            full = await measure(url, pids(), idle_s, probe, work)
            log(f"queues r3: full {full}")
            # a node restart loses nothing: every queue's job still waits
            victim = "nats-2"
            topo.kill(victim)
            await asyncio.to_thread(topo.start, victim)
            waiting = await _until_readable(lambda: waiting_total(url))
            made = await _until_readable(lambda: consumers(url))
        finally:
            topo.stop()
    out = _compare("3-node R3 cluster", queues, rate, empty, full, waiting, made)
    out["memory_per_queue_bytes_per_node"] = round(out["memory_per_queue_bytes"] / 3, 1)
    return out


async def _until_readable(read: Any, timeout: float = 60.0) -> int:
    """``read()`` once the cluster answers again (its streams re-elect after a restart)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(await read())
        except LogError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def _compare(
    where: str,
    queues: int,
    rate: float,
    empty: dict[str, Any],
    full: dict[str, Any],
    waiting: int,
    made: int,
) -> dict[str, Any]:
    return {
        "where": where,
        "queues": queues,
        "fill_queues_per_s": round(rate, 1),
        "empty": empty,
        "full": full,
        "probe_latency_ratio": round(
            full["probe_started_p50_ms"] / empty["probe_started_p50_ms"], 3
        ),
        "memory_per_queue_bytes": round(
            max(0, full["rss_kb"] - empty["rss_kb"]) * 1024 / queues, 1
        ),
        "idle_cpu_full_vs_empty": [empty["idle_cpu_fraction"], full["idle_cpu_fraction"]],
        "jobs_waiting_after": waiting,
        "consumers": made,
    }


async def run(
    queues: int, cluster_queues: int, idle_s: float = 10.0, probe: int = 100
) -> dict[str, Any]:
    out: dict[str, Any] = {"single": await single(queues, idle_s, probe)}
    if cluster_queues:
        out["cluster"] = await clustered(cluster_queues, idle_s, probe)
    return out


def render(r: dict[str, Any]) -> str:
    rows = []
    for key in ("single", "cluster"):
        x = r.get(key)
        if not x:
            continue
        rows.append(
            [
                x["where"],
                f"{x['queues']:,}",
                f"{x['empty']['probe_started_p50_ms']:.2f} → "
                f"{x['full']['probe_started_p50_ms']:.2f}",
                f"{x['probe_latency_ratio']:.2f}",
                f"{x['memory_per_queue_bytes']:.0f} B"
                + (
                    f" ({x['memory_per_queue_bytes_per_node']:.0f} B a node)"
                    if "memory_per_queue_bytes_per_node" in x
                    else ""
                ),
                f"{x['idle_cpu_full_vs_empty'][0]:.3f} → {x['idle_cpu_full_vs_empty'][1]:.3f}",
                f"{x['jobs_waiting_after']:,}",
                x["consumers"],
            ]
        )
    return table(
        "Many queues: one queued job each, a worker on one more (issue 18)",
        [
            "hub",
            "queues",
            "probe submit→started p50 ms, empty → full",
            "ratio",
            "server memory per queue",
            "server idle CPU, empty → full",
            "jobs waiting after (restart)",
            "consumers",
        ],
        rows,
    )
