"""The benchmarks' own code at toy sizes: a benchmark that broke is noticed here, not when
``make bench`` runs; and what the queue-path figures rest on is checked (every job finished
once, as a success, by the no-op runtime, with no job folder made)."""

from __future__ import annotations

from pathlib import Path

from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from bench.queue_path import drain_asman, drain_protocol, enqueue_asman


async def test_queue_path_drains_every_job_once(nats_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "worker"
    async with Log(LogConfig(servers=(nats_url,)), PeerKey.generate()) as client:
        assert await enqueue_asman(client, "bench-q", 60) > 0
        # 4 slots: jobs give their slot back at the end of the "container" and finish
        # while the next ones run
        assert await drain_asman(nats_url, "bench-q", 60, 4, data_dir) > 0
        states = await jobs.list_jobs(client, "bench-q")
        assert len(states) == 60
        assert {(s.reason, s.claims) for s in states} == {("success", 1)}
        results = [s.result for s in states if s.result is not None]
        assert [(r.exit_code, r.log is not None) for r in results] == [(0, True)] * 60
        await enqueue_asman(client, "bench-p", 20)
        assert await drain_protocol(nats_url, "bench-p", 20, 3) > 0
        assert {s.reason for s in await jobs.list_jobs(client, "bench-p")} == {"success"}
    # the no-op runtime mounts nothing: no job folder was made for it
    assert list((data_dir / "jobs").iterdir()) == []


async def test_the_procs_drain_runs_every_job_once_in_each_mode() -> None:
    """bench/procs.py at a toy size: a supervisor of 1 and of 2 worker processes each drains
    its queue (the run checks every job finished once with success)."""
    from bench.procs import run

    result = await run(40, 1)
    assert result["drain_1proc_jobs_per_s"] > 0 and result["drain_2procs_jobs_per_s"] > 0


async def test_the_tes_path_runs_tasks_next_to_the_same_jobs(busybox_image: str) -> None:
    """bench/tes.py at a toy size: each task and each job ends a success (the run checks)."""
    from bench.tes import run

    result = await run(1)
    assert result["tes_ratio"] > 0 and result["tes_ms"]["p50"] > 0
