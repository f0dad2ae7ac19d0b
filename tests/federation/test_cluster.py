"""A 3-node JetStream cluster (deploy/nats/cluster) under failure: the stream leader is killed
mid-run, and the whole cluster is restarted from its store dirs.

Real nats-server processes on loopback, real workers running real containers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fleet import Fleet, accepted, echo_job, output, states_if_done, submit_all, wait_until
from topology import Topology

from asman.errors import LogError
from asman.log import jobs, subjects
from asman.log.connection import Log, LogConfig
from asman.log.events import JobState

pytestmark = [pytest.mark.docker, pytest.mark.slow]

NODES = ("nats-1", "nats-2", "nats-3")
JOBS = 200
LEASE_S = 6.0  # short, so a job whose worker lost a write mid-failover is redelivered soon

log = logging.getLogger(__name__)


@pytest.fixture
def cluster(tmp_path: Path, nats_binary: str) -> Iterator[Topology]:
    topo = Topology(tmp_path / "cluster", "cluster", NODES)
    try:
        yield topo.start()
    finally:
        topo.stop()


@pytest.fixture
async def fleet(cluster: Topology, tmp_path: Path, busybox_image: str) -> AsyncIterator[Fleet]:
    config = LogConfig(servers=cluster.urls(), replicas=3, lease_ttl_s=LEASE_S)
    f = Fleet(config, tmp_path / "peers")
    try:
        yield f
    finally:
        await f.close()


@pytest.mark.timeout(300)
async def test_killing_the_stream_leader_loses_no_job_and_runs_none_twice(
    cluster: Topology, fleet: Fleet
) -> None:
    client = await fleet.log()
    for _ in range(2):
        await fleet.worker("fed", slots=4)
    ids = await submit_all(client, "fed", [echo_job(n) for n in range(JOBS)])
    assert len(set(ids)) == JOBS

    await wait_until(lambda: _at_least(fleet, JOBS // 5), 120, "the first jobs to finish")
    leader = cluster.stream_leader(subjects.JOBS_STREAM)
    others = [n for n in NODES if n != leader]
    led = [
        s
        for s in (subjects.WAITING_STREAM, subjects.LOGS_STREAM, subjects.WORKERS_STREAM)
        if cluster.stream_leader(s) == leader
    ]
    done_at_kill = fleet.jobs_done
    finished_at_kill = await _finished(client, "fed")
    log.info("kill -9 %s (leads %s and %s) after %d jobs", leader, "ASMAN_JOBS", led, done_at_kill)
    t_kill = time.monotonic()
    cluster.kill(leader)

    async def progress() -> bool:
        return await _finished(client, "fed") > finished_at_kill

    await wait_until(progress, 60, "a job to finish after the kill", 0.2)
    log.info("first job finished %.1fs after the kill", time.monotonic() - t_kill)

    final: dict[str, JobState] = {}

    async def finished() -> bool:
        final.update(await states_if_done(client, "fed", ids))
        return bool(final)

    await wait_until(finished, 240, f"all {JOBS} jobs to finish after the leader was killed")
    log.info("all done %.1fs after the kill", time.monotonic() - t_kill)
    assert fleet.crashed() == []
    assert fleet.jobs_done > done_at_kill, "the workers ran nothing after the kill"
    new_leader = cluster.stream_leader(subjects.JOBS_STREAM)
    assert new_leader in others

    reruns = sum(1 for s in final.values() if s.claims > 1)
    log.info("%d jobs ran more than once (at-least-once execution), each finished once", reruns)
    for n, jid in enumerate(ids):
        state = final[jid]
        assert state.reason == "success", (n, state.result)
        assert accepted(state, "finished") == 1, [h for h in state.history]
        assert output(state) == f"{n}\n".encode()
    assert all(j.finished for j in await jobs.list_jobs(client, "fed"))

    # the killed node comes back from its store dir and catches up
    await asyncio.to_thread(cluster.start, leader)
    info = await client.js.stream_info(subjects.JOBS_STREAM)
    assert info.cluster is not None
    await wait_until(lambda: _replicas_current(client, 3), 30, "the restarted node to catch up")


async def _finished(client: Log, queue: str) -> int:
    """How many jobs of ``queue`` are finished (-1 while the log does not answer)."""
    try:
        return sum(1 for s in await jobs.list_jobs(client, queue) if s.finished)
    except LogError:
        return -1


async def _at_least(fleet: Fleet, n: int) -> bool:
    return fleet.jobs_done >= n


async def _readable(client: Log) -> bool:
    try:
        await jobs.list_jobs(client, "now")
    except LogError:
        return False
    return True


async def _replicas_current(client: Log, want: int) -> bool:
    try:
        info = await client.js.stream_info(subjects.JOBS_STREAM)
    except Exception:  # mid-election
        return False
    cl = info.cluster
    if cl is None or cl.leader is None:
        return False
    current = [r for r in cl.replicas or [] if r.current and not r.offline]
    return 1 + len(current) == want


@pytest.mark.timeout(180)
async def test_whole_cluster_restarts_from_its_store_dirs(cluster: Topology, fleet: Fleet) -> None:
    client = await fleet.log()
    await fleet.worker("now", slots=2)
    done_ids = await submit_all(client, "now", [echo_job(n, "now") for n in range(4)])
    # a queue nobody serves yet: its jobs wait, with their index entries, through the restart
    later_ids = await submit_all(client, "later", [echo_job(n, "later") for n in range(3)])
    before: dict[str, JobState] = {}

    async def finished() -> bool:
        before.update(await states_if_done(client, "now", done_ids))
        return bool(before)

    await wait_until(finished, 60, "the first queue's jobs")
    await fleet.close()

    assets = set(await asyncio.to_thread(cluster.leaders))
    assert {subjects.JOBS_STREAM, subjects.WAITING_STREAM} <= assets
    # no consumer per queue: a queue costs subjects, not Raft groups
    assert not any(
        a.startswith((f"{subjects.JOBS_STREAM}/", f"{subjects.WAITING_STREAM}/")) for a in assets
    )
    await asyncio.to_thread(cluster.stop)
    assert not any(node.running for node in cluster.nodes.values())
    await asyncio.to_thread(cluster.start)
    await asyncio.to_thread(cluster.wait_leaders, assets)

    after_fleet = Fleet(fleet.config, fleet.tmp / "after")
    try:
        client2 = await after_fleet.log(manage_streams=False)
        # healthz is green before every stream has elected its leader again
        await wait_until(lambda: _readable(client2), 30, "the streams to be readable again")
        # queues and job states survived: finished results are served as they were
        now = {s.job_id: s for s in await jobs.list_jobs(client2, "now")}
        assert set(now) == set(done_ids)
        for n, jid in enumerate(done_ids):
            assert now[jid].last_seq == before[jid].last_seq
            assert now[jid].result == before[jid].result
            assert output(now[jid]) == f"{n}\n".encode()
        cached = await jobs.submit(client2, "now", echo_job(0, "now"))
        assert cached.cached and cached.state.result == before[done_ids[0]].result
        waiting = await jobs.list_jobs(client2, "later")
        assert sorted(s.job_id for s in waiting) == sorted(later_ids)
        assert all(s.state == "queued" for s in waiting)
        # the index survived too: a worker that joins now runs the waiting jobs
        await after_fleet.worker("later", slots=2)
        result: dict[str, JobState] = {}

        async def later_done() -> bool:
            result.update(await states_if_done(client2, "later", later_ids))
            return bool(result)

        await wait_until(later_done, 60, "the waiting jobs after the restart")
        assert all(accepted(result[j], "finished") == 1 for j in later_ids)
    finally:
        await after_fleet.close()
