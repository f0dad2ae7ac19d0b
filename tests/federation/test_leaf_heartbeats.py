"""A worker on an institution's leaf node is seen at the hub (deploy/nats/hub-leaf).

`asman worker Q --domain hub` on the leaf runs the hub's jobs; its heartbeats must reach the
hub's log too, or the hub, `asman watch` and the page show no worker for the queue (and hub
workers would take it for gone and challenge its jobs). Heartbeats once lived in a KV bucket
whose puts from a leaf never reached the hub; they are now plain subjects of the
``ASMAN_WORKERS`` stream, which cross the leaf connection like job events do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest
from topology import HUB_CLIENT, LEAF_WORKER, Topology

from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.workers import WorkerInfo, list_workers

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ASMAN = str(Path(sys.executable).parent / "asman")
QUEUE = "public-q"


async def wait_workers(
    log: Log, queue: str, want: int, timeout: float, what: str
) -> list[WorkerInfo]:
    """Until the hub lists ``want`` live workers on ``queue``; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        seen = await list_workers(log, queue)
        if len(seen) == want:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the hub lists {len(seen)} worker(s) after {timeout}s")
        await asyncio.sleep(0.2)


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``asman ARGS`` in the background, its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen([ASMAN, *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM by PID, and its exit code (kill -9 if it does not end in time)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


@pytest.mark.timeout(120)
async def test_hub_sees_a_leaf_worker_in_list_workers_and_asman_watch(
    hub: Topology, leaf: Topology, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """`asman worker Q --domain hub` on the leaf (user `worker` of the HUB account, the
    recipe of deploy/nats/hub-leaf/README.md) is listed at the hub by ``list_workers`` and
    by `asman watch Q --once`, with its id and free slots; stopped, it is gone from both."""
    hub_urls = tuple(n.url_as(*HUB_CLIENT) for n in hub.nodes.values())
    key = PeerKey.generate()
    key.save(tmp_path / "worker.key")
    base = {**os.environ, "HOME": str(tmp_path), "ASMAN_REPLICAS": "3"}
    worker_env = {
        **base,
        "ASMAN_NATS_URL": leaf.nodes["leaf"].url_as(*LEAF_WORKER),
        "ASMAN_DOMAIN": "hub",
        "ASMAN_KEY_FILE": str(tmp_path / "worker.key"),
        "ASMAN_DATA_DIR": str(tmp_path / "worker"),
    }
    hub_env = {
        **base,
        "ASMAN_NATS_URL": ",".join(hub_urls),
        "ASMAN_KEY_FILE": str(tmp_path / "hub.key"),
    }

    async with Log(LogConfig(servers=hub_urls, replicas=3), PeerKey.generate()) as client:
        assert await list_workers(client, QUEUE) == []
        worker_log = tmp_path / "worker.log"
        worker = await asyncio.to_thread(
            start, ["worker", QUEUE, "--slots", "2"], worker_env, worker_log
        )
        try:
            try:
                (seen,) = await wait_workers(client, QUEUE, 1, 30, "the leaf worker")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the worker said:\n{worker_log.read_text()}") from None
            assert (seen.worker_id, seen.queue) == (key.peer_id, QUEUE)
            assert (seen.slots, seen.free_slots, seen.draining) == (2, 2, False)

            watched = await asyncio.to_thread(
                subprocess.run,
                [ASMAN, "watch", QUEUE, "--once"],
                env=hub_env,
                capture_output=True,
                timeout=60,
            )
            text = watched.stdout.decode()
            assert watched.returncode == 0, text + watched.stderr.decode()
            assert f"queue {QUEUE}: 0 job(s), 1 worker(s)" in text, text
            assert key.peer_id[:12] in text, text
            assert "2/2" in text, text  # its free slots
        finally:
            code = await asyncio.to_thread(stop, worker)
        log_text = worker_log.read_text()
        assert code == 0, log_text
        assert "heartbeat failed" not in log_text, log_text
        # a clean stop takes the heartbeat back at once, at the hub too: no ghost worker
        assert await list_workers(client, QUEUE) == []
