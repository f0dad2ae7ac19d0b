"""Real peers for the federation tests: clients and in-process workers running containers.

Every peer has its own ``Log`` (its own NATS connection), so when a server dies each one
reconnects on its own, exactly as separate processes would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from faults import stopped

from asman.errors import LogError
from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.events import JobState
from asman.log.keys import PeerKey
from asman.log.objstore import ObjectStoreBlobs
from asman.peer.docker import DockerRuntime
from asman.peer.worker import Worker, WorkerConfig

IMAGE = "asman/busybox:local"


def echo_job(n: int, tag: str = "") -> dict[str, Any]:
    """A job that writes ``n`` to /outputs/n.txt and prints it."""
    return {
        "image": IMAGE,
        "command": ["sh", "-c", f"echo {n} > /outputs/n.txt; echo {tag}{n}"],
    }


def sleep_job(seconds: float, tag: str) -> dict[str, Any]:
    return {
        "image": IMAGE,
        "command": ["sh", "-c", f"sleep {seconds}; echo {tag} > /outputs/n.txt"],
    }


def accepted(state: JobState, event: str) -> int:
    """How many accepted events of type ``event`` the job's history holds."""
    return sum(1 for h in state.history if h.type == event and h.accepted)


def output(state: JobState, path: str = "n.txt") -> bytes:
    assert state.result is not None, f"job {state.job_id} has no result"
    files = {f.path: f.blob.data for f in state.result.outputs}
    data = files.get(path)
    assert data is not None, f"job {state.job_id}: no inline output {path} in {list(files)}"
    return data


class Fleet:
    """Clients and workers on one log configuration."""

    def __init__(self, config: LogConfig, tmp: Path) -> None:
        self.config = config
        self.tmp = tmp
        self.logs: list[Log] = []
        self.workers: list[tuple[Worker, asyncio.Event, asyncio.Task[None]]] = []

    async def log(self, **overrides: Any) -> Log:
        log = Log(replace(self.config, **overrides), PeerKey.generate())
        await log.connect()
        self.logs.append(log)
        return log

    async def blobs(self, log: Log) -> ObjectStoreBlobs:
        # a peer that does not manage the streams (a leaf worker) must not resize them
        replicas = log.config.replicas if log.config.manage_streams else None
        store = ObjectStoreBlobs(log.js, replicas=replicas)
        await store.ensure()
        return store

    async def worker(
        self, queue: str, slots: int = 2, *, scan_interval_s: float = 5.0, **overrides: Any
    ) -> Worker:
        """A worker with its own connection (``overrides``: its ``LogConfig``), running until
        the fleet closes."""
        log = await self.log(**overrides)
        runtime = DockerRuntime()
        await runtime.__aenter__()
        cfg = WorkerConfig(
            queues=(queue,),
            data_dir=self.tmp / f"worker{len(self.workers)}",
            slots=slots,
            drain_grace_s=5.0,
            kill_grace_s=1.0,
            heartbeat_s=1.0,
            scan_interval_s=scan_interval_s,
            sweep_interval_s=5.0,
        )
        worker = Worker(log, await self.blobs(log), runtime, cfg)
        stop = asyncio.Event()

        async def run() -> None:
            try:
                await worker.run(stop)
            finally:
                await runtime.__aexit__(None, None, None)

        self.workers.append((worker, stop, asyncio.create_task(run())))
        return worker

    def crashed(self) -> list[BaseException]:
        """Exceptions of workers whose run() ended on its own (a worker must never die of a
        server failure)."""
        out = []
        for _, _, task in self.workers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                assert exc is not None
                out.append(exc)
        return out

    @property
    def jobs_done(self) -> int:
        return sum(w.jobs_done for w, _, _ in self.workers)

    async def close(self, stop_within_s: float = 30.0) -> None:
        """Stop every worker and close every connection; then fail (``AssertionError``) if a
        worker crashed, ended with an exception, or did not stop within ``stop_within_s``
        (its drain grace and the hand-back of its jobs take seconds, never more)."""
        failures: list[str] = []
        for n, (worker, stop, task) in enumerate(self.workers):
            if task.done() and not task.cancelled() and task.exception() is None:
                failures.append(f"worker {n} ({worker.worker_id[:12]}) ended before it was stopped")
            stop.set()
        for n, (worker, _, task) in enumerate(self.workers):
            failures += await stopped(task, f"worker {n} ({worker.worker_id[:12]})", stop_within_s)
        for log in self.logs:
            await log.close()
        self.workers, self.logs = [], []  # closed: a second close (the fixture's) checks nothing
        if failures:
            raise AssertionError("; ".join(failures))


async def submit_all(log: Log, queue: str, definitions: list[dict[str, Any]]) -> list[str]:
    """Submit concurrently, a few at a time; returns the job ids in order."""
    sem = asyncio.Semaphore(16)

    async def one(d: dict[str, Any]) -> str:
        async with sem:
            return (await jobs.submit(log, queue, d)).job_id

    return list(await asyncio.gather(*(one(d) for d in definitions)))


async def follow_queue(
    log: Log,
    queue: str,
    until: Callable[[dict[str, JobState]], bool],
    timeout: float,
    what: str,
) -> dict[str, JobState]:
    """Follow every job of ``queue`` on the log (woken by their own events, not a poll) until
    ``until(states by job id)`` holds; ``TimeoutError`` naming ``what`` after ``timeout``.
    The log must stay reachable (``wait_until`` with ``states_if_done`` rides a failover)."""
    states: dict[str, JobState] = {}
    try:
        async with asyncio.timeout(timeout):
            async for state in jobs.watch_queue(log, queue):
                states[state.job_id] = state
                if until(states):
                    return states
    except TimeoutError:
        raise TimeoutError(f"{what}: not after {timeout:.0f}s ({len(states)} jobs)") from None
    raise AssertionError("watch_queue ended")


def all_finished(ids: list[str]) -> Callable[[dict[str, JobState]], bool]:
    return lambda states: all(i in states and states[i].finished for i in ids)


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.5
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        await asyncio.sleep(every)


async def states_if_done(client: Log, queue: str, ids: list[str]) -> dict[str, JobState]:
    """The states of ``ids`` once all of them are finished, else {} (also while the log is
    unreachable mid-failover: ask again)."""
    try:
        states = {s.job_id: s for s in await jobs.list_jobs(client, queue)}
    except LogError:
        return {}
    if all(i in states and states[i].finished for i in ids):
        return states
    return {}
