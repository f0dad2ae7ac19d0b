"""A hub cluster and an institution's leaf node (deploy/nats/hub-leaf).

The leaf worker connects only to the leaf and serves a hub queue through JetStream domain
"hub"; the leaf is killed mid-job and comes back. Private queues stay in the leaf's own
account and domain, out of the hub's sight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fleet import (
    Fleet,
    accepted,
    echo_job,
    output,
    sleep_job,
    states_if_done,
    submit_all,
    wait_until,
)
from topology import Topology, http_json

from asman.log import jobs, subjects
from asman.log.connection import LogConfig
from asman.log.events import JobState
from asman.log.workers import list_workers

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HUBS = ("hub-1", "hub-2", "hub-3")
LEASE_S = 4.0
# users of deploy/nats/hub-leaf/*.conf
HUB_CLIENT = ("asman", "change-me-asman")
LEAF_WORKER = ("worker", "change-me-worker")
LEAF_LOCAL = ("local", "change-me-local")


@pytest.fixture
def hub(tmp_path: Path, nats_binary: str) -> Iterator[Topology]:
    topo = Topology(tmp_path / "hub", "hub-leaf", HUBS, leaf_listen=True)
    try:
        yield topo.start()
    finally:
        topo.stop()


@pytest.fixture
def leaf(tmp_path: Path, hub: Topology) -> Iterator[Topology]:
    topo = Topology(tmp_path / "leaf", "hub-leaf", ["leaf"], clustered=False, leaf_remotes=hub)
    try:
        topo.start()
        wait_leaf_connected(topo)
        yield topo
    finally:
        topo.stop()


def wait_leaf_connected(leaf: Topology, timeout: float = 15.0) -> None:
    node = leaf.nodes["leaf"]
    deadline = time.monotonic() + timeout
    while not http_json(node.http, "/leafz").get("leafs"):
        if time.monotonic() > deadline:
            raise TimeoutError("the leaf did not connect to the hub")
        time.sleep(0.05)
    time.sleep(0.3)  # interest propagation over the new leaf connection


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
    client = await fleet.log()  # at the hub: creates the streams at 3 replicas
    await fleet.blobs(client)
    worker = await fleet.worker("public", slots=3, **leaf_worker_overrides(leaf))
    ids = await submit_all(client, "public", [sleep_job(2, f"j{n}") for n in range(6)])

    async def some_running() -> bool:
        states = await jobs.list_jobs(client, "public")
        return sum(1 for s in states if s.started_ms is not None and not s.finished) >= 2

    await wait_until(some_running, 60, "the leaf worker to start jobs")
    # the hub sees the leaf worker: its heartbeat reached the hub's bucket (else hub workers
    # would take it for gone and challenge its jobs)
    seen = await list_workers(client, "public")
    assert [(w.worker_id, w.proc) for w in seen] == [(worker.log.peer_id, worker.log.session)]
    done_before = worker.jobs_done
    # cut the institution off for longer than a lease: its tickets are redelivered
    running = [s.job_id for s in await jobs.list_jobs(client, "public") if s.state == "running"]
    leaf.kill("leaf")
    await asyncio.sleep(LEASE_S + 2)
    await asyncio.to_thread(leaf.start, "leaf")
    await asyncio.to_thread(wait_leaf_connected, leaf)

    final: dict[str, JobState] = {}

    async def finished() -> bool:
        final.update(await states_if_done(client, "public", ids))
        return bool(final)

    await wait_until(finished, 90, "every hub job after the leaf came back")
    assert fleet.crashed() == []
    assert worker.jobs_done > done_before, "the leaf worker did not reconnect on its own"
    for n, jid in enumerate(ids):
        state = final[jid]
        assert state.reason == "success", state.result
        assert accepted(state, "finished") == 1, state.history
        assert output(state) == f"j{n}\n".encode()
        assert state.result is not None and state.result.worker == worker.worker_id
    # the jobs cut off mid-run were finished either by their first claim (the finish was
    # buffered by the client and sent on reconnect) or, after their lease ran out, by a
    # second claim on top of the first: exactly once either way
    assert running
    logger.info("claims of the jobs running at the cut: %s", [final[j].claims for j in running])


@pytest.mark.timeout(120)
async def test_private_queue_stays_in_the_leaf_domain(
    hub: Topology, leaf: Topology, fleet: Fleet
) -> None:
    client = await fleet.log()
    local = {"servers": (leaf.nodes["leaf"].url_as(*LEAF_LOCAL),), "replicas": 1}
    private = await fleet.log(**local)
    await fleet.worker("private", slots=1, **local)
    ids = await submit_all(private, "private", [echo_job(7, "secret")])
    done: dict[str, JobState] = {}

    async def finished() -> bool:
        done.update(await states_if_done(private, "private", ids))
        return bool(done)

    await wait_until(finished, 60, "the private job")
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
