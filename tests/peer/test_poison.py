"""Poison pills: whatever a job holds, the worker ends that job and goes on serving (issue 13).

Each job here once took a worker down (or wedged it); a real worker, a real Docker engine and
a real nats-server run them, and after each the same worker runs a normal job. Definitions
the gateway and the CLI would refuse are written straight to the log, as a stranger with a key
of their own can."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from workerstack import IMAGE, Stack, job_text, output_bytes

from asman.log import jobs, subjects
from asman.log.connection import Log
from asman.log.definition import image_class, job_id
from asman.log.events import now_ms
from asman.log.objstore import ObjectStoreBlobs
from asman.log.workers import list_workers
from asman.peer.worker import Worker

pytestmark = [pytest.mark.docker]


async def submit_raw(client: Log, queue: str, definition: dict[str, Any]) -> str:
    """Append ``submitted`` for ``definition`` as given, unvalidated (the log binds it to
    its job id, nothing more), and list it as waiting."""
    jid = job_id(definition)
    subject = subjects.job_subject(queue, jid)
    event = {
        "type": "submitted",
        "ts": now_ms(),
        "definition": jobs.definition_text(definition),
        "class": image_class(definition),
        "via": "test",
    }
    own = await client.append_checked(subject, event, expected_last_seq=0)
    await jobs.mark_waiting(client, queue, image_class(definition), jid, own.seq)
    return jid


async def still_serves(client: Log, queue: str, worker_task: asyncio.Task[None]) -> None:
    """The worker's task is alive, and it runs a normal job to success."""
    assert not worker_task.done(), worker_task
    sub = await jobs.submit(client, queue, {"image": IMAGE, "command": "echo still here"})
    state = await jobs.wait_finished(client, queue, sub.job_id, 60)
    assert state.reason == "success", state.result
    assert not worker_task.done()


async def started(stack: Stack, queue: str, **overrides: Any) -> tuple[Worker, asyncio.Task[None]]:
    worker = await stack.start_worker(queue, **overrides)
    return worker, stack.tasks[-1][1]


async def test_an_output_named_in_bytes_that_are_not_utf8_ends_the_job_not_the_worker(
    stack: Stack,
) -> None:
    """Before: writing the 'skipped' note raised UnicodeEncodeError and the worker's task
    group exited (and ``asman dev`` with it)."""
    client = await stack.log()
    blobs = await stack.blobs(client)
    _, task = await started(stack, "pp")
    script = "printf bad > \"/outputs/$(printf 'na\\377me\\nx')\"; echo good > /outputs/good.txt"
    sub = await jobs.submit(client, "pp", {"image": IMAGE, "command": ["sh", "-c", script]})
    state = await jobs.wait_finished(client, "pp", sub.job_id, 60)
    assert state.reason == "success", state.result
    assert await output_bytes(blobs, state) == {"good.txt": b"good\n"}
    system = (await job_text(client, state)).get("system", "")
    # the skipped name is told, escaped onto one line
    assert "na\\xffme\\nx (its name is not UTF-8) skipped" in system, system
    await still_serves(client, "pp", task)


async def test_a_huge_number_written_to_the_log_ends_the_job_error_not_the_worker(
    stack: Stack,
) -> None:
    """``shmSize`` of 4,400 nines: before, docker-py's json.dumps raised ValueError (Python's
    int-to-string digit limit) and the worker crashed on each of three attempts."""
    client = await stack.log()
    _, task = await started(stack, "huge")
    jid = await submit_raw(
        client, "huge", {"image": IMAGE, "command": "true", "shmSize": "9" * 4400}
    )
    state = await jobs.wait_finished(client, "huge", jid, 60)
    assert state.reason == "error" and state.claims == 1
    assert state.result is not None
    assert "shmSize" in state.result.message and "too large" in state.result.message
    await still_serves(client, "huge", task)


@pytest.mark.parametrize(
    ("definition", "field"),
    [
        ({"maxDuration": "9" * 100_000 + "d"}, "maxDuration"),
        ({"requirements": {"memory": "9" * 5000}}, "requirements.memory"),
        ({"configFiles": {"/sbin/docker-init": "data:,x"}}, "configFiles"),
        ({"configFiles": {"/tmp": "data:,x"}}, "configFiles"),
        ({"requirements": {"cpus": 10**9}}, "requirements.cpus"),
    ],
)
async def test_a_definition_the_worker_cannot_run_ends_error_with_the_reason(
    stack: Stack, definition: dict[str, Any], field: str
) -> None:
    """Written raw to the log (the gateway refuses each with a 400): the job ends ``error``
    naming the field, once, and the worker serves on."""
    client = await stack.log()
    _, task = await started(stack, "bad")
    jid = await submit_raw(client, "bad", {"image": IMAGE, "command": "true", **definition})
    state = await jobs.wait_finished(client, "bad", jid, 60)
    assert state.reason == "error" and state.claims == 1, state.result
    assert state.result is not None and field in state.result.message
    assert len(state.result.message.splitlines()) == 1
    await still_serves(client, "bad", task)


async def test_an_idle_worker_reports_every_slot_free(stack: Stack) -> None:
    """Before: a slot held for an in-flight fetch counted as busy, so an idle worker showed
    0 free slots and the gateway said ``workers_busy`` while nothing ran."""
    client = await stack.log()
    worker, _ = await started(stack, "idle", slots=2)
    sub = await jobs.submit(client, "idle", {"image": IMAGE, "command": "true"})
    await jobs.wait_finished(client, "idle", sub.job_id, 60)

    async def beat_says_free() -> list[Any]:
        while True:
            listed = [
                w for w in await list_workers(client, "idle") if w.worker_id == worker.worker_id
            ]
            if listed and listed[0].free_slots == 2 and not listed[0].running:
                return listed
            await worker.beaten.wait()
            worker.beaten.clear()

    listed = await asyncio.wait_for(beat_says_free(), 30)
    assert listed[0].slots == 2


async def test_outputs_over_a_full_blob_store_end_the_job_error_saying_so(stack: Stack) -> None:
    """Before: the bucket had no size limit (a 1 GiB sparse output became 1.1 GB of blobs) and
    a refused chunk left nats-py's ack future pending, so the upload looked like a timeout.
    Now the bucket has a limit and a job over it ends ``error`` with the reason, once."""
    client = await stack.log()
    small = ObjectStoreBlobs(client.js, bucket="SMALL", max_bytes=1024 * 1024)
    await small.ensure()
    _, task = await started(stack, "full", blobs=small)
    script = "head -c 3000000 /dev/urandom > /outputs/big.bin"
    sub = await jobs.submit(client, "full", {"image": IMAGE, "command": ["sh", "-c", script]})
    state = await jobs.wait_finished(client, "full", sub.job_id, 60)
    assert state.reason == "error" and state.claims == 1, state.result
    assert state.result is not None and "is full" in state.result.message
    assert len(state.result.message.splitlines()) == 1
    await still_serves(client, "full", task)
