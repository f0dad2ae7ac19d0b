"""TES states from the fold of a job, including the two the fold has no word for."""

from __future__ import annotations

from dataclasses import replace

import pytest

from asman.gateway.tes import task_definition, task_state
from asman.log.events import Challenge, JobState, Lease, Result

QUEUED = JobState(
    queue="q",
    job_id="a" * 64,
    state="queued",
    definition={},
    definition_json="{}",
    submitter="s" * 64,
    submitted_ms=1,
    via="gateway",
    last_seq=1,
)
LEASE = Lease(worker="w" * 64, attempt=1, claimed_ms=2, claim_seq=2, life_ms=60_000)
CLAIMED = replace(QUEUED, state="running", lease=LEASE, claims=1)
RUNNING = replace(CLAIMED, started_ms=3)


@pytest.mark.parametrize(
    ("state", "tes"),
    [
        (QUEUED, "QUEUED"),
        (CLAIMED, "INITIALIZING"),
        (RUNNING, "RUNNING"),
        (replace(RUNNING, cancel_requested=True), "CANCELING"),
        # the holder's heartbeat is gone and another worker challenged it: taking over
        (
            replace(RUNNING, lease=replace(LEASE, challenge=Challenge("c" * 64, 5, 4))),
            "PREEMPTED",
        ),
        (replace(QUEUED, state="finished", result=Result("success", "w", 1, 9)), "COMPLETE"),
        (replace(QUEUED, state="finished", result=Result("failed", "w", 1, 9)), "EXECUTOR_ERROR"),
        (
            replace(QUEUED, state="finished", result=Result("timed_out", "w", 1, 9)),
            "EXECUTOR_ERROR",
        ),
        (replace(QUEUED, state="finished", result=Result("error", "w", 1, 9)), "SYSTEM_ERROR"),
        (
            replace(QUEUED, state="finished", result=Result("worker_lost", "w", 1, 9)),
            "SYSTEM_ERROR",
        ),
        (replace(QUEUED, state="finished", result=Result("cancelled", "w", 1, 9)), "CANCELED"),
    ],
)
def test_task_states(state: JobState, tes: str) -> None:
    assert task_state(state) == tes


def test_a_task_s_metadata_is_not_part_of_its_job_id() -> None:
    from asman.log.definition import job_id, validate_definition

    task = {"executors": [{"image": "alpine:3.20", "command": ["true"]}]}
    named = {**task, "name": "x", "description": "y", "tags": {"k": "v"}}
    one, two = task_definition(task), task_definition(named)
    assert job_id(validate_definition(one)) == job_id(validate_definition(two))
    assert two["tes"] == {"name": "x", "description": "y", "tags": {"k": "v"}}
    assert task_definition({**task, "resources": {"ram_gb": 0.5, "cpu_cores": 2}})[
        "requirements"
    ] == {"cpus": 2, "memory": 512 * 1024**2}
