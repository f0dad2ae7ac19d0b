"""A hub cluster and an institution's leaf node (deploy/nats/hub-leaf).

The leaf worker connects only to the leaf and serves a hub queue through JetStream domain
"hub"; the leaf is killed mid-job and comes back, and a hub worker takes over the jobs of a
leaf worker cut off for longer than its heartbeat lives. Private queues stay in the leaf's
own account and domain, out of the hub's sight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import pytest
from fleet import (
    Fleet,
    accepted,
    all_finished,
    echo_job,
    follow_queue,
    output,
    sleep_job,
    submit_all,
)
from topology import HUB_CLIENT, LEAF_LOCAL, LEAF_WORKER, Topology, wait_leaf_connected

from asman.log import jobs, subjects
from asman.log.connection import LogConfig
from asman.log.events import JobState
from asman.log.workers import list_workers

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

LEASE_S = 4.0


def container_died(
    job_ids: set[str], after_ns: int, timeout: float, attempt: int | None = None
) -> dict[str, Any]:
    """The engine's first ``die`` event, at or after ``after_ns``, of a container of one of
    ``job_ids`` (of that ``attempt``, if given): its actor's attributes (labels, exitCode).
    Events are replayed from a second earlier, so none is missed; fails after ``timeout``."""
    client = docker.from_env()
    events = client.events(
        since=after_ns // 1_000_000_000 - 1,
        until=int(time.time() + timeout),
        decode=True,
        filters={"type": "container", "event": "die", "label": "asman.job"},
    )
    try:
        for event in events:
            attrs = event.get("Actor", {}).get("Attributes", {})
            if (
                event.get("timeNano", 0) >= after_ns
                and attrs.get("asman.job") in job_ids
                and (attempt is None or attrs.get("asman.attempt") == str(attempt))
            ):
                return dict(attrs)
    finally:
        events.close()
        client.close()
    raise AssertionError(f"no container of {sorted(job_ids)} ended within {timeout:.0f}s")


@pytest.fixture
async def fleet(
    hub: Topology, leaf: Topology, tmp_path: Path, busybox_image: str
) -> AsyncIterator[Fleet]:
    config = LogConfig(
        servers=tuple(n.url_as(*HUB_CLIENT) for n in hub.nodes.values()),
        replicas=3,
        lease_ttl_s=LEASE_S,
    )
    f = Fleet(config, tmp_path / "peers")
    try:
        yield f
    finally:
        await f.close()


def leaf_worker_overrides(leaf: Topology) -> dict[str, object]:
    """A worker that knows only the leaf, and reaches the hub's queues as domain "hub"."""
    return {
        "servers": (leaf.nodes["leaf"].url_as(*LEAF_WORKER),),
        "domain": "hub",
        "manage_streams": False,
    }


@pytest.mark.timeout(180)
async def test_leaf_worker_runs_hub_jobs_through_a_leaf_outage(
    hub: Topology, leaf: Topology, fleet: Fleet
) -> None:
    """The leaf dies while its worker runs hub jobs, and a container ends while it is down:
    the worker rides the outage out on its own, and every job ends once, by it (no other
    worker serves the queue, so nobody challenges its leases)."""
    client = await fleet.log()  # at the hub: creates the streams at 3 replicas
    await fleet.blobs(client)
    worker = await fleet.worker("public", slots=3, **leaf_worker_overrides(leaf))
    ids = await submit_all(client, "public", [sleep_job(3, f"j{n}") for n in range(6)])

    def running_now(states: dict[str, JobState]) -> set[str]:
        return {j for j, s in states.items() if s.started_ms is not None and not s.finished}

    states = await follow_queue(
        client, "public", lambda st: len(running_now(st)) >= 2, 60, "the leaf worker's jobs"
    )
    # the hub sees the leaf worker: its heartbeat reached the hub's stream (else hub workers
    # would take it for gone and challenge its jobs)
    seen = await list_workers(client, "public")
    assert [(w.worker_id, w.proc) for w in seen] == [(worker.log.peer_id, worker.log.session)]
    done_before = worker.jobs_done
    running = running_now(states)
    # cut the institution off until one of its containers has ended: that job's result is
    # written only once the leaf is back
    cut_ns = time.time_ns()
    leaf.kill("leaf")
    died = await asyncio.to_thread(container_died, set(ids), cut_ns, 30)
    await asyncio.to_thread(leaf.start, "leaf")
    await asyncio.to_thread(wait_leaf_connected, leaf)

    final = await follow_queue(
        client, "public", all_finished(ids), 90, "every hub job after the leaf came back"
    )
    assert fleet.crashed() == []
    assert worker.jobs_done > done_before, "the leaf worker did not reconnect on its own"
    for n, jid in enumerate(ids):
        state = final[jid]
        assert state.reason == "success", state.result
        assert accepted(state, "finished") == 1, state.history
        assert output(state) == f"j{n}\n".encode()
        assert state.result is not None and state.result.worker == worker.worker_id
        # nobody but the leaf worker ever claimed it: no challenge, no takeover
        assert {h.signer for h in state.history if h.type == "claimed"} == {worker.worker_id}
    logger.info(
        "job %s ended during the outage (exit %s); claims of the jobs cut off: %s",
        died["asman.job"][:12],
        died.get("exitCode"),
        [final[j].claims for j in running],
    )


