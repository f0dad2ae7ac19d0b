"""Tags are matched (issue 15): compute-queues declared "restrict to workers with the same
tags" and never did it, so a job tagged ``site=zzz`` ran on a worker labelled ``site=b``.
A job's tags must all be among a worker's labels; a job no worker matches waits, and "why is
it waiting" names the tag. Two real workers, a real Docker engine and nats-server."""

from __future__ import annotations

import pytest
from faults import accepted, until
from workerstack import IMAGE, Stack, run_job

from asman.gateway.views import waiting
from asman.log import jobs
from asman.log.workers import list_workers

pytestmark = [pytest.mark.docker]


async def test_a_tagged_job_runs_only_on_a_worker_with_its_labels(stack: Stack) -> None:
    client = await stack.log()
    site_a = await stack.start_worker("tq", labels=("site=a",))
    site_b = await stack.start_worker("tq", labels=("site=b", "gpu=none"))
    for n in range(3):  # whoever is first, the job goes to site b
        state = await run_job(
            client, "tq", {"image": IMAGE, "command": f"echo {n}", "tags": ["site=b"]}
        )
        assert state.reason == "success", state.result
        assert state.result is not None and state.result.worker == site_b.worker_id
        assert state.claims == 1  # site a never claimed it, not even to hand it back
    untagged = await run_job(client, "tq", {"image": IMAGE, "command": "echo any"})
    assert untagged.reason == "success"

    # tagged for no worker: it waits, unclaimed, while a job behind it runs
    lost = await jobs.submit(
        client, "tq", {"image": IMAGE, "command": "echo lost", "tags": ["site=zzz"]}
    )
    behind = await run_job(client, "tq", {"image": IMAGE, "command": "echo behind"})
    assert behind.reason == "success"
    state = await jobs.read_job(client, "tq", lost.job_id)
    assert state is not None and state.state == "queued" and state.claims == 0
    why = waiting(state, await list_workers(client, "tq"))
    assert why is not None and why["code"] == "no_worker_with_tags"
    assert "site=zzz" in why["message"]
    assert site_a.worker_id != site_b.worker_id


async def test_an_entry_that_hides_a_jobs_tags_does_not_get_it_run_elsewhere(
    stack: Stack,
) -> None:
    """Entries are unsigned hints: one written without the ``t`` flag gets the job claimed by
    a worker without the label, which hands it back untried and remembers it."""
    client = await stack.log()
    definition = {"image": IMAGE, "command": "echo hidden", "tags": ["site=b"]}
    sub = await jobs.submit(client, "hq", definition)
    await jobs.mark_waiting(client, "hq", "cpu", sub.job_id, sub.state.last_seq)  # no flag
    await stack.start_worker("hq", labels=("site=a",))
    released = await until(client, "hq", sub.job_id, lambda s: "released" in accepted(s))
    assert not released.finished and released.started_ms is None
    site_b = await stack.start_worker("hq", labels=("site=b",))
    done = await jobs.wait_finished(client, "hq", sub.job_id, 60)
    assert done.reason == "success"
    assert done.result is not None and done.result.worker == site_b.worker_id
