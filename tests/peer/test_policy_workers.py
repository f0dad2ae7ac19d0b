"""Queue policies with real workers (issue 14): ``asman`` processes with keys of their own, a
real nats-server and Docker engine. The owner makes a private queue with the CLI; a worker it
does not trust says what to ask and runs nothing; revoking a worker mid-job stops its container
and another trusted worker completes the job."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import Cli, heartbeats, running_containers, until, wait_removed
from workerstack import IMAGE

from asman.log import jobs
from asman.log.connection import Log

pytestmark = [pytest.mark.docker]


@pytest.fixture
def peers(tmp_path: Path, nats_url: str, busybox_image: str) -> Iterator[dict[str, Cli]]:
    """Three ``asman`` users, each with its own home and so its own key."""
    out = {}
    for name in ("owner", "a", "b"):
        (tmp_path / name).mkdir()
        out[name] = Cli(tmp_path / name, nats_url)
    try:
        yield out
    finally:
        for c in out.values():
            c.stop_all()


def key_of(c: Cli) -> str:
    done = c.run("keys", "--create")
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def ok(done: object) -> str:
    assert getattr(done, "returncode", 1) == 0, getattr(done, "stderr", b"").decode()
    return getattr(done, "stdout", b"").decode()


async def test_an_untrusted_worker_runs_nothing_and_says_what_to_ask(
    peers: dict[str, Cli], client: Log
) -> None:
    owner, trusted, stranger = peers["owner"], peers["a"], peers["b"]
    queue = json.loads(ok(owner.run("queue", "new", "--private", "--json")))["queue"]
    ok(owner.run("queue", "trust", queue, key_of(trusted)))
    stranger_key = key_of(stranger)

    stranger.start("worker", queue, "--data-dir", str(stranger.home / "w"), log="w.log")
    await heartbeats(client, queue, 1)  # it has joined (and read the policy) before the job
    trusted.start("worker", queue, "--data-dir", str(trusted.home / "w"), log="w.log")
    await heartbeats(client, queue, 2)

    done = owner.run("submit", queue, "--wait", "--json", IMAGE, "echo", "trusted only")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)["job_id"]
    state = await jobs.read_job(client, queue, job)
    assert state is not None and state.reason == "success"
    assert state.result is not None and state.result.worker == key_of(trusted)
    claimers = {h.signer for h in state.history if h.type == "claimed"}
    assert stranger_key not in claimers  # it never even tried

    told = [line for line in stranger.log("w.log").splitlines() if "trusts only" in line]
    assert len(told) == 1 and f"asman queue trust {queue} {stranger_key}" in told[0]


async def test_revoking_a_worker_mid_job_stops_its_container_and_hands_the_job_on(
    peers: dict[str, Cli], client: Log
) -> None:
    owner, first, second = peers["owner"], peers["a"], peers["b"]
    queue = json.loads(ok(owner.run("queue", "new", "--private", "--json")))["queue"]
    keys = {key_of(first): first, key_of(second): second}
    for key in keys:
        ok(owner.run("queue", "trust", queue, key))
    for c in keys.values():
        c.start("worker", queue, "--data-dir", str(c.home / "w"), log="w.log")
    await heartbeats(client, queue, 2)

    sub = owner.run(
        "submit", queue, "--json", IMAGE, "--", "sh", "-c", "sleep 4; echo done > /outputs/r"
    )
    job = json.loads(ok(sub))["job_id"]
    running = await until(client, queue, job, lambda s: s.started_ms is not None)
    assert running.lease is not None
    revoked = running.lease.worker
    containers = await asyncio.to_thread(running_containers, job)
    t = time.time() - 1

    ok(owner.run("queue", "untrust", queue, revoked))
    await asyncio.to_thread(wait_removed, containers, t)  # its worker stopped it
    state = await jobs.wait_finished(client, queue, job, 90)
    assert state.reason == "success", state.result
    assert state.result is not None and state.result.worker != revoked
    assert state.result.worker in keys