@pytest.mark.timeout(180)
async def test_a_cut_off_leaf_worker_loses_its_lease_and_its_container_is_stopped(
    hub: Topology, leaf: Topology, fleet: Fleet
) -> None:
    """The protocol's promise when a holder falls silent (docs/architecture.md, "Claim
    path"): the leaf is cut off longer than a heartbeat lives, a hub worker challenges the
    silent holder and takes the lease one grace later; when the leaf comes back, its worker
    finds the lease gone, stops its container at once and discards its result. The job ends
    exactly once, by the new holder."""
    client = await fleet.log(heartbeat_ttl_s=3.0)  # creates the streams: heartbeats live 3 s
    await fleet.blobs(client)
    leaf_worker = await fleet.worker("public", slots=1, **leaf_worker_overrides(leaf))
    (jid,) = await submit_all(client, "public", [sleep_job(25, "x")])
    first = await follow_queue(
        client, "public", lambda st: jid in st and st[jid].started_ms is not None, 60, "started"
    )
    held = first[jid].lease
    assert held is not None and held.worker == leaf_worker.worker_id
    cut_ns = time.time_ns()
    leaf.kill("leaf")
    hub_worker = await fleet.worker("public", slots=1, scan_interval_s=1.0)

    def taken_over(states: dict[str, JobState]) -> bool:
        lease = states[jid].lease if jid in states else None
        return lease is not None and lease.worker == hub_worker.worker_id

    over = await follow_queue(client, "public", taken_over, 60, "the hub worker's takeover")
    assert over[jid].claims == 2 and not over[jid].finished
    # the leaf comes back: its worker reads the job, finds the lease gone and stops its
    # container long before the container's own end (25 s)
    await asyncio.to_thread(leaf.start, "leaf")
    await asyncio.to_thread(wait_leaf_connected, leaf)
    stopped = await asyncio.to_thread(container_died, {jid}, cut_ns, 20, 1)
    assert stopped.get("exitCode") != "0", f"the leaf's container ran to its end: {stopped}"

    final = await follow_queue(client, "public", all_finished([jid]), 90, "the job's end")
    state = final[jid]
    assert state.reason == "success", state.result
    assert state.result is not None and state.result.worker == hub_worker.worker_id
    assert state.result.attempt == 2 and output(state) == b"x\n"
    # the leaf's result was discarded, not refused: it never wrote a finished at all
    assert [h.signer for h in state.history if h.type == "finished"] == [hub_worker.worker_id]
    assert fleet.crashed() == []


@pytest.mark.timeout(120)
async def test_private_queue_stays_in_the_leaf_domain(
    hub: Topology, leaf: Topology, fleet: Fleet
) -> None:
    client = await fleet.log()
    local = {"servers": (leaf.nodes["leaf"].url_as(*LEAF_LOCAL),), "replicas": 1}
    private = await fleet.log(**local)
    await fleet.worker("private", slots=1, **local)
    ids = await submit_all(private, "private", [echo_job(7, "secret")])
    done = await follow_queue(private, "private", all_finished(ids), 60, "the private job")
    assert output(done[ids[0]]) == b"7\n"
    assert done[ids[0]].definition["command"][-1].endswith("echo secret7")

    # the hub holds nothing of it: no job, no subject, not even the queue name
    assert await jobs.read_job(client, "private", ids[0]) is None
    assert await jobs.list_jobs(client, "private") == []
    info = await client.js.stream_info(subjects.JOBS_STREAM, subjects_filter=">")
    assert not any(".private." in s for s in (info.state.subjects or {}))
    # and the leaf's JetStream is not reachable from the hub account
    hub_nc = client.nc
    with pytest.raises(Exception):  # noqa: B017 - no responder: a timeout or NoResponders
        await hub_nc.request("$JS.uni.API.STREAM.NAMES", b"", timeout=1)
    # a hub queue is not visible from the private account either
    await jobs.submit(client, "public", echo_job(1))
    assert await jobs.list_jobs(private, "public") == []
