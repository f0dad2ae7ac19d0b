"""Drain with ``asman worker --procs 2`` next to one process, in the same run (issue 13).

N jobs are submitted first (not timed); then a ``Supervisor`` starts its worker processes
(``--procs 1``, then ``--procs 2``, alternating over the repetitions). Each process is a whole
worker with 10 slots (enough to keep one process busy) and the benchmark-only
``NoopRuntime`` (every job an instant success), so the figure is what the processes do on the
log, and how that scales with the cores: one Python process drives one core. Every job must
end finished exactly once with success (checked after each run).

The clock runs from the first claim to the last ``finished`` (the jobs stream's message
count, polled every 10 ms), so the processes' start-up is left out. On a 2-core machine the
nats-server shares the cores with the worker processes: with w the CPU one process spends on
a job and s the server's, the ratio can reach at most 2w / (w + s), about 1.45 here, before
any cost of two processes sharing one queue.

    .venv/bin/python -m bench.procs [--jobs 4000] [--repeat 3] [--slots 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from asman.config import BlobSettings, ClientSettings
from asman.log import jobs, subjects
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.peer.supervisor import Supervisor
from asman.peer.worker import WorkerConfig
from bench.common import log, median, nats_server, scratch, table
from bench.queue_path import ENQUEUE_CONCURRENCY, definition

NOOP = "bench.noop:NoopRuntime"
SLOTS = 10
POLL_S = 0.01


async def _submit(client: Log, queue: str, n: int) -> None:
    sem = asyncio.Semaphore(ENQUEUE_CONCURRENCY)

    async def one(i: int) -> None:
        async with sem:
            await jobs.submit(client, queue, definition(queue, i))

    await asyncio.gather(*(one(i) for i in range(n)))


async def _until_messages(client: Log, task: asyncio.Task[int], count: int) -> float:
    """When the jobs stream first holds ``count`` messages (``perf_counter``)."""
    while True:
        info = await client.js.stream_info(subjects.JOBS_STREAM)
        if info.state.messages >= count:
            return time.perf_counter()
        if task.done():
            task.result()
            raise RuntimeError("the supervisor stopped early")
        await asyncio.sleep(POLL_S)


async def drain(url: str, work: Path, queue: str, n: int, procs: int, slots: int) -> float:
    """Jobs per second for ``procs`` worker processes draining ``n`` waiting jobs."""
    async with Log(LogConfig(servers=(url,)), PeerKey.generate()) as client:
        await _submit(client, queue, n)
        base = (await client.js.stream_info(subjects.JOBS_STREAM)).state.messages
        settings = ClientSettings(
            servers=(url,),
            domain=None,
            creds=None,
            key_file=work / f"{queue}.key",
            blobs=BlobSettings(),
        )
        config = WorkerConfig(
            queues=(queue,),
            data_dir=work / queue,
            slots=slots,
            heartbeat_s=30.0,
            sweep_interval_s=3600.0,
            drain_grace_s=5.0,
        )
        supervisor = Supervisor(settings, config, procs, runtime=NOOP)
        stop = asyncio.Event()
        task = asyncio.create_task(supervisor.run(stop))
        try:
            # The clock: the jobs stream's message count, polled every 10 ms (one cheap
            # request; a subscription to every event would cost this process more CPU than
            # the drain can spare on two cores). Past the submits, the first message is the
            # first claim; a job's happy path is 3 events more (claimed, started, finished).
            async with asyncio.timeout(max(120.0, n / 10)):
                t0 = await _until_messages(client, task, base + 1)
                t1 = await _until_messages(client, task, base + 3 * n)
            rate = n / (t1 - t0)
        finally:
            stop.set()
            await task
        listed = await jobs.list_jobs(client, queue)
        finished = [s for s in listed if s.finished]
        if len(finished) != n or any(s.claims != 1 or s.reason != "success" for s in finished):
            raise RuntimeError(f"{len(finished)} of {n} jobs finished once with success")
    return rate


async def run(n: int, repeat: int, slots: int = SLOTS) -> dict[str, Any]:
    one: list[float] = []
    two: list[float] = []
    with nats_server("procs") as server, scratch("procs") as work:
        for r in range(repeat):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for procs in order:
                queue = f"procs{procs}-{r}"
                rate = await drain(server.url, work, queue, n, procs, slots)
                (one if procs == 1 else two).append(rate)
                log(f"procs: {procs} process(es), run {r + 1}: {rate:.0f} jobs/s")
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    return {
        "jobs": n,
        "repeat": repeat,
        "drain_1proc_jobs_per_s": median(one),
        "drain_2procs_jobs_per_s": median(two),
        "procs2_vs_1_ratio": median(ratios),
        "runs": {"1": one, "2": two},
    }


def render(r: dict[str, Any]) -> str:
    return table(
        f"Drain with --procs 2 next to one process ({r['jobs']} jobs, median of {r['repeat']})",
        ["", "jobs/s"],
        [
            ["1 process", f"{r['drain_1proc_jobs_per_s']:.0f}"],
            ["--procs 2", f"{r['drain_2procs_jobs_per_s']:.0f}"],
            ["ratio (same run, per pair)", f"{r['procs2_vs_1_ratio']:.2f}x"],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--slots", type=int, default=SLOTS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.jobs, args.repeat, args.slots))
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
