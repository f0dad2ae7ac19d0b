"""``asman worker --procs N`` and the containers of dead workers (issue 13), with real
processes: the CLI's supervisor and its worker processes, a real nats-server and Docker engine.
Points in a job's life are reached by watching the log and Docker's events, never by sleeping.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from faults import Cli, alive, heartbeats, running_containers, until, wait_removed
from workerstack import IMAGE, Stack, output_bytes

from asman.log import jobs
from asman.log.connection import Log
from asman.log.objstore import ObjectStoreBlobs

pytestmark = [pytest.mark.docker]


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
