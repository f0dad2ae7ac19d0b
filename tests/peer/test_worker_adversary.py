"""A stranger against a real worker: a real nats-server, a real Docker engine, and an attacker
with its own key and a raw nats-py connection (tests/log/test_adversary.py has the attacks
on the log alone). Attacks 1, 2 and 7 of issue 12."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.js.errors
import pytest
from workerstack import IMAGE, Stack, output_bytes

from asman.log import jobs, subjects, wire
from asman.log.events import JobState, now_ms
from asman.log.keys import PeerKey

pytestmark = [pytest.mark.docker]


class Attacker:
    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.key = PeerKey.generate()

    async def sign_on_top(self, subject: str, event: dict[str, Any]) -> None:
        try:
            last = await self.js.get_msg(subjects.JOBS_STREAM, subject=subject, direct=True)
            prev = int(last.seq or 0)
        except nats.js.errors.NotFoundError:
            prev = 0
        body = {"ts": now_ms(), "proc": "bad", **event, "prev": prev}
        await self.js.publish(
            subject,
            wire.seal(self.key, subject, body),
            headers={subjects.HDR_EXPECTED_LAST_SUBJECT_SEQ: str(prev)},
        )


@pytest.fixture
async def attacker(nats_url: str) -> AsyncIterator[Attacker]:
    nc = await nats.connect(nats_url)
    try:
        yield Attacker(nc)
    finally:
        await nc.close()


async def wait_state(client: Any, queue: str, job: str, pred: Any, timeout: float = 60) -> JobState:
    async with asyncio.timeout(timeout):
        async for state in jobs.watch_job(client, queue, job):
            if pred(state):
                return state
    raise AssertionError("the job ended first")


FAKE = b"FAKE RESULT"


async def test_a_takeover_with_a_fake_result_fails_and_the_real_result_stands(
    stack: Stack, attacker: Attacker
) -> None:
    """Attack 1: while the real worker runs the job, a claim declaring huge numbers, then
    the attacker's started and finished with a forged inline result.txt."""
    client = await stack.log(lease_ttl_s=1.0)
    blobs = await stack.blobs(client)
    worker = await stack.start_worker("tk")
    definition = {"image": IMAGE, "command": "sh -c 'sleep 3; echo real > /outputs/result.txt'"}
    sub = await jobs.submit(client, "tk", definition)
    await wait_state(client, "tk", sub.job_id, lambda s: s.started_ms is not None)
    subject = subjects.job_subject("tk", sub.job_id)
    await attacker.sign_on_top(
        subject, {"type": "claimed", "ticket_seq": 2**62, "delivered": 2**62}
    )
    fake = {"path": "result.txt", "size": len(FAKE), "sha256": hashlib.sha256(FAKE).hexdigest()}
    for event in (
        {"type": "started", "attempt": 2},
        {"type": "finished", "reason": "success", "exit_code": 0, "attempt": 2,
         "outputs": [{**fake, "data": FAKE}]},
    ):  # fmt: skip
        await attacker.sign_on_top(subject, event)
    state = await jobs.wait_finished(client, "tk", sub.job_id, 60)
    assert state.reason == "success"
    assert state.result is not None and state.result.worker == worker.worker_id
    assert await output_bytes(blobs, state) == {"result.txt": b"real\n"}
    assert state.claims == 1  # the challenge was answered: no second attempt
    assert attacker.key.peer_id not in state.holders
    refused = [h for h in state.history if h.signer == attacker.key.peer_id and not h.accepted]
    assert [h.type for h in refused] == ["started", "finished"]


async def test_a_job_held_by_a_silent_claimant_is_taken_over_and_run(
    stack: Stack, attacker: Attacker
) -> None:
    """Attack 2: a claim declaring ``delivered`` 2^63-1 on a queued job, never finished.
    A worker that starts later finds the claimant has no heartbeat, challenges it, and runs
    the job one grace later (and once the claim is older than a heartbeat's life: 3 s here,
    so that a worker that just claimed is never taken for gone)."""
    client = await stack.log(lease_ttl_s=1.0, heartbeat_ttl_s=3.0)
    sub = await jobs.submit(client, "stall", {"image": IMAGE, "command": "echo ran"})
    subject = subjects.job_subject("stall", sub.job_id)
    await attacker.sign_on_top(subject, {"type": "claimed", "delivered": 2**63 - 1})
    held = await jobs.read_job(client, "stall", sub.job_id)
    assert held is not None and held.lease is not None
    assert held.lease.worker == attacker.key.peer_id
    t = time.monotonic()
    worker = await stack.start_worker("stall")
    state = await jobs.wait_finished(client, "stall", sub.job_id, 60)
    assert state.reason == "success" and state.claims == 2
    assert state.result is not None and state.result.worker == worker.worker_id
    assert time.monotonic() - t < 30


async def test_two_thousand_long_outputs_fit_in_one_result(stack: Stack) -> None:
    """Attack 7: 2,000 outputs with long paths make an outputs list far larger than a
    message may be; it goes into a blob named by its sha256, and the job ends success with
    every output (before: never written, three runs, worker_lost)."""
    client = await stack.log()
    blobs = await stack.blobs(client)
    await stack.start_worker("big")
    long = "d" * 120
    script = (
        f"mkdir -p /outputs/{long}/{long} && cd /outputs/{long}/{long} && "
        "for i in $(seq 1 2000); do echo $i > "
        "file-with-a-rather-long-name-to-fill-the-manifest-$i.txt; done"
    )
    state = await jobs.wait_finished(
        client,
        "big",
        (
            await jobs.submit(client, "big", {"image": IMAGE, "command": ["sh", "-c", script]})
        ).job_id,
        120,
    )
    assert state.reason == "success", state.result
    assert state.result is not None and state.result.manifest is not None
    assert state.result.outputs == ()
    files = await output_bytes(blobs, state)
    assert len(files) == 2000
    name = f"{long}/{long}/file-with-a-rather-long-name-to-fill-the-manifest-1234.txt"
    assert files[name] == b"1234\n"


async def test_a_result_the_log_refuses_ends_the_job_error_with_the_reason(
    stack: Stack,
) -> None:
    """Attack 7, the rest: a result still too large for the log (its streams allow 64 KiB
    per message, the worker carries up to 128 KiB of outputs inline) ends the job ``error``
    with the reason, at once, rather than ``worker_lost`` after three runs."""
    client = await stack.log(max_event_bytes=64 * 1024)
    await stack.start_worker("tl", inline_output_limit=32 * 1024, inline_outputs_total=100 * 1024)
    script = "for i in 1 2 3; do head -c 30000 /dev/zero > /outputs/f$i; done"
    sub = await jobs.submit(client, "tl", {"image": IMAGE, "command": ["sh", "-c", script]})
    state = await jobs.wait_finished(client, "tl", sub.job_id, 60)
    assert state.reason == "error" and state.claims == 1
    assert state.result is not None
    assert "could not be recorded" in state.result.message
    assert "maximum" in state.result.message or "max_payload" in state.result.message
