"""``asman worker --procs N`` and the containers of dead workers (issue 13), with real
processes: the CLI's supervisor and its worker processes, a real nats-server and Docker engine.
Points in a job's life are reached by watching the log and Docker's events, never by sleeping.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from workerstack import IMAGE, Stack, output_bytes

from asman.log import jobs, subjects
from asman.log.connection import Log, LogConfig
from asman.log.events import JobState
from asman.log.keys import PeerKey
from asman.log.objstore import ObjectStoreBlobs

pytestmark = [pytest.mark.docker]

ASMAN = str(Path(sys.executable).parent / "asman")
#: short rules, written into the streams before any worker starts: a dead process's job is
#: challenged once its heartbeat is 3 s old and taken over 2 s later
LEASE_S, HEARTBEAT_TTL_S = 2.0, 3.0


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Log]:
    log = Log(
        LogConfig(servers=(nats_url,), lease_ttl_s=LEASE_S, heartbeat_ttl_s=HEARTBEAT_TTL_S),
        PeerKey.generate(),
    )
    await log.connect()
    try:
        yield log
    finally:
        await log.close()


class Cli:
    """``asman`` subprocesses of one test, stopped by PID at its end."""

    def __init__(self, home: Path, nats_url: str) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "HOME": str(home),
            "ASMAN_NATS_URL": nats_url,
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_DATA_HOME": str(home / "data"),
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        out = open(self.home / log, "wb")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [ASMAN, "-v", *args], env=self.env, stdout=out, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.home / name).read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


@pytest.fixture
def cli(tmp_path: Path, nats_url: str, busybox_image: str) -> Iterator[Cli]:
    c = Cli(tmp_path, nats_url)
    try:
        yield c
    finally:
        c.stop_all()


async def heartbeats(client: Log, queue: str, count: int, timeout: float = 60) -> set[str]:
    """Until ``count`` worker processes beat on ``queue``: their subjects' last tokens."""
    seen: set[str] = set()
    got = asyncio.Event()

    async def on_beat(msg: Any) -> None:
        seen.add(msg.subject.rsplit(".", 1)[-1])
        if len(seen) >= count:
            got.set()

    sub = await client.nc.subscribe(subjects.workers_filter(queue), cb=on_beat)
    try:
        await asyncio.wait_for(got.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return seen


async def until(client: Log, queue: str, job: str, pred: Any, timeout: float = 60) -> JobState:
    async with asyncio.timeout(timeout):
        async for state in jobs.watch_job(client, queue, job):
            if pred(state):
                return state
    raise AssertionError(f"job {job} ended before the awaited state")


def wait_removed(ids: list[str], since: float, timeout: float = 60) -> None:
    """Until Docker has destroyed every container of ``ids`` (its events from ``since``)."""
    api = docker.from_env()
    try:
        left = {i for i in ids if _exists(api, i)}
        if not left:
            return
        events = api.events(
            since=int(since), until=int(time.time() + timeout), decode=True,
            filters={"type": "container", "event": "destroy"},
        )  # fmt: skip
        for event in events:
            left.discard(event.get("id", ""))
            if not {i for i in left if _exists(api, i)}:
                return
        raise AssertionError(f"containers still there after {timeout}s: {sorted(left)}")
    finally:
        api.close()


def running_containers(job: str, timeout: float = 60) -> list[str]:
    """The ids of ``job``'s containers once one runs (Docker's ``start`` events)."""
    api = docker.from_env()
    try:
        since = time.time() - 60
        label = {"label": f"asman.job={job}"}
        found = api.containers.list(filters={**label, "status": "running"})
        if found:
            return [c.id for c in found]
        events = api.events(
            since=int(since), until=int(time.time() + timeout), decode=True,
            filters={"type": "container", "event": "start", **label},
        )  # fmt: skip
        for event in events:
            return [event["id"]]
        raise AssertionError(f"no container of job {job} started in {timeout}s")
    finally:
        api.close()


def _exists(api: Any, container_id: str) -> bool:
    try:
        api.containers.get(container_id)
    except docker.errors.NotFound:
        return False
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def holder_of(data_dir: Path, job: str) -> tuple[int, int]:
    """(process number, pid) of the ``--procs`` process whose data dir holds ``job``'s
    folder; its pid is written in its data dir's lock."""
    for proc_dir in sorted((data_dir / "procs").iterdir()):
        if any(p.name.startswith(job) for p in (proc_dir / "jobs").iterdir()):
            return int(proc_dir.name), int((proc_dir / ".lock").read_text())
    listing = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*"))
    raise AssertionError(f"no process holds job {job}: {listing}")


async def test_a_killed_process_is_restarted_and_its_job_ends_exactly_once(
    cli: Cli, client: Log, tmp_path: Path
) -> None:
    data_dir = tmp_path / "w"
    supervisor = cli.start("worker", "pq", "--procs", "2", "--data-dir", str(data_dir), log="w.log")
    procs = await heartbeats(client, "pq", 2)
    assert len(procs) == 2  # two processes, one identity
    sub = await jobs.submit(
        client,
        "pq",
        {"image": IMAGE, "command": ["sh", "-c", "sleep 3; echo survived > /outputs/r"]},
    )
    await until(client, "pq", sub.job_id, lambda s: s.started_ms is not None)
    index, pid = holder_of(data_dir, sub.job_id)
    first = await asyncio.to_thread(running_containers, sub.job_id)
    t = time.time() - 1
    os.kill(pid, signal.SIGKILL)

    state = await jobs.wait_finished(client, "pq", sub.job_id, 90)
    assert state.reason == "success", state.result
    assert state.claims == 2
    assert sum(1 for h in state.history if h.type == "finished" and h.accepted) == 1
    blobs = ObjectStoreBlobs(client.js)
    assert await output_bytes(blobs, state) == {"r": b"survived\n"}
    # the dead process's container is gone: its successor removed it on start
    await asyncio.to_thread(wait_removed, first, t)
    # the supervisor started it again on the same data dir, with a new pid
    restarted = int((data_dir / "procs" / str(index) / ".lock").read_text())
    assert restarted != pid and alive(restarted)
    assert f"worker process {index} (pid {pid}) ended with signal SIGKILL" in cli.log("w.log")

    # SIGTERM: every process drains and ends, then the supervisor
    pids = [int((data_dir / "procs" / str(i) / ".lock").read_text()) for i in range(2)]
    supervisor.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(supervisor.wait, 60) == 0
    assert not any(alive(p) for p in pids)


async def test_the_containers_of_a_dead_sibling_are_removed_a_live_ones_kept(
    cli: Cli, client: Log, tmp_path: Path, nats_url: str
) -> None:
    """Before: the containers of a ``kill -9``ed worker kept running until that worker came
    back on the same data dir. Now any worker on the engine removes them (the dead one's
    data-dir lock is free), and never a live worker's."""
    stack = Stack(nats_url, tmp_path / "stack")
    try:
        live = await stack.start_worker("live")
        held = await jobs.submit(client, "live", {"image": IMAGE, "command": "sleep 600"})
        await until(client, "live", held.job_id, lambda s: s.started_ms is not None)

        dead = cli.start("worker", "orph", "--data-dir", str(tmp_path / "dead"), log="dead.log")
        await heartbeats(client, "orph", 1)
        sub = await jobs.submit(client, "orph", {"image": IMAGE, "command": "sleep 601"})
        await until(client, "orph", sub.job_id, lambda s: s.started_ms is not None)
        orphans = await asyncio.to_thread(running_containers, sub.job_id)
        t = time.time() - 1
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)

        # a worker on another queue and data dir, sweeping often
        await stack.start_worker("elsewhere", orphan_sweep_s=0.5)
        await asyncio.to_thread(wait_removed, orphans, t)
        assert await asyncio.to_thread(running_containers, held.job_id), "a live one's stays"
        assert live.jobs_done == 0
        await jobs.cancel(client, "live", held.job_id)
    finally:
        await stack.close()
